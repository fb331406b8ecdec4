"""What cannot run here (no Docker engine, no cluster), checked with the real tools.

hadolint lints the Dockerfile; check-jsonschema validates docker-compose.yml against the
Compose specification and KEDA's objects against the vendored schemas
(deploy/schemas/README.md); kubernetes-validate checks every built-in Kubernetes object,
as rendered by kustomize. The rest holds the files to each other and to the code: every
FORWARDER_* name is a real setting, the Dockerfile copies what exists and runs the
installed console script, the lock pins what pyproject asks for.

The lock is checked structurally (every direct dependency pinned, with hashes, at a
version pyproject accepts), not by resolving again: that needs PyPI.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from forwarder import cli, connections, metrics, worker
from forwarder.embedded import RedisServer, free_port
from forwarder.queue import Keys
from forwarder.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
SCHEMAS = DEPLOY / "schemas" / "keda"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

SETTINGS = {f"FORWARDER_{name.upper()}" for name in Settings.model_fields}
ENV_NAME = re.compile(r"\bFORWARDER_[A-Z0-9_]+\b")
KEDA_KINDS = {"ScaledObject": "scaledobject", "TriggerAuthentication": "triggerauthentication"}


def _tool(name: str) -> str:
    """A command-line tool of the dev extra: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]' installs it")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


# --- Dockerfile ---------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    logical = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in logical.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def _one(keyword: str) -> str:
    [value] = [rest for k, rest in _final_stage() if k == keyword]
    return value


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = _run(_tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_dockerfile_copies_only_what_exists_and_the_build_context_keeps() -> None:
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line]
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else stays out of the build context
    copies = [rest for keyword, rest in _instructions() if keyword == "COPY"]
    assert copies
    for arguments in copies:
        words = [w for w in shlex.split(arguments) if not w.startswith("--")]
        if "--from=" in arguments:
            continue
        for source in words[:-1]:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
            assert path in kept, f"COPY {source}: .dockerignore leaves it out of the context"


def test_the_entrypoint_is_the_installed_console_script_and_cmd_its_worker() -> None:
    [(script, target)] = PYPROJECT["project"]["scripts"].items()
    assert target == "forwarder.__main__:run"  # catches signals before cli is imported
    assert json.loads(_one("ENTRYPOINT")) == [script]
    [command] = json.loads(_one("CMD"))
    with pytest.raises(SystemExit) as help_shown:
        cli.main([command, "--help"])
    assert help_shown.value.code == 0


def test_the_image_is_slim_pinned_non_root_and_labelled_with_the_version() -> None:
    froms = [rest.split()[0] for keyword, rest in _instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert len(set(froms)) == 1, "the venv is built on the image it runs on"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", froms[0])
    user, _, group = _one("USER").partition(":")
    assert int(user) > 0
    assert int(group) > 0
    labels = _one("LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert _one("ARG") == f"VERSION={PYPROJECT['project']['version']}"


@pytest.fixture
def health_server() -> Iterator[int]:
    """A listener answering /healthz 200 (anything else 404), like the worker's."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_healthcheck_command_asks_healthz_on_the_metrics_port(health_server: int) -> None:
    options, _, command = _one("HEALTHCHECK").partition(" CMD ")
    assert "--interval=" in options
    argv = json.loads(command)
    assert argv[0] == "python"
    healthy = subprocess.run(
        [sys.executable, *argv[1:]],
        env={"FORWARDER_METRICS_PORT": str(health_server)},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert healthy.returncode == 0, healthy.stderr
    silent = subprocess.run(
        [sys.executable, *argv[1:]],
        env={"FORWARDER_METRICS_PORT": str(free_port())},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert silent.returncode != 0


# --- The lock -----------------------------------------------------------------------


def _pins(lock: Path) -> dict[str, str]:
    """Package → pinned version, from a ``uv pip compile --generate-hashes`` file."""
    text = lock.read_text()
    entries = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)(.*?)(?=^\S|\Z)", text, re.M | re.S)
    pins: dict[str, str] = {}
    for name, version, rest in entries:
        assert "--hash=sha256:" in rest, f"{name} is pinned without a hash"
        pins[canonicalize_name(name)] = version
    return pins


def _assert_pinned(requirements: list[str], pins: dict[str, str]) -> None:
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in the lock: regenerate it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {name}=={pins[name]}, pyproject asks {requirement.specifier}"
        )


def test_the_lock_pins_every_dependency_at_an_accepted_version_with_hashes() -> None:
    pins = _pins(DEPLOY / "requirements.lock")
    direct = PYPROJECT["project"]["dependencies"]
    _assert_pinned(direct, pins)
    # An extra's packages (redis[hiredis] → hiredis) must be locked too.
    assert "hiredis" in pins
    assert canonicalize_name(PYPROJECT["project"]["name"]) not in pins


def test_the_build_lock_pins_the_build_backend() -> None:
    pins = _pins(DEPLOY / "build-requirements.lock")
    _assert_pinned(PYPROJECT["build-system"]["requires"], pins)


# --- docker-compose.yml ---------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_follows_the_compose_specification() -> None:
    result = _run(
        _tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_redis_is_durable_protected_and_checked() -> None:
    redis_service = _compose()["services"]["redis"]
    command = redis_service["command"]
    for option, value in [("--appendonly", "yes"), ("--appendfsync", "everysec")]:
        assert command[command.index(option) + 1] == value
    assert "FORWARDER_REDIS_PASSWORD" in command[command.index("--requirepass") + 1]
    volume = redis_service["volumes"][0].split(":")
    assert volume[1] == "/data"
    assert volume[0] in _compose()["volumes"]
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])


def _longest_stop(grace: float) -> float:
    """The longest a stopping worker takes: a hung Redis call ends (blocking pop plus
    socket timeout), in-flight PUTs get the grace, outcomes and the give-back each wait
    up to GIVE_UP_SECONDS for Redis, the listener stops."""
    hung_call = worker.BLOCK_SECONDS + connections.SOCKET_TIMEOUT
    return hung_call + grace + 2 * worker.GIVE_UP_SECONDS + metrics.STOP_TIMEOUT


def test_compose_workers_wait_for_redis_and_outlast_their_own_grace() -> None:
    services = _compose()["services"]
    grace = _longest_stop(Settings.model_fields["shutdown_grace"].default)
    for name in ("forwarder", "forwarder-demo"):
        worker = services[name]
        assert worker["command"] == ["worker"]
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["env_file"] == ".env"
        assert _seconds(worker["stop_grace_period"]) > grace
        assert worker["read_only"] is True
        assert worker["deploy"]["replicas"] > 1
        assert "profiles" not in worker or worker["profiles"] == ["demo"]
    assert "profiles" not in services["forwarder"]


def test_compose_demo_points_its_workers_at_the_stand_in() -> None:
    services = _compose()["services"]
    standin = services["standin-api"]
    assert standin["profiles"] == ["demo"]
    assert standin["command"] == ["standin-api", "--host", "0.0.0.0", "--port", "8080"]
    demo = services["forwarder-demo"]["environment"]
    assert urlsplit(demo["FORWARDER_API_BASE_URL"]).netloc == "standin-api:8080"
    assert services["forwarder-demo"]["depends_on"]["standin-api"]["condition"] == (
        "service_healthy"
    )
    # The demo's queue is not the real workers' queue.
    assert demo["FORWARDER_QUEUE"] != Settings.model_fields["queue"].default
    assert services["demo-load"]["environment"]["FORWARDER_QUEUE"] == demo["FORWARDER_QUEUE"]


def test_compose_demo_load_enqueues_its_sample_updates(tmp_path: Path) -> None:
    # The one-shot loader's script, run as compose would, against a private Redis.
    service = _compose()["services"]["demo-load"]
    assert service["entrypoint"] == ["sh", "-c"]
    [script] = service["command"]
    bin_dir = Path(sys.executable).parent
    queue = service["environment"]["FORWARDER_QUEUE"]
    with RedisServer(tmp_path / "redis") as server:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FORWARDER_QUEUE": queue}
        env["FORWARDER_REDIS_URL"] = server.url
        result = subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        client = redis.Redis.from_url(server.url)
        try:
            raws = client.lrange(Keys(queue).queue, 0, -1)
        finally:
            client.close()
    prefixes = {json.loads(raw)["visitorId"].split("-")[0] for raw in raws}
    assert len(raws) == 200
    assert prefixes == {"ok", "bad", "flaky1", "down"}


# --- Kubernetes -----------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    """The rendered objects, by kubectl's built-in kustomize or a kustomize binary."""
    if kubectl := shutil.which("kubectl"):
        argv = [kubectl, "kustomize", str(directory)]
    elif kustomize := shutil.which("kustomize"):
        argv = [kustomize, "build", str(directory)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render the overlays")
    result = _run(*argv)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _validate(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    """Built-in kinds through kubernetes-validate; KEDA's through the vendored schemas."""
    builtin = [o for o in objects if o["kind"] not in KEDA_KINDS]
    rendered = tmp_path / "builtin.yaml"
    rendered.write_text(yaml.safe_dump_all(builtin))
    result = _run(_tool("kubernetes-validate"), "--strict", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = set(re.findall(r"passed for resource (\S+)", result.stdout + result.stderr))
    expected = {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in builtin}
    assert passed == expected
    for one in (o for o in objects if o["kind"] in KEDA_KINDS):
        schema = SCHEMAS / f"{KEDA_KINDS[one['kind']]}.v1alpha1.json"
        _check_json(schema, one, tmp_path / f"{one['kind']}.json")
        for i, trigger in enumerate(one.get("spec", {}).get("triggers", [])):
            _check_json(SCHEMAS / "redis-triggers.json", trigger, tmp_path / f"trigger{i}.json")


def _check_json(schema: Path, instance: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(instance))
    result = _run(_tool("check-jsonschema"), "--schemafile", str(schema), str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kustomization_lists_every_manifest_of_the_base() -> None:
    [kustomization] = _documents(BASE / "kustomization.yaml")
    manifests = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


def test_each_base_manifest_is_valid_on_its_own(tmp_path: Path) -> None:
    # Independent of kustomize: what the base says, before any overlay touches it.
    [kustomization] = _documents(BASE / "kustomization.yaml")
    objects = [o for name in kustomization["resources"] for o in _documents(BASE / name)]
    _validate(objects, tmp_path)


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_the_rendered_manifests_are_valid(directory: Path, tmp_path: Path) -> None:
    _validate(_kustomize(directory), tmp_path)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for one in objects:
        assert one["kind"] not in out, f"two {one['kind']} objects"
        out[one["kind"]] = one
    return out


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_the_manifests_agree_with_each_other_and_the_worker(directory: Path) -> None:
    kinds = _by_kind(_kustomize(directory))
    config = kinds["ConfigMap"]["data"]
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]

    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    grace = float(config.get("FORWARDER_SHUTDOWN_GRACE", Settings().shutdown_grace))
    assert pod["spec"]["terminationGracePeriodSeconds"] > _longest_stop(grace)

    [port] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert str(port["containerPort"]) == config["FORWARDER_METRICS_PORT"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == config["FORWARDER_METRICS_PORT"]
    # Annotated once: on the Service as well, the usual pair of scrape jobs counts twice.
    service = kinds["Service"]["metadata"].get("annotations", {})
    assert not any(key.startswith("prometheus.io/") for key in service)

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    user = _one("USER").split(":")[0]
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == user
    assert {"requests", "limits"} <= container["resources"].keys()

    for selector_owner in (kinds["PodDisruptionBudget"], kinds["Service"]):
        selector = selector_owner["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items()

    env_sources = {next(iter(s.values()))["name"] for s in container["envFrom"] if len(s) == 1}
    assert kinds["ConfigMap"]["metadata"]["name"] in env_sources
    auth = kinds["TriggerAuthentication"]
    [secret_ref] = auth["spec"]["secretTargetRef"]
    assert secret_ref["name"] in env_sources
    assert secret_ref["key"] == "FORWARDER_REDIS_PASSWORD"
    if "Secret" in kinds:
        assert secret_ref["key"] in kinds["Secret"]["data"]

    scaled = kinds["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] >= 1, "delayed retries need a live worker"
    assert scaled["maxReplicaCount"] >= scaled["minReplicaCount"]
    [trigger] = scaled["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    queue = config.get("FORWARDER_QUEUE", Settings().queue)
    assert trigger["metadata"]["listName"] == Keys(queue).queue
    url = urlsplit(config["FORWARDER_REDIS_URL"])
    if trigger["type"] == "redis":
        assert trigger["metadata"]["address"] == url.netloc.rpartition("@")[2]
        assert trigger["metadata"]["databaseIndex"] == url.path.strip("/")
    else:
        assert url.scheme == "redis+sentinel"
        assert trigger["metadata"]["addresses"] == url.netloc.rpartition("@")[2]
        assert trigger["metadata"]["sentinelMaster"] == url.path.strip("/").split("/")[0]


# --- FORWARDER_* names everywhere -----------------------------------------------------


def _names_in_k8s() -> set[str]:
    names: set[str] = set()
    for path in K8S.rglob("*.yaml"):
        names |= set(ENV_NAME.findall(path.read_text()))
    return names


def _documented() -> set[str]:
    return set(re.findall(r"^#?\s*(FORWARDER_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))


@pytest.mark.parametrize(
    ("where", "names"),
    [
        ("docker-compose.yml", lambda: set(ENV_NAME.findall(COMPOSE.read_text()))),
        (".env.example", _documented),
        ("deploy/Dockerfile", lambda: set(ENV_NAME.findall(DOCKERFILE.read_text()))),
        ("deploy/k8s", _names_in_k8s),
    ],
)
def test_every_forwarder_variable_named_is_a_real_setting(where: str, names: Any) -> None:
    found: set[str] = names()
    assert found, f"{where} names no setting at all"
    assert found - SETTINGS == set(), f"{where} names settings the forwarder does not have"


def test_env_example_documents_every_setting() -> None:
    assert SETTINGS - _documented() == set()


def test_env_example_shows_the_real_defaults() -> None:
    # A commented line shows the default; it must not drift from the code's.
    shown = re.findall(r"^#\s*(FORWARDER_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    assert shown
    for variable, value in shown:
        name = variable.removeprefix("FORWARDER_").lower()
        default = Settings.model_fields[name].default
        if value == "":
            assert default is None, f"{variable} has a default: show it"
        else:
            assert getattr(Settings(**{name: value}), name) == default, variable

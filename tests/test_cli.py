"""The ``forwarder`` command as a user runs it: enqueue, schema, demo, bad settings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from pydantic import ValidationError

from forwarder import demo, embedded, logs
from forwarder.demo import samples
from forwarder.embedded import RedisServer, free_port
from forwarder.model import SessionUpdate
from forwarder.queue import Keys
from forwarder.settings import Settings
from tests.support import forwarder

QUEUE = Keys("forwarder").queue
GOOD = {"accountId": "123", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}


def test_enqueue_reports_each_invalid_line_and_enqueues_the_valid_ones(
    redis_url: str, tmp_path: Path
) -> None:
    lines = [
        orjson.dumps({**GOOD, "id": "a"}),
        b"{not json",
        orjson.dumps({**GOOD, "body": {}}),
        b"",
        orjson.dumps([1]),
        orjson.dumps({**GOOD, "id": "b", "sesionId": "typo"}),
        orjson.dumps({**GOOD, "id": "c"}),
    ]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = forwarder("enqueue", str(path), "--redis-url", redis_url)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "line 2: (root): not valid JSON" in err
    assert "line 3: body.pageId: Field required" in err
    assert "line 5: (root): a wire message must be a JSON object" in err
    assert "line 6: sesionId: Extra inputs are not permitted" in err
    assert "enqueued 2, invalid 4" in err
    client = redis.Redis.from_url(redis_url)
    queued = [orjson.loads(r)["id"] for r in reversed(client.lrange(QUEUE, 0, -1))]
    client.close()
    assert queued == ["a", "c"]


def test_enqueue_from_stdin_in_batches(redis_url: str) -> None:
    data = b"\n".join(orjson.dumps({**GOOD, "id": str(i)}) for i in range(2500))
    result = forwarder("enqueue", "-", "--redis-url", redis_url, stdin=data)
    assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(redis_url)
    queued = [orjson.loads(r)["id"] for r in reversed(client.lrange(QUEUE, 0, -1))]
    client.close()
    assert queued == [str(i) for i in range(2500)]


def test_enqueue_refuses_what_the_workers_max_message_bytes_would_dead_letter(
    redis_url: str,
) -> None:
    big = {**GOOD, "id": "big", "body": {"pageId": "p" * 5000}}
    data = orjson.dumps(big) + b"\n" + orjson.dumps({**GOOD, "id": "small"})
    result = forwarder(
        "enqueue", "-", "--redis-url", redis_url, stdin=data, FORWARDER_MAX_MESSAGE_BYTES="4096"
    )
    assert result.returncode == 1
    assert b"line 1: (root): message is" in result.stderr
    assert b"over the 4096-byte cap" in result.stderr
    client = redis.Redis.from_url(redis_url)
    queued = [orjson.loads(r)["id"] for r in client.lrange(QUEUE, 0, -1)]
    client.close()
    assert queued == ["small"]


def test_enqueue_refuses_an_integer_past_64_bits_rather_than_round_it(redis_url: str) -> None:
    def line(n: str, id_: str) -> bytes:
        body = b'{"pageId":"p","n":' + n.encode() + b"}"
        return orjson.dumps({**GOOD, "id": id_, "body": {}}).replace(b"{}", body) + b"\n"

    data = (
        line("123456789012345678901234567890", "huge")
        + line("-9223372036854775809", "below")
        + line("18446744073709551615", "12345678901234567890123")  # u64 max; a long id
    )
    result = forwarder("enqueue", "-", "--redis-url", redis_url, stdin=data)
    assert result.returncode == 1
    assert result.stderr.count(b"cannot be encoded as JSON") == 2
    client = redis.Redis.from_url(redis_url)
    queued = [orjson.loads(r) for r in client.lrange(QUEUE, 0, -1)]
    client.close()
    assert [(m["id"], m["body"]["n"]) for m in queued] == [
        ("12345678901234567890123", 18446744073709551615)
    ]


def _enqueue_from_a_pipe(redis_url: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", "enqueue", "-", "--redis-url", redis_url],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean,
    )


def _write_lines(proc: subprocess.Popen[bytes], ids: range) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"".join(orjson.dumps({**GOOD, "id": str(i)}) + b"\n" for i in ids))
    proc.stdin.flush()


def _wait_for_length(client: redis.Redis, n: int) -> None:
    deadline = time.monotonic() + 30
    while client.llen(QUEUE) < n:
        assert time.monotonic() < deadline, f"{client.llen(QUEUE)} of {n} enqueued"
        time.sleep(0.05)


def test_enqueue_from_a_slow_pipe_sends_lines_as_it_goes_quiet_and_all_on_sigterm(
    redis_url: str,
) -> None:
    # A producer piping updates as they come (tail -f): they used to wait for 10,000
    # more lines, and a SIGTERM (as a supervisor sends) dropped them.
    proc = _enqueue_from_a_pipe(redis_url)
    client = redis.Redis.from_url(redis_url)
    _write_lines(proc, range(5))
    _wait_for_length(client, 5)  # sent with the pipe still open, once it went quiet
    _write_lines(proc, range(5, 8))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    landed = client.llen(QUEUE)
    client.close()
    # Each line read went out; those not read yet are still in the pipe, not lost here.
    assert landed in (5, 8)
    assert f"enqueued {landed}, invalid 0".encode() in err


def test_enqueue_names_the_lines_it_cannot_know_landed_when_redis_goes(
    own_redis: RedisServer,
) -> None:
    proc = _enqueue_from_a_pipe(own_redis.url)
    client = redis.Redis.from_url(own_redis.url)
    _write_lines(proc, range(5))
    _wait_for_length(client, 5)
    client.close()
    own_redis.stop()
    _write_lines(proc, range(5, 10))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert b"lines 6-10: not known to be enqueued" in err
    assert b"stopped after line 10" in err
    assert b"enqueued 5, invalid 0" in err


def test_enqueue_names_the_lines_redis_refused(own_redis: RedisServer) -> None:
    client = redis.Redis.from_url(own_redis.url)
    client.config_set("maxmemory", "3mb")  # noeviction: full, it refuses writes
    data = b"\n".join(orjson.dumps({**GOOD, "id": f"{i:05}"}) for i in range(30_000))
    result = forwarder("enqueue", "-", "--redis-url", own_redis.url, stdin=data)
    err = result.stderr.decode()
    landed = client.llen(QUEUE)
    client.close()
    assert result.returncode == 1
    assert "Redis refused: OutOfMemoryError" in err
    assert 0 < landed < 30_000
    # What landed is counted; what did not is named, so the rest can be sent again.
    assert f"enqueued {landed}, invalid 0" in err
    refused = [tuple(map(int, m)) for m in re.findall(r"lines (\d+)-(\d+): not enqueued", err)]
    [stopped] = map(int, re.findall(r"stopped after line (\d+)", err))
    unread = 30_000 - stopped
    assert sum(last - first + 1 for first, last in refused) + unread == 30_000 - landed


def test_enqueue_of_a_missing_file_says_so(tmp_path: Path) -> None:
    result = forwarder("enqueue", str(tmp_path / "missing.ndjson"))
    assert result.returncode == 2
    assert b"cannot read" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["stats"], ["enqueue", "-"], ["dlq", "stats"]])
def test_a_redis_cluster_down_is_said_in_one_line(command: list[str]) -> None:
    # redis-py's cluster client raises RedisClusterException here, which is no RedisError.
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = forwarder(
        *command, stdin=orjson.dumps(GOOD), FORWARDER_REDIS_URL=url, FORWARDER_REDIS_CLUSTER="true"
    )
    assert result.returncode == 3
    assert b"cannot reach Redis" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["worker"], ["stats"], ["enqueue", "-"]])
def test_a_password_redis_refuses_is_a_setting_to_fix(tmp_path: Path, command: list[str]) -> None:
    # redis-py raises it as a ConnectionError: a worker took it for an outage and waited
    # for ever, saying only "AuthenticationError" now and then.
    with RedisServer(tmp_path / "auth", password="right") as server:
        wrong = server.url.replace(":right@", ":wrong@")
        result = forwarder(
            *command,
            stdin=orjson.dumps(GOOD),
            FORWARDER_REDIS_URL=wrong,
            FORWARDER_METRICS_PORT="0",
        )
    assert result.returncode == 2
    assert b"Redis refused the credentials or the TLS settings" in result.stderr
    assert b"Traceback" not in result.stderr


def test_a_database_number_redis_has_not_is_a_refusal(redis_server: RedisServer) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/99"  # past the default 16 databases
    result = forwarder("stats", FORWARDER_REDIS_URL=url)
    assert result.returncode == 1
    assert b"Redis refused: ResponseError: DB index is out of range" in result.stderr


def test_a_schema_whose_reader_left_is_no_traceback() -> None:
    unread, stdout = os.pipe()
    os.close(unread)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as from a shell
    proc = subprocess.run(
        [sys.executable, "-m", "forwarder", "schema"],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
        check=False,
    )
    os.close(stdout)
    assert (proc.returncode, proc.stderr) == (0, b"")


@pytest.mark.parametrize("command", [["worker"], ["stats"], ["enqueue", "-"]])
def test_the_cluster_flag_against_a_lone_redis_is_a_setting_refused(
    redis_url: str, command: list[str]
) -> None:
    # No outage to wait out: a worker that waited would hide the cause for good.
    result = forwarder(
        *command,
        stdin=orjson.dumps(GOOD),
        FORWARDER_REDIS_URL=redis_url,
        FORWARDER_REDIS_CLUSTER="true",
        FORWARDER_METRICS_PORT="0",
    )
    assert result.returncode == 2
    assert b"FORWARDER_REDIS_CLUSTER is set, but:" in result.stderr
    assert b"Cluster mode is not enabled on this node" in result.stderr
    assert b"Traceback" not in result.stderr


def test_enqueue_with_redis_down_says_so() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = forwarder("enqueue", "-", "--redis-url", url, stdin=orjson.dumps(GOOD))
    assert result.returncode == 3
    assert b"cannot reach Redis" in result.stderr


def test_schema_is_the_wire_message_schema() -> None:
    result = forwarder("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "Forwarder session update"
    assert set(schema["required"]) == {"accountId", "visitorId", "sessionId", "body"}
    assert (
        schema["properties"].keys()
        == SessionUpdate.model_json_schema(by_alias=True)["properties"].keys()
    )


def test_bad_settings_are_refused_clearly() -> None:
    result = forwarder("worker", FORWARDER_RETRY_DELAYS="5,soon")
    assert result.returncode == 2
    assert b"invalid settings" in result.stderr
    assert b"retry_delays" in result.stderr


def test_a_breaker_that_could_never_open_is_refused() -> None:
    # More calls than its window holds: it would never see enough to open.
    result = forwarder("worker", FORWARDER_BREAKER_WINDOW="5", FORWARDER_BREAKER_MIN_CALLS="10")
    assert result.returncode == 2
    assert b"breaker_min_calls must be at most breaker_window" in result.stderr


@pytest.mark.parametrize("setting", ["api_base_url", "domain_api_url"])
@pytest.mark.parametrize(
    "base", ["127.0.0.1:8080", "ftp://host", "http://host:port", "http://svc:s3cret@host"]
)
def test_an_api_url_that_cannot_serve_is_refused_without_echoing_it(
    setting: str, base: str
) -> None:
    # Taken as is, each made every PUT (or domain lookup) fail, retried, then
    # dead-lettered, or logged the credentials with every breaker event.
    env: dict[str, Any] = {f"FORWARDER_{setting.upper()}": base}
    result = forwarder("worker", **env)
    assert result.returncode == 2
    assert setting.encode() in result.stderr
    assert b"s3cret" not in result.stderr


@pytest.mark.parametrize(
    "values",
    [
        {"retry_delays": "5,nan"},  # the settle script failed: the message was lost
        {"retry_delays": "inf"},  # parked for good
        {"max_retry_after": float("inf")},
        # An update could take its session's turn from an older one waiting out a retry.
        {"ordering": "session", "turn_timeout": 2.0},
        # Its cool-down shrank after a failed probe, where it should double.
        {"breaker_cooldown": 30.0, "breaker_max_cooldown": 5.0},
    ],
    ids=["nan_delay", "inf_delay", "inf_retry_after", "turn_shorter_than_waits", "cooldown_cap"],
)
def test_settings_that_would_lose_or_reorder_messages_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)


def test_an_empty_domain_api_url_means_its_default() -> None:
    default = Settings.model_fields["domain_api_url"].default
    assert Settings(domain_api_url="", metrics_port=0).domain_api_url == default


def test_an_empty_api_base_url_means_domain_lookups() -> None:
    # As an env file gets it by uncommenting `FORWARDER_API_BASE_URL=`.
    assert Settings(api_base_url="").api_base_url is None


def _leftover_servers(data_dir: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if str(data_dir) in line]


def test_demo_runs_the_whole_flow_on_a_private_redis(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    result = forwarder("demo", "--count", "60", cwd=tmp_path, FORWARDER_REDIS_URL=nowhere)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "enqueued 60 sample updates and 3 malformed elements" in out
    assert "done." in out
    delivered = [u for u in samples(60) if u["visitorId"].startswith(("ok-", "flaky"))]
    assert f"delivered:      {len(delivered)}\n" in out
    assert "invalid_message" in out
    assert "Try next" in out
    assert (tmp_path / ".forwarder-demo" / "samples.ndjson").exists()
    assert _leftover_servers(tmp_path / ".forwarder-demo") == []


def test_demo_leaves_a_real_queue_alone(tmp_path: Path, redis_url: str) -> None:
    real = Keys("prod")
    client = redis.Redis.from_url(redis_url)
    client.lpush(real.queue, b"pending")
    client.zadd(real.delayed, {b"waiting": 1.0})
    client.lpush(real.dead, b"dead")
    # A worker's environment names its queue: the demo keeps to its own all the same.
    ran = forwarder(
        "demo", "--count", "5", cwd=tmp_path, FORWARDER_REDIS_URL=redis_url, FORWARDER_QUEUE="prod"
    )
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    assert "(queue 'forwarder-demo')" in ran.stdout.decode()
    # Named on its command line, a queue with messages in it is refused.
    refused = forwarder(
        "demo", "--count", "5", "--queue", "prod", cwd=tmp_path, FORWARDER_REDIS_URL=redis_url
    )
    assert refused.returncode == 2
    assert b"holds messages or has workers" in refused.stderr
    assert client.lrange(real.queue, 0, -1) == [b"pending"]
    assert client.zrange(real.delayed, 0, -1) == [b"waiting"]
    assert client.lrange(real.dead, 0, -1) == [b"dead"]
    # A live queue drained empty still has its workers, which would send the demo's
    # updates to the real API.
    client.delete(real.queue, real.delayed, real.dead)
    client.zadd(real.workers, {"host:1:abc": 1.0})
    live = forwarder(
        "demo", "--count", "5", "--queue", "prod", cwd=tmp_path, FORWARDER_REDIS_URL=redis_url
    )
    assert live.returncode == 2
    assert client.zrange(real.workers, 0, -1) == [b"host:1:abc"]
    client.close()


def test_demo_refuses_its_own_queue_while_a_worker_serves_it(
    tmp_path: Path, redis_url: str
) -> None:
    # A worker on forwarder-demo (the demo's closing hint shows how to start one) took
    # the demo's updates to its own API, and the demo waited for them for ever.
    demo = Keys("forwarder-demo")
    client = redis.Redis.from_url(redis_url)
    seconds, _ = client.time()
    client.zadd(demo.workers, {"host:1:live": seconds})
    try:
        refused = forwarder("demo", "--count", "5", cwd=tmp_path, FORWARDER_REDIS_URL=redis_url)
        assert refused.returncode == 2
        assert b"has workers" in refused.stderr
        # One that stopped heartbeating long ago (a killed run's) does not count.
        client.zadd(demo.workers, {"host:1:live": seconds - 3600})
        ran = forwarder("demo", "--count", "5", cwd=tmp_path, FORWARDER_REDIS_URL=redis_url)
        assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    finally:
        client.delete(demo.workers)
        client.close()


def test_a_demo_with_no_redis_to_reach_or_start_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_binary() -> str:
        raise embedded.ServerNotFound("no Redis server binary found: install redis-server")

    monkeypatch.setattr(embedded, "find_server_binary", no_binary)
    # In this process: the demo's log set-up (a file it closes) must not outlive it.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", metrics_port=0)
    assert demo.run(settings, count=5) == 3
    assert capsys.readouterr().err == (
        "forwarder: no Redis answers at the configured URL, and no Redis server binary "
        "found: install redis-server\n"
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("when", [b"redis:", b"delivered"])
def test_a_stopped_demo_leaves_nothing_running(tmp_path: Path, sig: int, when: bytes) -> None:
    # A kill or a closed terminal left the demo's private Redis running, and the next
    # run started a second server on the same files.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    clean["FORWARDER_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "demo", "--count", "300"],
        cwd=tmp_path,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the private Redis, or the worker, is running
        if line.startswith(when):
            break
    time.sleep(0.3)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    if when == b"delivered":
        assert b"stopped early" in out
    assert _leftover_servers(tmp_path / ".forwarder-demo") == []

"""The benchmark itself: starts Redis, the stand-in API and the contenders, measures.

See ``bench/README.md`` for what each mode measures and how. Everything binds to
127.0.0.1; every process it starts is stopped before it returns (also on Ctrl-C/SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import procs
from bench.common import ACCOUNT, update
from bench.procs import Child, Children, wait_for
from forwarder.demo import DOCS_EXAMPLE_BODY
from forwarder.embedded import RedisServer
from forwarder.producer import SyncProducer, encode_many

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
QUEUE_NAME = "forwarder"
TAG = "{" + QUEUE_NAME + "}"
QUEUE_KEY = f"{TAG}:queue"
WORKERS_KEY = f"{TAG}:workers"
DELAYED_KEY = f"{TAG}:delayed"
DEAD_KEY = f"{TAG}:dead"
# Harness-only Redis commands inside a measured window; the worker never issues these,
# so they are left out of the per-message command count by name.
HARNESS_ONLY = {"info", "llen", "hlen", "zcard", "ping", "flushall", "config|resetstat"}

TARGETS = {
    "ratio": 0.85,
    "cmds_per_msg": 0.5,
    "latency_p50_ms": 3.0,
    "latency_p99_ms": 15.0,
    "enqueue_msgs_per_s": 100_000.0,
    "memory_peak_mb": 80.0,
    "retry_p99_late_ms": 50.0,
}


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived: unwind and stop everything."""


def _on_signal(signum: int, frame: object) -> None:
    # Once is enough: a second Ctrl-C must not cut the clean-up short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


# --- small helpers -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _mb(kb: float) -> float:
    return kb / 1024


class ApiControl:
    """The stand-in's control endpoints, over one keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def _call(self, method: str, path: str) -> Any:
        for attempt in range(2):
            try:
                self.conn.request(method, path)
                resp = self.conn.getresponse()
                data = resp.read()
                return orjson.loads(data)
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def reset(self, target: int = 0) -> None:
        self._call("POST", f"/_bench/reset?target={target}")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_bench/stats")
        return result

    def events(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_bench/events")
        return result

    def close(self) -> None:
        self.conn.close()


def command_calls(r: redis.Redis) -> dict[str, int]:
    """``INFO commandstats``: calls per command (Lua-internal calls included)."""
    info: dict[str, Any] = r.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        for name, stat in info.items()
        if isinstance(stat, dict)
    }


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in out.items() if v > 0 and k not in HARNESS_ONLY}


# --- the environment: Redis, the API, workers -----------------------------------------


@dataclass
class Env:
    args: argparse.Namespace
    tmp: Path
    children: Children
    server: RedisServer
    r: redis.Redis
    api: Child
    api_base: str
    control: ApiControl
    processes_flag: bool
    notes: list[str] = field(default_factory=list)

    @property
    def redis_pid(self) -> int:
        pid = self.server.pid
        assert pid is not None
        return pid

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env.update(
            FORWARDER_REDIS_URL=self.server.url,
            FORWARDER_API_BASE_URL=self.api_base,
            FORWARDER_CONCURRENCY=str(self.args.concurrency),
            FORWARDER_LOG_LEVEL="warning",
            FORWARDER_METRICS_PORT="0",
            FORWARDER_QUEUE=QUEUE_NAME,
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start_workers(
        self,
        processes: int,
        *,
        idle: bool = True,
        probe: bool = False,
        extra: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> list[Child]:
        """``processes`` worker processes (or one with ``--processes``), registered.

        With ``idle``, also wait until each is blocked on its empty queue (ready, no
        start-up work left); otherwise only until registered (the queue may be full).
        ``wrap``: a command to run each worker under (valgrind).
        """
        env = self.worker_env(**(extra or {}))
        # The probe is `forwarder worker` itself, plus the BENCH_* knobs in ``extra``.
        module = ["bench.worker_probe"] if probe else ["forwarder", "worker"]
        argv = [*wrap, PY, "-m", *module]
        if self.processes_flag and processes > 1:
            started = [
                self.children.start(
                    f"worker-p{processes}",
                    [*argv, "--processes", str(processes)],
                    env=env,
                    cwd=ROOT,
                )
            ]
        else:
            started = [
                self.children.start(f"worker{i + 1}of{processes}", argv, env=env, cwd=ROOT)
                for i in range(processes)
            ]

        def ready() -> bool:
            for child in started:
                if not child.alive():
                    raise RuntimeError(
                        f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}"
                    )
            registered = int(self.r.zcard(WORKERS_KEY))
            blocked = int(self.r.info("clients").get("blocked_clients", 0))
            return registered >= processes and (blocked >= processes or not idle)

        wait_for(ready, ready_timeout, f"{processes} idle worker(s)", interval=0.05)
        return started

    def stop_workers(self, workers: list[Child], timeout: float = 30.0) -> list[int | None]:
        return [self.children.stop(w, timeout=timeout) for w in workers]

    def wait_quiet(self) -> float:
        """Wait (up to ``--quiet-wait`` s) until other processes use < 0.25 CPU.

        Other people's test runs on a shared 2-core machine skew every figure; each run
        still reports the foreign load it saw. Returns the last load measured, in CPUs.
        """
        deadline = time.monotonic() + self.args.quiet_wait
        calm = 0
        foreign = 0.0
        while time.monotonic() < deadline:
            load = Load(self)
            time.sleep(0.5)
            foreign = load.stop()["foreign_cpus"]
            calm = calm + 1 if foreign < 0.25 else 0
            if calm >= 2:
                break
        else:
            self.notes.append(f"ran with {foreign:.2f} CPU of foreign load")
        return foreign

    def fresh(self) -> None:
        self.r.flushall()
        self.control.reset(0)

    def inflight_keys(self) -> list[bytes]:
        keys: list[bytes] = []
        for worker in self.r.zrange(WORKERS_KEY, 0, -1):
            wid = worker.decode() if isinstance(worker, bytes) else str(worker)
            keys.append(f"{TAG}:inflight:{wid}".encode())
        return keys

    def settled(self, keys: list[bytes]) -> bool:
        """Queue empty and nothing in flight (LLEN/HLEN only: left out of the count)."""
        if int(self.r.llen(QUEUE_KEY)) != 0:
            return False
        for key in keys:
            pending = self.r.hlen(key)
            if int(pending) != 0:
                return False
        return True


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    tmp = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    children = Children(tmp)
    server = RedisServer(tmp / "redis", appendonly=False)
    control: ApiControl | None = None
    r: redis.Redis | None = None
    ok = False
    try:
        server.start()
        r = redis.Redis.from_url(server.url, socket_timeout=60)
        api_argv = [PY, "-m", "bench.api", "--kind", args.api]
        if args.api_uvloop:
            api_argv.append("--uvloop")
        api = children.start("api", api_argv, cwd=ROOT, stdout_pipe=True)
        assert api.proc.stdout is not None
        line = api.proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "READY":
            raise RuntimeError(f"stand-in API did not start:\n{api.log_tail()}")
        port = int(line[1])
        control = ApiControl(port)
        help_text = subprocess.run(
            [PY, "-m", "forwarder", "worker", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        yield Env(
            args=args,
            tmp=tmp,
            children=children,
            server=server,
            r=r,
            api=api,
            api_base=f"http://127.0.0.1:{port}",
            control=control,
            processes_flag="--processes" in help_text,
        )
        ok = True
    finally:
        if control is not None:
            control.close()
        children.stop_all()
        if r is not None:
            r.close()
        server.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _progress(f"logs of the processes started are kept in {tmp}")


# --- throughput ------------------------------------------------------------------------


def wire_messages(n: int) -> list[bytes]:
    """N wire messages (validated, id and enqueuedAt set) as the Python producer makes."""
    _, wire = encode_many(update(i) for i in range(n))
    return wire


def _wait_count(env: Env, n: int, timeout: float, watch: Sequence[Child]) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = env.control.stats()
        if stats["count"] >= n:
            return stats
        for child in watch:
            if not child.alive():
                raise RuntimeError(f"{child.name} died:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"API saw {stats['count']} of {n} requests after {timeout:g}s")
        time.sleep(0.02)


class Load:
    """CPU used in a window: by the machine, and by the processes we know of."""

    def __init__(self, env: Env, roots: Sequence[int] = ()) -> None:
        self.env, self.roots = env, list(roots)
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        return {
            "wall": time.monotonic(),
            "busy": procs.machine_busy(),
            "mine": procs.self_and_reaped_cpu(),
            "roots": procs.tree_cpu(self.roots),
            "api": procs.cpu_seconds(self.env.api.pid),
            "redis": procs.cpu_seconds(self.env.redis_pid),
        }

    def stop(self) -> dict[str, float]:
        """CPU seconds per part since the start; ``foreign_cpus``: others' load, in CPUs."""
        end = self._read()
        d = {k: end[k] - self.start[k] for k in end}
        ours = d["mine"] + d["roots"] + d["api"] + d["redis"]
        d["foreign_cpus"] = max(0.0, d["busy"] - ours) / d["wall"]
        return d


def _json_child(env: Env, name: str, argv: list[str], what: str, *, timeout: float = 30.0) -> Any:
    """Run ``argv`` to its end and return the JSON it printed; raise if it failed."""
    child = env.children.start(name, argv, cwd=ROOT, stdout_pipe=True)
    assert child.proc.stdout is not None
    out = child.proc.stdout.read()
    code = env.children.stop(child, timeout=timeout)
    if code != 0:
        raise RuntimeError(f"{what} failed ({code}):\n{child.log_tail()}")
    return orjson.loads(out)


def run_ceiling(env: Env, n: int, *, uvloop: bool = False) -> dict[str, Any]:
    env.wait_quiet()
    env.control.reset(n)
    load = Load(env)
    argv = [PY, "-m", "bench.ceiling", "--base", env.api_base, "--n", str(n)]
    argv += ["--concurrency", str(env.args.concurrency)]
    if uvloop:
        argv.append("--uvloop")
    own = _json_child(env, "ceiling", argv, "ceiling client")
    used = load.stop()
    stats = env.control.stats()
    elapsed = stats["target_at"] - stats["first_at"]
    return {
        "contender": "ceiling + uvloop" if uvloop else "ceiling",
        "n": n,
        "count": stats["count"],
        "statuses": stats["statuses"],
        "elapsed": elapsed,
        "msgs_per_s": (n - 1) / elapsed,
        "client_elapsed": own["elapsed"],
        "cpu_per_1k": own["cpu"] / n * 1000,
        "peak_rss_mb": _mb(own["hwm_kb"]),
        "cmds_per_msg": None,
        "api_cpu_per_1k": used["api"] / n * 1000,
        "api_util": used["api"] / own["elapsed"],
        "redis_cpu_per_1k": None,
        "other_load_cpus": used["foreign_cpus"],
    }


def run_forwarder(
    env: Env,
    wire: list[bytes],
    processes: int,
    profile: Path | None = None,
    probe: dict[str, str] | None = None,
    label: str | None = None,
    settings: dict[str, str] | None = None,
    wrap: Sequence[str] = (),
    slow: float = 1.0,
) -> dict[str, Any]:
    """Idle worker(s) first, then one LPUSH of all N; timed by the API's clock.

    ``probe``: run the worker through :mod:`bench.worker_probe` with these BENCH_* knobs.
    ``settings``: FORWARDER_* variables for the worker (e.g. session ordering).
    ``wrap``: a command to run the worker under, which makes it ``slow`` times slower
    (every wait is stretched by that much).
    """
    n = len(wire)
    env.fresh()
    env.wait_quiet()
    workers = env.start_workers(
        processes,
        probe=probe is not None,
        extra={**(probe or {}), **(settings or {})},
        wrap=wrap,
        ready_timeout=60.0 * slow,
    )
    roots = [w.pid for w in workers]
    spy: subprocess.Popen[bytes] | None = None
    try:
        env.control.reset(n)
        keys = env.inflight_keys()
        if profile is not None:
            spy = _start_py_spy(
                roots[0],
                profile,
                subprocesses=env.processes_flag,
                native=".native." in profile.name,
            )
        calls0 = command_calls(env.r)
        load = Load(env, roots)
        pushed_at = time.time()
        env.r.lpush(QUEUE_KEY, *wire)
        stats = _wait_count(env, n, timeout=max(120.0, n / 200) * slow, watch=workers)
        wait_for(lambda: env.settled(keys), 60 * slow, "the queue to settle", interval=0.005)
        settled_at = time.time()
        used = load.stop()
        cpu, api_cpu, redis_cpu = used["roots"], used["api"], used["redis"]
        calls = calls_delta(calls0, command_calls(env.r))
        calls["lpush"] = calls.get("lpush", 0) - 1  # the harness's own LPUSH
        hwm = procs.tree_hwm_kb(roots)
        dead = int(env.r.llen(DEAD_KEY))
        delayed = int(env.r.zcard(DELAYED_KEY))
    finally:
        if spy is not None:
            _stop_py_spy(spy)
        codes = env.stop_workers(workers, timeout=30.0 * slow)
    elapsed = stats["target_at"] - stats["first_at"]
    total_calls = sum(calls.values())
    return {
        "contender": label or f"forwarder p{processes}",
        "processes": processes,
        "n": n,
        "count": stats["count"],
        "statuses": stats["statuses"],
        "dead": dead,
        "delayed": delayed,
        "elapsed": elapsed,
        "msgs_per_s": (n - 1) / elapsed,
        "first_request_after_push_ms": (stats["first_at"] - pushed_at) * 1000,
        "settled_after_last_request_ms": (settled_at - stats["target_at"]) * 1000,
        "cpu_per_1k": cpu / n * 1000,
        "peak_rss_mb": _mb(max(hwm)),
        "peak_rss_sum_mb": _mb(sum(hwm)),
        "cmds_per_msg": total_calls / n,
        "cmds_by_command": {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        "api_cpu_per_1k": api_cpu / n * 1000,
        "api_util": api_cpu / (settled_at - pushed_at),
        "redis_cpu_per_1k": redis_cpu / n * 1000,
        "other_load_cpus": used["foreign_cpus"],
        "exit_codes": codes,
    }


def _start_py_spy(
    pid: int, out: Path, *, subprocesses: bool, native: bool = False
) -> subprocess.Popen[bytes]:
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
    argv = ["py-spy", "record", "--pid", str(pid), "--rate", "250"]
    argv += ["--format", fmt, "-o", str(out)]
    if subprocesses:
        argv.append("--subprocesses")
    if native:
        argv.append("--native")
    spy_bin = Path(PY).parent / "py-spy"
    if spy_bin.exists():
        argv[0] = str(spy_bin)
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0
    )
    time.sleep(1.0)  # let it attach before the work starts
    return proc


def _stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mode_throughput(env: Env) -> dict[str, Any]:
    args = env.args
    wire = wire_messages(args.n)
    runs: list[dict[str, Any]] = []
    order = ["ceiling", *[f"p{p}" for p in args.processes]]
    if args.ordering:
        order.append("ordered")
    for round_no in range(1, args.repeat + 1):
        for name in order:
            if name == "ceiling":
                result = run_ceiling(env, args.n)
            elif name == "ordered":
                # Every message its own session: what the turn bookkeeping itself costs.
                result = run_forwarder(
                    env,
                    wire,
                    1,
                    label="forwarder p1 ordered",
                    settings={"FORWARDER_ORDERING": "session"},
                )
            else:
                result = run_forwarder(env, wire, int(name[1:]))
            result["round"] = round_no
            runs.append(result)
            _progress(
                f"  round {round_no} {result['contender']:<13} {result['msgs_per_s']:8.0f} msg/s"
            )
    summary: dict[str, Any] = {}
    ceilings = [r["msgs_per_s"] for r in runs if r["contender"] == "ceiling"]
    for name in {r["contender"] for r in runs}:
        mine = [r for r in runs if r["contender"] == name]
        rates = [r["msgs_per_s"] for r in mine]
        entry: dict[str, Any] = {
            "median_msgs_per_s": statistics.median(rates),
            "min_msgs_per_s": min(rates),
            "max_msgs_per_s": max(rates),
            "ratio": statistics.median(rates) / statistics.median(ceilings),
        }
        for key in ("cpu_per_1k", "peak_rss_mb", "cmds_per_msg"):
            values = [r[key] for r in mine if r[key] is not None]
            entry[key] = statistics.median(values) if values else None
        summary[name] = entry
    return {"runs": runs, "summary": summary, "processes_flag": env.processes_flag}


# --- experiments: the same worker with runtime knobs, to size changes -------------------

EXPERIMENTS: dict[str, dict[str, str]] = {
    "fwd probe (GC timed)": {},
    # CPython's default thresholds in place of tune_gc's (20000, 50, 1000).
    "fwd gc default thresh": {"BENCH_GC_THRESHOLD": "700,10,10"},
    "fwd uvloop": {"BENCH_UVLOOP": "1"},
    # No validation, breaker or outcome decision: the queue's machinery alone.
    "fwd floor (no checks)": {"BENCH_FLOOR": "1"},
}


def mode_experiments(env: Env) -> dict[str, Any]:
    """Ceiling (plain, uvloop), the worker, and the worker under each runtime knob."""
    args = env.args
    wire = wire_messages(args.n)
    runs: list[dict[str, Any]] = []
    for round_no in range(1, args.repeat + 1):
        batch = [run_ceiling(env, args.n), run_ceiling(env, args.n, uvloop=True)]
        batch.append(run_forwarder(env, wire, 1))
        for label, knobs in EXPERIMENTS.items():
            gc_out = env.tmp / f"gc-{round_no}-{len(runs) + len(batch)}.json"
            result = run_forwarder(
                env, wire, 1, probe={**knobs, "BENCH_GC_OUT": str(gc_out)}, label=label
            )
            if gc_out.exists():
                gens = orjson.loads(gc_out.read_bytes())["generations"]
                result["gc"] = gens
                result["gc_s_per_1k"] = sum(g["seconds"] for g in gens.values()) / args.n * 1000
            batch.append(result)
        for result in batch:
            result["round"] = round_no
            _progress(
                f"  round {round_no} {result['contender']:<22} {result['msgs_per_s']:8.0f} msg/s"
                f"  CPU {result['cpu_per_1k']:.3f} s/1k"
            )
        runs += batch
    return {"runs": runs}


# --- latency and retry timing ---------------------------------------------------------


def _paced(rate: float, count: int) -> Iterator[int]:
    """Yield 0..count-1, each at its due time t0 + i/rate (never early)."""
    t0 = time.perf_counter() + 0.05
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


def mode_latency(env: Env) -> dict[str, Any]:
    args = env.args
    count = int(args.latency_rate * args.latency_seconds)
    env.fresh()
    env.wait_quiet()
    workers = env.start_workers(1)
    producer = SyncProducer.from_url(env.server.url, QUEUE_NAME)
    stamps: dict[str, float] = {}
    try:
        time.sleep(0.5)
        start = time.perf_counter()
        for i in _paced(args.latency_rate, count):
            stamp = time.time()
            vid = f"lat-{i}"
            body = {**DOCS_EXAMPLE_BODY, "pageId": f"{stamp:.6f}"}
            producer.enqueue(ACCOUNT, vid, f"s{i}", body)
            stamps[vid] = stamp
        achieved = count / (time.perf_counter() - start)
        deadline = time.monotonic() + 30
        while len(env.control.events()["lat"]) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        arrivals = {vid: at for vid, at in env.control.events()["lat"]}
    finally:
        producer.close()
        env.stop_workers(workers)
    lat_ms = [(arrivals[v] - s) * 1000 for v, s in stamps.items() if v in arrivals]
    if not lat_ms:
        raise RuntimeError("latency mode: no message arrived")
    return {
        "rate": args.latency_rate,
        "achieved_rate": achieved,
        "seconds": args.latency_seconds,
        "sent": count,
        "arrived": len(lat_ms),
        "p50_ms": percentile(lat_ms, 0.50),
        "p90_ms": percentile(lat_ms, 0.90),
        "p99_ms": percentile(lat_ms, 0.99),
        "max_ms": max(lat_ms),
        "mean_ms": statistics.fmean(lat_ms),
    }


def mode_retry(env: Env) -> dict[str, Any]:
    args = env.args
    count = int(args.retry_rate * args.retry_seconds)
    env.fresh()
    env.wait_quiet()
    workers = env.start_workers(1, extra={"FORWARDER_RETRY_DELAYS": "1"})
    producer = SyncProducer.from_url(env.server.url, QUEUE_NAME)
    try:
        time.sleep(0.5)
        mix = args.retry_healthy
        for i in _paced(args.retry_rate, count):
            # Healthy traffic alongside keeps the failure share (1 in 2 + mix attempts)
            # under the circuit breaker's threshold: this mode times the retry
            # scheduler, not the breaker.
            batch = [update(i, "flaky1-")] + [update(i * mix + k, "ok-") for k in range(mix)]
            producer.enqueue_many(batch)
        deadline = time.monotonic() + 30
        events = env.control.events()
        while len(events["ok"]) < count and time.monotonic() < deadline:
            time.sleep(0.1)
            events = env.control.events()
    finally:
        producer.close()
        env.stop_workers(workers)
    fail, ok = events["fail"], events["ok"]
    late_ms = [(ok[v] - (fail[v] + 1.0)) * 1000 for v in fail if v in ok]
    if not late_ms:
        raise RuntimeError("retry mode: no retry arrived")
    return {
        "rate": args.retry_rate,
        "healthy_per_flaky": args.retry_healthy,
        "statuses": env.control.stats()["statuses"],
        "sent": count,
        "failed_first": len(fail),
        "retried": len(late_ms),
        "extra_calls": events["flaky_extra_calls"],
        "p50_late_ms": percentile(late_ms, 0.50),
        "p99_late_ms": percentile(late_ms, 0.99),
        "max_late_ms": max(late_ms),
        "min_late_ms": min(late_ms),
    }


# --- producer ---------------------------------------------------------------------------


def mode_producer(env: Env, profile_dir: Path | None) -> dict[str, Any]:
    args = env.args
    env.fresh()
    env.wait_quiet()
    argv = [PY, "-m", "bench.producer_bench", "--redis-url", env.server.url]
    argv += ["--n", str(args.producer_n), "--batch", str(args.producer_batch)]
    if profile_dir is not None:
        argv += ["--profile-dir", str(profile_dir)]
    result: dict[str, Any] = _json_child(env, "producer", argv, "producer bench", timeout=300)
    return result


def mode_micro(env: Env) -> dict[str, Any]:
    env.wait_quiet()
    argv = [PY, "-m", "bench.micro"]
    result: dict[str, Any] = _json_child(env, "micro", argv, "micro bench", timeout=300)
    return result


# --- memory -----------------------------------------------------------------------------


def mode_memory(env: Env) -> dict[str, Any]:
    args = env.args
    n, seconds = args.memory_n, args.memory_seconds
    env.fresh()
    # The same canonical wire form as the producer's, with distinct ids and addresses.
    (template,) = wire_messages(1)
    base = orjson.loads(template)
    chunk = 10_000
    with env.r.pipeline(transaction=False) as pipe:
        for start in range(0, n, chunk):
            batch = [
                orjson.dumps(
                    {**base, "id": f"m{i:012d}", "visitorId": f"v{i}", "sessionId": f"s{i}"}
                )
                for i in range(start, min(n, start + chunk))
            ]
            pipe.lpush(QUEUE_KEY, *batch)
            if len(pipe) >= 10:
                pipe.execute()
        pipe.execute()
    queued = int(env.r.llen(QUEUE_KEY))
    redis_mem = env.r.info("memory").get("used_memory_human")
    samples: list[dict[str, float]] = []
    env.wait_quiet()
    t0 = time.monotonic()
    workers = env.start_workers(1, idle=False)
    roots = [w.pid for w in workers]
    try:
        for tick in range(1, int(seconds) + 1):
            delay = t0 + tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            count = env.control.stats()["count"]
            rss = procs.tree_rss_kb(roots)
            samples.append({"t": tick, "rss_mb": _mb(max(rss)), "delivered": count})
            if count >= n:
                break
        hwm = procs.tree_hwm_kb(roots)
    finally:
        env.stop_workers(workers)
    rss_series = [s["rss_mb"] for s in samples]
    third = max(1, len(rss_series) // 3)
    first, last = statistics.fmean(rss_series[:third]), statistics.fmean(rss_series[-third:])
    delivered = samples[-1]["delivered"] if samples else 0
    return {
        "queued": queued,
        "redis_used_memory": redis_mem,
        "seconds": len(samples),
        "delivered": delivered,
        "msgs_per_s": delivered / max(1, len(samples)),
        "peak_rss_mb": _mb(max(hwm)),
        "first_third_mean_mb": first,
        "last_third_mean_mb": last,
        "growth_pct": (last / first - 1) * 100,
        "flat": last <= first * 1.05 + 2.0,
        "samples": samples,
    }


# --- profiles ---------------------------------------------------------------------------


def mode_profile(env: Env, out_dir: Path) -> dict[str, Any]:
    """py-spy of the worker and of the ceiling client."""
    from bench.stacks import summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    n = env.args.profile_n
    wire = wire_messages(n)
    written: dict[str, Any] = {}
    name = "worker-throughput"
    raw = out_dir / f"{name}.raw.txt"
    result = run_forwarder(env, wire, 1, profile=raw, label=name)
    written[f"{name} (msg/s, CPU s/1k under py-spy)"] = (
        f"{result['msgs_per_s']:.0f}, {result['cpu_per_1k']:.3f}"
    )
    if raw.exists():
        summary = out_dir / f"{name}.summary.txt"
        summary.write_text(summarise(raw, us_per_msg=result["cpu_per_1k"] * 1000))
        written[f"{name} summary"] = str(summary)
        written[f"{name} raw"] = str(raw)
    for suffix in ("svg", "speedscope.json"):
        out = out_dir / f"worker-throughput.{suffix}"
        run_forwarder(env, wire, 1, profile=out)
        written[f"worker-throughput {suffix}"] = str(out)
    # The ceiling client, for comparison: what aiohttp alone costs per request.
    env.wait_quiet()
    env.control.reset(n)
    argv = [PY, "-m", "bench.ceiling", "--base", env.api_base, "--n", str(n)]
    spy_bin = Path(PY).parent / "py-spy"
    ceiling_raw = out_dir / "ceiling.raw.txt"
    spy_argv = [str(spy_bin), "record", "--rate", "250", "--format", "raw"]
    spy_argv += ["-o", str(ceiling_raw), "--", *argv]
    child = env.children.start("ceiling-py-spy", spy_argv, cwd=ROOT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(300)
    env.children.stop(child)
    if ceiling_raw.exists():
        us_per_msg = None
        for line in reversed(child.log_tail(50).splitlines()):
            if line.startswith('{"elapsed"'):
                us_per_msg = orjson.loads(line)["cpu"] / n * 1e6
                break
        summary = out_dir / "ceiling.summary.txt"
        summary.write_text(summarise(ceiling_raw, us_per_msg=us_per_msg))
        written["ceiling summary"] = str(summary)
        written["ceiling raw"] = str(ceiling_raw)
    return written


# --- output -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    # The core changes under a benchmark: say exactly which sources were measured.
    digest = hashlib.sha1()
    for source in sorted((ROOT / "forwarder").glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "forwarder_sources_sha1": digest.hexdigest()[:12],
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": server.split(" sha=")[0],
        "git_head": head,
        "git_modified_files": len(dirty),
    }


def _with_round_ratios(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float | None]]:
    """Each run with its msg/s over its own round's ceiling (None: no ceiling that round)."""
    ceilings = {r["round"]: r["msgs_per_s"] for r in runs if r["contender"] == "ceiling"}
    return [
        (r, r["msgs_per_s"] / ceilings[r["round"]] if r["round"] in ceilings else None)
        for r in runs
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    m = results["machine"]
    cfg = results["config"]
    lines.append(
        f"forwarder benchmark — {m['date']} — {m['cpus']} CPUs ({m['cpu_model']}), "
        f"Linux {m['kernel']}, Python {m['python']}, {m['redis']}, "
        f"git {m['git_head']} (+{m['git_modified_files']} modified files; forwarder/*.py "
        f"sha1 {m['forwarder_sources_sha1']})"
    )
    lines.append(
        f"stand-in API: {cfg['api']}{' + uvloop' if cfg['api_uvloop'] else ''}; "
        f"concurrency {cfg['concurrency']}; worker --processes flag: "
        f"{'yes' if cfg['processes_flag'] else 'no (N separate worker processes)'}"
    )
    tp = results.get("throughput")
    if tp:
        lines.append("")
        lines.append(f"THROUGHPUT  N={cfg['n']}, repeat {cfg['repeat']} (runs in order)")
        head = (
            f"{'run':<22}{'msg/s':>9}{'÷ceil':>7}{'CPU s/1k':>10}{'peak RSS MB':>13}"
            f"{'redis cmd/msg':>15}{'API CPU s/1k':>14}{'API util':>10}{'redis CPU s/1k':>16}"
            f"{'other load':>12}"
        )
        lines.append(head)
        lines.append("-" * len(head))
        for r, ratio in _with_round_ratios(tp["runs"]):
            lines.append(
                f"{r['contender'] + ' #' + str(r['round']):<22}{r['msgs_per_s']:>9.0f}"
                f"{_fmt(ratio, '.2f'):>7}{r['cpu_per_1k']:>10.3f}{r['peak_rss_mb']:>13.1f}"
                f"{_fmt(r['cmds_per_msg'], '.3f'):>15}{r['api_cpu_per_1k']:>14.3f}"
                f"{r['api_util']:>9.0%} {_fmt(r['redis_cpu_per_1k'], '.3f'):>15}"
                f"{r['other_load_cpus']:>10.2f} CPU"
            )
        lines.append("medians:")
        for name, s in sorted(tp["summary"].items()):
            lines.append(
                f"  {name:<20}{s['median_msgs_per_s']:>9.0f} msg/s (min {s['min_msgs_per_s']:.0f}"
                f", max {s['max_msgs_per_s']:.0f})  ratio {s['ratio']:.2f}  CPU "
                f"{_fmt(s['cpu_per_1k'], '.3f')} s/1k  RSS {_fmt(s['peak_rss_mb'], '.1f')} MB"
                f"  cmds/msg {_fmt(s['cmds_per_msg'], '.3f')}"
            )
        fwd = [r for r in tp["runs"] if r["contender"].startswith("forwarder")]
        if fwd:
            last = fwd[-1]
            by_cmd = ", ".join(f"{k} {v:.3f}" for k, v in list(last["cmds_by_command"].items())[:8])
            lines.append(f"  redis calls per message by command ({last['contender']}): {by_cmd}")
            lines.append(
                "  first request after LPUSH "
                + ", ".join(f"{r['first_request_after_push_ms']:.0f}" for r in fwd)
                + " ms; settled after last request "
                + ", ".join(f"{r['settled_after_last_request_ms']:.0f}" for r in fwd)
                + " ms; dead/delayed "
                + ", ".join(f"{r['dead']}/{r['delayed']}" for r in fwd)
            )
    ex = results.get("experiments")
    if ex:
        lines.append("")
        lines.append(
            f"EXPERIMENTS  N={cfg['n']}: the unchanged worker under runtime knobs "
            "(bench/worker_probe.py)"
        )
        head = (
            f"{'run':<30}{'msg/s':>9}{'÷ceil':>7}{'CPU s/1k':>10}{'GC s/1k':>9}{'other load':>12}"
        )
        lines.append(head)
        lines.append("-" * len(head))
        for r, ratio in _with_round_ratios(ex["runs"]):
            lines.append(
                f"{r['contender'] + ' #' + str(r['round']):<30}{r['msgs_per_s']:>9.0f}"
                f"{_fmt(ratio, '.2f'):>7}{r['cpu_per_1k']:>10.3f}"
                f"{_fmt(r.get('gc_s_per_1k'), '.3f'):>9}{r['other_load_cpus']:>8.2f} CPU"
            )
    ins = results.get("instructions")
    if ins:
        lines.append("")
        lines.append(
            f"INSTRUCTIONS per message (callgrind, runs of {ins['n'][1]} minus {ins['n'][0]}): "
            f"forwarder {ins['forwarder_per_msg']:,.0f}"
            + (
                f", ceiling {ins['ceiling_per_msg']:,.0f}, ceiling ÷ forwarder {ins['ratio']:.3f}"
                if "ratio" in ins
                else ""
            )
        )
        for name in ("forwarder", "ceiling"):
            if name in ins:
                misses = ins[name]
                lines.append(
                    f"  {name}: simulated cache misses a message: L1 {misses['l1_misses']:,.0f}, "
                    f"L2 {misses['l2_misses']:,.0f}"
                )
    lat = results.get("latency")
    if lat:
        lines.append("")
        lines.append(
            f"LATENCY  {lat['rate']:.0f} msg/s for {lat['seconds']:g} s (achieved "
            f"{lat['achieved_rate']:.0f}/s), idle worker; enqueue → API arrival: "
            f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f}, p99 {lat['p99_ms']:.2f}, "
            f"max {lat['max_ms']:.2f}, mean {lat['mean_ms']:.2f} ({lat['arrived']}/{lat['sent']})"
        )
    pr = results.get("producer")
    if pr:
        lines.append("")
        lines.append(f"PRODUCER  {pr['n']} messages (example body)")
        for key, value in pr.items():
            if isinstance(value, dict) and "msgs_per_s" in value:
                lines.append(
                    f"  {key:<22}{value['msgs_per_s']:>10.0f} msg/s  ({value['seconds']:.2f} s)"
                )
    rt = results.get("retry")
    if rt:
        lines.append("")
        lines.append(
            f"RETRY TIMING  {rt['sent']} flaky1- messages at {rt['rate']:.0f}/s "
            f"(+{rt['healthy_per_flaky']} healthy each), "
            f"FORWARDER_RETRY_DELAYS=1: lateness vs failure+1 s: p50 {rt['p50_late_ms']:.1f} ms, "
            f"p99 {rt['p99_late_ms']:.1f}, max {rt['max_late_ms']:.1f}, "
            f"min {rt['min_late_ms']:.1f} ({rt['retried']}/{rt['failed_first']} retried, "
            f"{rt['extra_calls']} extra calls)"
        )
    mem = results.get("memory")
    if mem:
        lines.append("")
        lines.append(
            f"MEMORY  {mem['queued']} queued (Redis {mem['redis_used_memory']}), sampled "
            f"{mem['seconds']} s, {mem['delivered']} delivered ({mem['msgs_per_s']:.0f}/s): "
            f"peak RSS {mem['peak_rss_mb']:.1f} MB; first third {mem['first_third_mean_mb']:.1f}"
            f" MB, last third {mem['last_third_mean_mb']:.1f} MB ({mem['growth_pct']:+.1f} %) → "
            f"{'flat' if mem['flat'] else 'GROWING'}"
        )
    micro = results.get("micro")
    if micro:
        lines.append("")
        lines.append("MICRO  µs per call, each step alone (best of 7), example message")
        for key, value in micro.items():
            if not key.endswith("(error)"):
                lines.append(f"  {_fmt(value, '8.2f'):>8}  {key}")
    if results.get("notes"):
        lines.append("")
        lines.extend(f"NOTE  {note}" for note in results["notes"])
    checks = targets(results)
    if checks:
        lines.append("")
        lines.append("TARGETS")
        for name, (value, goal, ok) in checks.items():
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}: {value} (target {goal})")
    if results.get("profiles"):
        lines.append("")
        lines.append("PROFILES")
        for key, value in results["profiles"].items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, tuple[str, str, bool]]:
    out: dict[str, tuple[str, str, bool]] = {}
    tp = results.get("throughput")
    if tp and "forwarder p1" in tp["summary"]:
        s = tp["summary"]["forwarder p1"]
        out["forwarder ÷ ceiling (p1, median)"] = (
            f"{s['ratio']:.2f}",
            f"≥ {TARGETS['ratio']}",
            s["ratio"] >= TARGETS["ratio"],
        )
        out["Redis commands per message (p1, median)"] = (
            f"{s['cmds_per_msg']:.3f}",
            f"≤ {TARGETS['cmds_per_msg']}",
            s["cmds_per_msg"] <= TARGETS["cmds_per_msg"],
        )
    lat = results.get("latency")
    if lat:
        out["latency p50"] = (
            f"{lat['p50_ms']:.2f} ms",
            f"≤ {TARGETS['latency_p50_ms']} ms",
            lat["p50_ms"] <= TARGETS["latency_p50_ms"],
        )
        out["latency p99"] = (
            f"{lat['p99_ms']:.2f} ms",
            f"≤ {TARGETS['latency_p99_ms']} ms",
            lat["p99_ms"] <= TARGETS["latency_p99_ms"],
        )
    pr = results.get("producer")
    if pr:
        for key in ("async_batch", "sync_batch", "async_one_batch", "sync_one_batch"):
            name = next((k for k in pr if k.startswith(key) and isinstance(pr[k], dict)), None)
            if name is None:
                continue
            rate = pr[name]["msgs_per_s"]
            out[f"enqueue_many {name}"] = (
                f"{rate:.0f} msg/s",
                f"≥ {TARGETS['enqueue_msgs_per_s']:.0f}",
                rate >= TARGETS["enqueue_msgs_per_s"],
            )
    mem = results.get("memory")
    if mem:
        out[f"worker peak RSS, {mem['queued']} queued"] = (
            f"{mem['peak_rss_mb']:.1f} MB, {'flat' if mem['flat'] else 'growing'}",
            f"≤ {TARGETS['memory_peak_mb']:.0f} MB and flat",
            mem["peak_rss_mb"] <= TARGETS["memory_peak_mb"] and bool(mem["flat"]),
        )
    rt = results.get("retry")
    if rt:
        out["retry lateness p99"] = (
            f"{rt['p99_late_ms']:.1f} ms",
            f"≤ {TARGETS['retry_p99_late_ms']:.0f} ms",
            rt["p99_late_ms"] <= TARGETS["retry_p99_late_ms"],
        )
    return out


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- entry ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark the forwarder worker against a bare aiohttp ceiling.",
    )
    parser.add_argument(
        "--mode",
        choices=[
            "throughput",
            "latency",
            "producer",
            "retry",
            "memory",
            "micro",
            "experiments",
            "instructions",
            "all",
        ],
        default="all",
        help="all (default) = every mode but experiments, memory with the smaller "
        "--memory-n of 'all'",
    )
    parser.add_argument("--n", type=int, default=50_000, help="messages per throughput run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of ceiling, forwarder…")
    parser.add_argument(
        "--processes",
        default="1,2",
        help="worker process counts to run in throughput mode, e.g. 1,2 (default) or 1",
    )
    parser.add_argument(
        "--ordering",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run one worker with FORWARDER_ORDERING=session (default: on)",
    )
    parser.add_argument("--api", choices=["raw", "aiohttp", "standin"], default="raw")
    parser.add_argument(
        "--api-uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the stand-in under uvloop (default: if installed)",
    )
    parser.add_argument("--latency-rate", type=float, default=500.0)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--retry-rate", type=float, default=100.0)
    parser.add_argument("--retry-seconds", type=float, default=5.0)
    parser.add_argument(
        "--retry-healthy",
        type=int,
        default=4,
        help="healthy messages enqueued with each flaky one (keeps the breaker closed)",
    )
    parser.add_argument("--producer-n", type=int, default=100_000)
    parser.add_argument("--producer-batch", type=int, default=1000)
    parser.add_argument(
        "--memory-n",
        type=int,
        default=None,
        help="messages queued in memory mode (1,000,000 with --mode memory, 200,000 in all)",
    )
    parser.add_argument(
        "--memory-seconds",
        type=float,
        default=None,
        help="seconds of RSS sampling (60 with --mode memory, 15 in all)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        nargs="?",
        const=Path("/tmp/bench-profiles"),
        default=None,
        help="also profile the worker (py-spy) and the producer (cProfile, pyinstrument) "
        "into this directory (default /tmp/bench-profiles)",
    )
    parser.add_argument("--profile-n", type=int, default=50_000)
    parser.add_argument(
        "--instr-n", type=int, default=2000, help="messages per run in instructions mode"
    )
    parser.add_argument(
        "--instr-small",
        type=int,
        default=400,
        help="messages of the run whose count is subtracted (start-up and shutdown)",
    )
    parser.add_argument(
        "--instr-ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also count the ceiling's instructions (it does not change between versions)",
    )
    parser.add_argument(
        "--instr-cache",
        action="store_true",
        help="also simulate the L1 and L2 caches and count misses (about twice as slow)",
    )
    parser.add_argument(
        "--instr-keep",
        type=Path,
        help="keep the callgrind files here (for callgrind_annotate), not in a temporary folder",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this long for foreign CPU load < 0.25 CPU",
    )
    parser.add_argument("--json", type=Path, help="write the raw figures to this file")
    args = parser.parse_args(argv)
    args.processes = [int(p) for p in str(args.processes).split(",") if p.strip()]
    full = args.mode == "memory"
    if args.memory_n is None:
        args.memory_n = 1_000_000 if full else 200_000
    if args.memory_seconds is None:
        args.memory_seconds = 60.0 if full else 15.0
    if args.api_uvloop is None:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            args.api_uvloop = False
        else:
            args.api_uvloop = True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    modes = (
        ["throughput", "latency", "producer", "retry", "memory", "micro"]
        if args.mode == "all"
        else [args.mode]
    )
    results: dict[str, Any] = {"machine": machine()}
    try:
        with environment(args) as env:
            results["config"] = {
                "n": args.n,
                "concurrency": args.concurrency,
                "repeat": args.repeat,
                "processes": args.processes,
                "api": args.api,
                "api_uvloop": args.api_uvloop,
                "processes_flag": env.processes_flag,
                "modes": modes,
            }
            for mode in modes:
                _progress(f"== {mode}")
                if mode == "throughput":
                    results["throughput"] = mode_throughput(env)
                elif mode == "latency":
                    results["latency"] = mode_latency(env)
                elif mode == "producer":
                    results["producer"] = mode_producer(env, args.profile)
                elif mode == "retry":
                    results["retry"] = mode_retry(env)
                elif mode == "memory":
                    results["memory"] = mode_memory(env)
                elif mode == "micro":
                    results["micro"] = mode_micro(env)
                elif mode == "experiments":
                    results["experiments"] = mode_experiments(env)
                elif mode == "instructions":
                    from bench.instructions import mode_instructions

                    results["instructions"] = mode_instructions(env)
            if args.profile is not None:
                _progress("== profile")
                profiles = mode_profile(env, args.profile)
                if "profiles" not in results.get("producer", {}):
                    profiles.update(mode_producer(env, args.profile).get("profiles", {}))
                else:
                    profiles.update(results["producer"]["profiles"])
                results["profiles"] = profiles
            results["notes"] = env.notes
    except Interrupted as exc:
        _progress(f"interrupted ({exc}); everything started has been stopped")
        return 130
    if args.json is not None:
        args.json.write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    print(render(results))
    return 0

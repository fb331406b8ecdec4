"""Instructions per message, counted by callgrind: a figure the machine's noise cannot move.

On a shared VM the ceiling's own speed drifts by ±20 % between runs a minute apart, so
msg/s and CPU s/1k cannot tell two versions of the worker apart by a few percent.
Valgrind's callgrind counts the instructions a process executes: the same count for the
same work, whatever else the machine is doing. Each contender runs twice under it, with
``--instr-small`` and ``--instr-n`` messages; the difference over the difference in
messages is instructions per message, start-up and shutdown cancelled out.

ceiling ÷ forwarder estimates the throughput ratio when both are CPU-bound, as here. It
leaves out time in the kernel (the same HTTP syscalls for both, plus the worker's few
Redis round trips) and differences in instructions per cycle: use it to compare
versions, and the throughput mode for the target itself.

With ``--instr-cache`` callgrind also simulates this machine's L1 caches and, as the last
level, its per-core L2 (read from sysfs): misses a message at each level, the part of the
time that instruction counts leave out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.harness import PY, ROOT, Env, run_forwarder, wire_messages

# Valgrind runs Python some 50 times slower: start-up alone takes tens of seconds.
SLOW = 50


# Simulated cache misses (callgrind's event names) summed per level.
MISSES = {"l1_misses": ("I1mr", "D1mr", "D1mw"), "l2_misses": ("ILmr", "DLmr", "DLmw")}


def callgrind(out: Path, *, cache: bool = False) -> list[str]:
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--quiet"]
    return argv + _cache_sim() if cache else argv


def _cache_sim() -> list[str]:
    # By default valgrind takes L3 for the last level; it is shared with the other cores
    # (and, on a VM, other guests). The per-core L2 is where a message's work spills from.
    argv = ["--cache-sim=yes"]
    for flag, level, kind in (("I1", 1, "Instruction"), ("D1", 1, "Data"), ("LL", 2, "Unified")):
        geometry = _cache_geometry(level, kind)
        if geometry is not None:
            argv.append(f"--{flag}={geometry}")
    return argv


def _cache_geometry(level: int, kind: str) -> str | None:
    """``size,ways,line`` of CPU 0's cache of ``level`` and ``kind``, in bytes."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        info = {f.name: f.read_text().strip() for f in index.iterdir() if f.is_file()}
        if info.get("level") == str(level) and info.get("type") == kind:
            size = int(info["size"][:-1]) * {"K": 1024, "M": 1024 * 1024}[info["size"][-1]]
            return f"{size},{info['ways_of_associativity']},{info['coherency_line_size']}"
    return None


def event_totals(out: Path) -> dict[str, int]:
    """Each event's total in a callgrind file: ``Ir`` (instructions), misses with cache-sim."""
    events: list[str] = []
    for line in out.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(events, map(int, line.split()[1:]), strict=True))
    raise RuntimeError(f"no event totals in {out}")


def total_instructions(out: Path) -> int:
    return event_totals(out)["Ir"]


def ceiling(env: Env, n: int, out: Path) -> dict[str, int]:
    env.control.reset(n)
    argv = [*callgrind(out, cache=env.args.instr_cache), PY, "-m", "bench.ceiling"]
    argv += ["--base", env.api_base, "--n", str(n)]
    argv += ["--concurrency", str(env.args.concurrency)]
    child = env.children.start(f"ceiling-callgrind-{n}", argv, cwd=ROOT)
    child.proc.wait()
    code = env.children.stop(child)
    if code != 0:
        raise RuntimeError(f"ceiling under callgrind failed ({code}):\n{child.log_tail()}")
    return event_totals(out)


def forwarder(env: Env, n: int, out: Path) -> dict[str, int]:
    wrap = callgrind(out, cache=env.args.instr_cache)
    result = run_forwarder(env, wire_messages(n), 1, wrap=wrap, slow=SLOW)
    if result["exit_codes"] != [0]:
        raise RuntimeError(f"worker under callgrind failed ({result['exit_codes']})")
    return event_totals(out)


def mode_instructions(env: Env) -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (Debian: apt-get install valgrind)")
    small, large = env.args.instr_small, env.args.instr_n
    contenders = [("forwarder", forwarder)]
    if env.args.instr_ceiling:
        contenders.append(("ceiling", ceiling))
    out_dir = env.args.instr_keep or env.tmp
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"n": [small, large]}
    for name, run in contenders:
        few, many = (run(env, n, out_dir / f"callgrind.{name}.{n}") for n in (small, large))
        per_msg = {e: (many[e] - few[e]) / (large - small) for e in many}
        result[f"{name}_per_msg"] = per_msg["Ir"]
        if env.args.instr_cache:
            result[name] = {level: sum(per_msg[e] for e in es) for level, es in MISSES.items()}
    if "ceiling_per_msg" in result:
        result["ratio"] = result["ceiling_per_msg"] / result["forwarder_per_msg"]
    return result

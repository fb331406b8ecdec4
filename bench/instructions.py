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
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.harness import PY, ROOT, Env, run_forwarder, wire_messages

# Valgrind runs Python some 50 times slower: start-up alone takes tens of seconds.
SLOW = 50


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--quiet"]


def total_instructions(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def ceiling(env: Env, n: int, out: Path) -> int:
    env.control.reset(n)
    argv = [*callgrind(out), PY, "-m", "bench.ceiling", "--base", env.api_base, "--n", str(n)]
    argv += ["--concurrency", str(env.args.concurrency)]
    child = env.children.start(f"ceiling-callgrind-{n}", argv, cwd=ROOT)
    child.proc.wait()
    code = env.children.stop(child)
    if code != 0:
        raise RuntimeError(f"ceiling under callgrind failed ({code}):\n{child.log_tail()}")
    return total_instructions(out)


def forwarder(env: Env, n: int, out: Path) -> int:
    result = run_forwarder(env, wire_messages(n), 1, wrap=callgrind(out), slow=SLOW)
    if result["exit_codes"] != [0]:
        raise RuntimeError(f"worker under callgrind failed ({result['exit_codes']})")
    return total_instructions(out)


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
        counts = [run(env, n, out_dir / f"callgrind.{name}.{n}") for n in (small, large)]
        result[f"{name}_per_msg"] = (counts[1] - counts[0]) / (large - small)
    if "ceiling_per_msg" in result:
        result["ratio"] = result["ceiling_per_msg"] / result["forwarder_per_msg"]
    return result

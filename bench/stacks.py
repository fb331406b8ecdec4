"""Summarise py-spy ``--format raw`` (collapsed stacks) output: where the samples go.

``python -m bench.stacks FILE [--top 40]`` prints, as % of all samples:

- self time by function (the leaf frame; C code shows up as the Python frame calling it),
- inclusive time by function (each function counted once per stack),
- self time by package (forwarder, aiohttp, redis, asyncio, pydantic, structlog, ...).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from collections.abc import Callable
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse(path: Path) -> list[tuple[list[str], int]]:
    """(frames root first, as ``func (file)`` without line numbers; count) per line."""
    stacks = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        frames = []
        for raw in body.split(";"):
            match = _FRAME.match(raw)
            if match is None:
                frames.append(raw)
            else:
                frames.append(f"{match['func']} ({_short(match['file'])})")
        stacks.append((frames, int(count)))
    return stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def package(frame: str) -> str:
    """The package a frame belongs to, from its file path."""
    file = frame.rsplit("(", 1)[-1].rstrip(")")
    if file.startswith("forwarder/"):
        return "forwarder." + file.split("/")[1].removesuffix(".py")
    if file.startswith("bench/"):
        return "bench"
    top = file.split("/", 1)[0].removesuffix(".py")
    return top or "?"


# (bucket, test on "func (file)") — a stack goes to the bucket of its innermost frame that
# matches any rule (asyncio's own frames never match, except task creation, so a socket
# write lands with whoever wrote). Unmatched stacks are event-loop bookkeeping.
_BUCKETS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("message decode + validation (model, pydantic)", lambda fn, f: f == "forwarder/model.py"),
    ("message decode + validation (model, pydantic)", lambda fn, f: f.startswith("pydantic")),
    ("metrics (prometheus_client)", lambda fn, f: f.startswith("prometheus_client")),
    ("metrics (prometheus_client)", lambda fn, f: f == "forwarder/metrics.py"),
    ("logging (structlog)", lambda fn, f: f.startswith("structlog")),
    ("outcome objects (forwarder.outcome)", lambda fn, f: f == "forwarder/outcome.py"),
    ("circuit breaker", lambda fn, f: f == "forwarder/breaker.py"),
    ("Redis (redis-py, forwarder.queue)", lambda fn, f: f.startswith(("redis/", "hiredis"))),
    ("Redis (redis-py, forwarder.queue)", lambda fn, f: f == "forwarder/queue.py"),
    ("HTTP client (aiohttp, yarl, multidict)", lambda fn, f: f.startswith("aiohttp/")),
    ("HTTP client (aiohttp, yarl, multidict)", lambda fn, f: f.startswith(("yarl/", "multidict"))),
    ("forwarder.client own code", lambda fn, f: f == "forwarder/client.py"),
    ("forwarder.worker own code", lambda fn, f: f.startswith("forwarder/")),
    ("ceiling client own code", lambda fn, f: f.startswith("bench/")),
]


_LOOP_STEP = "Handle._run (asyncio/events.py)"
_URL_FRAMES = frozenset(
    {
        "_url (forwarder/client.py)",
        "EngagementClient._url (forwarder/client.py)",
        "EngagementClient.base_url (forwarder/client.py)",
    }
)


def bucket(frames: list[str]) -> str:
    # Only what one event-loop callback runs counts: the frames below it (asyncio.run,
    # the CLI, the ceiling's main) are on every stack.
    if _LOOP_STEP not in frames:
        return "event loop, sockets, other (unattributed)"
    step = len(frames) - 1 - frames[::-1].index(_LOOP_STEP)
    inner = frames[step + 1 :]
    # Building the request URL calls into yarl (which the HTTP client uses too): the
    # enclosing forwarder function decides.
    for frame in inner:
        if frame in _URL_FRAMES:
            return "URL building (quote, yarl) in forwarder.client"
    for depth in range(len(inner) - 1, -1, -1):
        func, _, rest = inner[depth].rpartition(" (")
        file = rest.rstrip(")")
        if func.endswith("create_task") and depth > 0:
            # A task the forwarder (or the ceiling) spawns per message; aiohttp's own
            # tasks stay with the HTTP client.
            caller = inner[depth - 1].rpartition(" (")[2]
            if caller.startswith(("forwarder/", "bench/")):
                return "task per message (create_task, callbacks)"
            continue
        for name, test in _BUCKETS:
            if test(func, file):
                return name
    return "event loop, sockets, other (unattributed)"


def summarise(path: Path, top: int = 40, us_per_msg: float | None = None) -> str:
    stacks = parse(path)
    total = sum(count for _, count in stacks) or 1
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    self_pkg: collections.Counter[str] = collections.Counter()
    incl_fwd: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        # The first frame is py-spy's thread label ("process ...", "thread ...").
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = frames[-1]
        buckets[bucket(frames)] += count
        self_fn[leaf] += count
        self_pkg[package(leaf)] += count
        for frame in set(frames):
            incl_fn[frame] += count
        for pkg in {package(f) for f in frames if package(f).startswith("forwarder.")}:
            incl_fwd[pkg] += count

    def table(title: str, counter: collections.Counter[str], limit: int) -> list[str]:
        rows = [f"== {title} ({total} samples) =="]
        for name, count in counter.most_common(limit):
            share = count / total
            cost = f"  {share * us_per_msg:6.1f} µs/msg" if us_per_msg else ""
            rows.append(f"{100 * share:6.2f}%{cost}  {name}")
        return rows

    lines = [f"py-spy profile {path}"]
    if us_per_msg:
        lines.append(f"(µs/msg = share x {us_per_msg:.1f} µs of CPU per message, measured)")
    lines += table("where the time goes, by step", buckets, 30)
    lines += table("self time by package", self_pkg, 30)
    lines += table("inclusive time by forwarder module", incl_fwd, 30)
    lines += table("self time by function", self_fn, top)
    lines += table("inclusive time by function", incl_fn, top)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="summarise py-spy raw output")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--us-per-msg", type=float, help="CPU µs per message, to scale by")
    args = parser.parse_args(argv)
    sys.stdout.write(summarise(args.file, args.top, args.us_per_msg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

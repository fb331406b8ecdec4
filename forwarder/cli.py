"""The ``forwarder`` command: worker, enqueue, schema, demo, standin-api, dlq, stats."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import IO

from pydantic import ValidationError

from forwarder import dlq, logs, stats
from forwarder.connections import (
    REDIS_FAILURES,
    UNREACHABLE,
    cluster_mode_disabled,
    node_answer,
    setting_refused,
    sync_redis_client,
)
from forwarder.model import format_errors, message_json_schema
from forwarder.ndjson import enqueue_lines
from forwarder.output import silence_stdout
from forwarder.processes import supervise
from forwarder.queue import Keys
from forwarder.settings import Settings
from forwarder.signals import StopAsked


def _settings_flags() -> argparse.ArgumentParser:
    """Flags shared by every command that talks to Redis; each overrides its env setting."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--redis-url", help="FORWARDER_REDIS_URL")
    parent.add_argument("--queue", help="FORWARDER_QUEUE")
    parent.add_argument("--log-level", help="FORWARDER_LOG_LEVEL")
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Deliver session updates from a Redis list to LivePerson's App Engagement API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _settings_flags()

    worker = sub.add_parser("worker", parents=[common], help="run a worker until SIGTERM/SIGINT")
    worker.add_argument("--concurrency", type=int, help="FORWARDER_CONCURRENCY")
    worker.add_argument("--api-base-url", help="FORWARDER_API_BASE_URL")
    worker.add_argument("--retry-delays", help="FORWARDER_RETRY_DELAYS, e.g. 5,10,15")
    worker.add_argument("--request-timeout", type=float, help="FORWARDER_REQUEST_TIMEOUT")
    worker.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes to run (one per core; default 1)",
    )
    worker.set_defaults(func=_cmd_worker)

    enqueue = sub.add_parser(
        "enqueue", parents=[common], help="enqueue NDJSON wire messages from FILE or stdin"
    )
    enqueue.add_argument("file", nargs="?", default="-", help="NDJSON file, or - for stdin")
    enqueue.set_defaults(func=_cmd_enqueue)

    schema = sub.add_parser("schema", help="print the wire message's JSON Schema")
    schema.set_defaults(func=_cmd_schema)

    demo = sub.add_parser("demo", parents=[common], help="see the whole flow on this machine")
    demo.add_argument("--count", type=int, default=300, help="sample updates to enqueue")
    demo.set_defaults(func=_cmd_demo)

    standin = sub.add_parser("standin-api", help="run a stand-in engagement API (for staging)")
    standin.add_argument("--host", default="127.0.0.1")
    standin.add_argument("--port", type=int, default=8080)
    standin.set_defaults(func=_cmd_standin)

    dlq.register(sub, [common])
    stats.register(sub, [common])
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Env settings, overridden by the flags that were given."""
    names = Settings.model_fields.keys()
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        # Without the input values: one of them may be a password.
        errors = "\n".join(f"  {line}" for line in format_errors(exc))
        print(f"forwarder: invalid settings:\n{errors}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    try:
        code = func(args, settings)
        # Written out here, not at exit, where a reader gone meanwhile would be a traceback.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader stopped reading (``forwarder schema | head``): it has what it wanted.
        silence_stdout()
        return 0
    except REDIS_FAILURES as exc:
        code, said = _redis_failed(exc)
        print(f"forwarder: {said}", file=sys.stderr)
        return code


def _redis_failed(exc: BaseException) -> tuple[int, str]:
    """The exit code (2: a setting to fix, 3: Redis down, 1: Redis refused the command)
    and the line that says why, in Redis' own words (never a value)."""
    if cluster_mode_disabled(exc):
        return 2, f"FORWARDER_REDIS_CLUSTER is set, but: {exc}"
    if setting_refused(exc):
        return 2, f"Redis refused the credentials or the TLS settings: {exc}"
    # The cluster client raises its own exception from a node's refusal: say the node's.
    answer = node_answer(exc)
    if answer is None and isinstance(exc, UNREACHABLE):
        return 3, f"cannot reach Redis at the configured URL: {exc}"
    refused = answer or exc  # WRONGTYPE, NOPERM, a read-only replica, a full Redis...
    return 1, f"Redis refused: {type(refused).__name__}: {refused}"


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if args.processes < 1:
        print("forwarder: --processes must be at least 1", file=sys.stderr)
        return 2
    StopAsked.catch()  # already, if run as the command: see forwarder.signals
    if args.processes > 1:
        return supervise(args.processes, _flag_settings(args), settings.metrics_port)
    from forwarder.worker import tune_gc

    tune_gc()
    return asyncio.run(_run_until_signal(settings))


def _flag_settings(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as flags, as the environment variables that carry them."""
    names = Settings.model_fields.keys()
    return {
        f"FORWARDER_{k.upper()}": str(v)
        for k, v in vars(args).items()
        if k in names and v is not None
    }


async def _run_until_signal(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; the exit code: 1 if the worker stopped of itself."""
    from forwarder.worker import Worker, serve

    loop = asyncio.get_running_loop()
    served: list[Worker] = []

    def on_ready(worker: Worker) -> None:
        served.append(worker)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        if StopAsked.asked_yet():  # during start-up: it stops as on any stop
            worker.stop()

    await serve(settings, on_ready=on_ready)
    # A task of its own failed (a bug; it stopped cleanly, giving everything back): not
    # a success, so that a restart policy such as on-failure starts it again.
    return 1 if any(worker.failed for worker in served) else 0


def _cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    try:
        source: IO[bytes] = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"forwarder: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    client = sync_redis_client(settings)
    try:
        key = Keys(settings.queue).queue
        report = enqueue_lines(source.fileno(), client, key, settings.max_message_bytes)
    finally:
        source.close()
        client.close()
    if report.stopped:
        print("forwarder: stopped by a signal; every line read was enqueued", file=sys.stderr)
        return 130
    return 1 if report.invalid else 0


def _cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(message_json_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from forwarder.demo import run

    return run(settings, count=args.count, queue=args.queue)


def _cmd_standin(args: argparse.Namespace, settings: Settings) -> int:
    from forwarder.standin import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

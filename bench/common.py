"""What every contender sends: the API docs' example body, and the messages around it."""

from __future__ import annotations

from typing import Any

import orjson

from forwarder.demo import DOCS_EXAMPLE_BODY

ACCOUNT = "12345678"


BODY_BYTES = orjson.dumps(DOCS_EXAMPLE_BODY)


def visitor(i: int, prefix: str = "v") -> str:
    return f"{prefix}{i}"


def session(i: int) -> str:
    return f"s{i}"


def update_path(i: int, prefix: str = "v") -> str:
    """Path and query of message ``i``'s Update Session call (what the forwarder builds)."""
    return (
        f"/api/account/{ACCOUNT}/app/engagement/visitors/{visitor(i, prefix)}"
        f"?v=1.0&sid={session(i)}"
    )


def update(i: int, prefix: str = "v", body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The wire form of message ``i`` (as ``forwarder.producer.make_update`` builds it)."""
    return {
        "accountId": ACCOUNT,
        "visitorId": visitor(i, prefix),
        "sessionId": session(i),
        "body": dict(body if body is not None else DOCS_EXAMPLE_BODY),
    }

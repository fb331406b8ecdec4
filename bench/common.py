"""What every contender sends: the API docs' example body, and the messages around it."""

from __future__ import annotations

from typing import Any

import orjson

ACCOUNT = "12345678"

# /work/shared/engagement-api.md, "The example body from the Update Session page".
EXAMPLE_BODY: dict[str, Any] = {
    "pageId": "4743822558",
    "impAttributes": [
        {
            "type": "impAccept",
            "campaign": 3115242510,
            "engId": 3115242810,
            "revision": 537,
            "eContext": [{"type": "engagementContext", "id": "1"}],
        },
        {
            "type": "impDisplay",
            "campaign": 3115242510,
            "engId": 3115242810,
            "revision": 537,
            "eContext": [{"type": "engagementContext", "id": "1"}],
        },
    ],
    "engagementAttributes": [
        {
            "type": "personal",
            "personal": {
                "contacts": [{"email": "sarah@gmail.com", "phone": "0987653"}],
                "age": {"age": 30.0, "year": 1986, "month": 7, "day": 22},
                "firstname": "Sarah",
                "lastname": "West",
                "gender": "FEMALE",
                "company": "liveperson",
            },
        }
    ],
}

BODY_BYTES = orjson.dumps(EXAMPLE_BODY)


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
        "body": dict(body if body is not None else EXAMPLE_BODY),
    }

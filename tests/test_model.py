"""Tests for the wire-message models in forwarder.model."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forwarder.client import Attempt
from forwarder.deadletters import DeadLetter
from forwarder.demo import DOCS_EXAMPLE_BODY as DOCS_BODY
from forwarder.demo import SAMPLE_BODIES
from forwarder.model import (
    COUNTER_MAX,
    MAX_MESSAGE_BYTES,
    PASSTHROUGH,
    Cart,
    CustomerInfo,
    ErrorInfo,
    ImpAccept,
    ImpClose,
    ImpDisplay,
    ImpExpanded,
    ImpTimeout,
    InvalidMessage,
    Lead,
    MarketingInfo,
    Personal,
    ProdView,
    Purchase,
    SearchInfo,
    Service,
    SessionUpdate,
    UpdateSessionBody,
    _fast_decoder,
    _fast_verdict,
    _python_pattern,
    decode,
    format_errors,
    message_json_schema,
    validate_wire,
)
from forwarder.outcome import RetryPolicy, after_attempt, parked
from forwarder.queue import Claimed

PRODUCTS: list[dict[str, Any]] = [
    {
        "product": {"name": "prod1", "category": "category", "sku": "sku", "price": 7.8},
        "quantity": 1,
    }
]

SDE_EXAMPLES: list[tuple[dict[str, Any], type[BaseModel]]] = [
    (
        {"type": "cart", "total": 11.7, "currency": "USD", "numItems": 6, "products": PRODUCTS},
        Cart,
    ),
    (
        {
            "type": "purchase",
            "total": 11.7,
            "currency": "USD",
            "orderId": "DRV1534XC",
            "cart": {"numItems": 1, "products": PRODUCTS},
        },
        Purchase,
    ),
    ({"type": "prodView", "currency": "USD", "products": [{"product": {"name": "p"}}]}, ProdView),
    ({"type": "searchInfo", "keywords": ["summer", "jacket"]}, SearchInfo),
    (
        {
            "type": "ctmrinfo",
            "info": {
                "cstatus": "cancelled",
                "ctype": "vip",
                "customerId": "138766AC",
                "balance": -400.99,
                "currency": "USD",
                "socialId": "11256324780",
                "imei": "3543546543545688",
                "userName": "user000",
                "companySize": 500,
                "companyBranch": "East",
                "accountName": "bank corp",
                "role": "broker",
                "lastPaymentDate": {"day": 15, "month": 10, "year": 2014},
                "registrationDate": {"day": 23, "month": 5, "year": 2013},
                "loginStatus": 0,
                "storeZipCode": "20505",
                "storeNumber": "123865",
            },
        },
        CustomerInfo,
    ),
    (
        {
            "type": "mrktInfo",
            "info": {"channel": "1", "affiliate": "Yahoo", "campaignId": "US coupon campaign"},
        },
        MarketingInfo,
    ),
    (
        {
            "type": "personal",
            "personal": {
                "firstname": "John",
                "lastname": "Doe",
                "age": {"age": 34, "year": 1980, "month": 4, "day": 15},
                "contacts": [
                    {
                        "email": "myname@example.com",
                        "phone": "+1 212-788-8877",
                        "phoneType": "MOBILE",
                        "address": {"country": "US", "region": "NY"},
                    }
                ],
                "gender": "MALE",
                "language": "en-US",
                "company": "company",
            },
        },
        Personal,
    ),
    (
        {
            "type": "lead",
            "lead": {
                "topic": "luxury car test drive 2015",
                "value": 22.22,
                "currency": "USD",
                "leadId": "xyz123",
            },
        },
        Lead,
    ),
    (
        {
            "type": "service",
            "service": {
                "topic": "order checkbook",
                "status": 0,
                "category": "finance",
                "serviceId": "service12",
            },
        },
        Service,
    ),
    (
        {
            "type": "error",
            "error": {
                "contextId": "111",
                "message": "Expiration date is invalid",
                "code": "er100004",
                "level": 10,
                "resolved": False,
            },
        },
        ErrorInfo,
    ),
]

IMPRESSION_EXAMPLES: list[tuple[dict[str, Any], type[BaseModel]]] = [
    (DOCS_BODY["impAttributes"][1], ImpDisplay),
    (DOCS_BODY["impAttributes"][0], ImpAccept),
    (
        {
            "type": "impExpanded",
            "expanded": None,
            "userInit": None,
            "actionableItems": None,
            "campaign": None,
            "engId": None,
            "revision": None,
        },
        ImpExpanded,
    ),
    (
        {"type": "impTimeout", "campaign": 3115242510, "engId": 3115242810, "revision": 537},
        ImpTimeout,
    ),
    ({"type": "impClose", "campaign": 3115242510, "engId": 3115242810, "revision": 537}, ImpClose),
]


def message(body: Any = None, **envelope: Any) -> dict[str, Any]:
    """A valid wire message, with the body and envelope keys overridden."""
    msg: dict[str, Any] = {
        "id": "m-1",
        "accountId": "12345678",
        "visitorId": "v1",
        "sessionId": "s1",
        "body": copy.deepcopy(DOCS_BODY) if body is None else body,
        "enqueuedAt": 1764380000.123,
        "attempts": 0,
        "lastError": None,
        "replayed": 0,
    }
    msg.update(envelope)
    return msg


def wire(**envelope: Any) -> bytes:
    """A queue element as the Python producer writes it (compact, its key order)."""
    msg = message(**envelope)
    for default in ("attempts", "lastError", "replayed"):
        if default not in envelope:
            del msg[default]
    order = ("accountId", "visitorId", "sessionId", "body", "id", "enqueuedAt")
    return orjson.dumps({k: msg[k] for k in order if k in msg} | msg)


def sde_message(sde: object) -> dict[str, Any]:
    return message({"pageId": "p1", "engagementAttributes": [sde]})


def errors_of(data: object) -> list[str]:
    with pytest.raises(ValidationError) as info:
        SessionUpdate.model_validate(data)
    return format_errors(info.value)


def test_docs_example_validates_and_round_trips() -> None:
    update = SessionUpdate.model_validate(message())

    assert update.account_id == "12345678"
    assert update.enqueued_at == 1764380000.123
    assert update.body.page_id == "4743822558"
    assert update.body.imp_attributes is not None
    assert [type(e) for e in update.body.imp_attributes] == [ImpAccept, ImpDisplay]
    assert update.body.engagement_attributes is not None
    personal = update.body.engagement_attributes[0]
    assert isinstance(personal, Personal)
    assert personal.personal.gender == "FEMALE"
    assert personal.personal.age is not None
    assert personal.personal.age.age == 30.0
    assert update.body.model_dump(exclude_unset=True) == DOCS_BODY


def test_envelope_serializes_with_wire_names() -> None:
    dumped = SessionUpdate.model_validate(message()).model_dump(mode="json")

    assert set(dumped) == {
        "id",
        "accountId",
        "visitorId",
        "sessionId",
        "body",
        "enqueuedAt",
        "attempts",
        "lastError",
        "replayed",
    }
    assert dumped["body"]["impAttributes"][0]["eContext"] == [
        {"type": "engagementContext", "id": "1"}
    ]


def test_bookkeeping_fields_are_optional() -> None:
    update = SessionUpdate.model_validate(
        {"accountId": "a_1", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}
    )

    assert (update.id, update.enqueued_at, update.attempts, update.last_error) == (
        None,
        None,
        0,
        None,
    )
    assert update.replayed == 0


def test_snake_case_names_are_accepted() -> None:
    update = SessionUpdate.model_validate(
        {"account_id": "1", "visitor_id": "v", "session_id": "s", "body": {"page_id": "p"}}
    )

    assert update.model_dump(exclude_unset=True) == {
        "accountId": "1",
        "visitorId": "v",
        "sessionId": "s",
        "body": {"pageId": "p"},
    }


@pytest.mark.parametrize(("sde", "model"), SDE_EXAMPLES, ids=[m.__name__ for _, m in SDE_EXAMPLES])
def test_each_engagement_attribute_type_validates(
    sde: dict[str, Any], model: type[BaseModel]
) -> None:
    update = SessionUpdate.model_validate(sde_message(sde))

    assert update.body.engagement_attributes is not None
    assert type(update.body.engagement_attributes[0]) is model
    assert update.body.model_dump(exclude_unset=True)["engagementAttributes"] == [sde]


@pytest.mark.parametrize(
    ("event", "model"), IMPRESSION_EXAMPLES, ids=[m.__name__ for _, m in IMPRESSION_EXAMPLES]
)
def test_each_impression_event_type_validates(
    event: dict[str, Any], model: type[BaseModel]
) -> None:
    update = SessionUpdate.model_validate(message({"pageId": "p1", "impAttributes": [event]}))

    assert update.body.imp_attributes is not None
    assert type(update.body.imp_attributes[0]) is model
    assert update.body.model_dump(exclude_unset=True)["impAttributes"] == [event]


@pytest.mark.parametrize("gender", ["FEMALE", "MALE", 0, 1, 2])
def test_gender_accepts_documented_ints_and_strings(gender: int | str) -> None:
    update = SessionUpdate.model_validate(
        sde_message({"type": "personal", "personal": {"gender": gender}})
    )

    assert update.body.engagement_attributes is not None
    sde = update.body.engagement_attributes[0]
    assert isinstance(sde, Personal)
    assert sde.personal.gender == gender


@pytest.mark.parametrize("gender", [3, -1, True, 1.0, ["MALE"]])
def test_gender_rejects_other_values_with_one_error(gender: object) -> None:
    errors = errors_of(sde_message({"type": "personal", "personal": {"gender": gender}}))

    assert errors == [
        "body.engagementAttributes.0.personal.gender: "
        "Input should be 0, 1, 2 or a string such as 'MALE'"
    ]


@pytest.mark.parametrize("channel", ["1", 1, 0, "6"])
def test_channel_accepts_int_and_numeric_string(channel: int | str) -> None:
    update = SessionUpdate.model_validate(
        sde_message({"type": "mrktInfo", "info": {"channel": channel}})
    )

    assert update.body.engagement_attributes is not None
    sde = update.body.engagement_attributes[0]
    assert isinstance(sde, MarketingInfo)
    assert sde.info.channel == channel


@pytest.mark.parametrize("channel", [7, "7", "one", True, 1.0])
def test_channel_rejects_other_values(channel: object) -> None:
    assert errors_of(sde_message({"type": "mrktInfo", "info": {"channel": channel}})) == [
        "body.engagementAttributes.0.info.channel: "
        "Input should be an integer 0 to 6, or the same as a string"
    ]


def test_missing_page_id_is_reported_at_body_page_id() -> None:
    assert errors_of(message({"impAttributes": []})) == ["body.pageId: Field required"]


def test_impression_event_in_engagement_attributes_is_rejected() -> None:
    sde = {"type": "impDisplay", "campaign": 1, "engId": 2, "revision": 3}

    assert errors_of(sde_message(sde)) == [
        "body.engagementAttributes.0.type: 'impDisplay' is an impression event type: "
        "impression events belong in impAttributes, not engagementAttributes"
    ]


def test_engagement_attribute_in_imp_attributes_is_rejected() -> None:
    body = {"pageId": "p", "impAttributes": [{"type": "cart", "total": 1, "numItems": 1}]}

    assert errors_of(message(body)) == [
        "body.impAttributes.0.type: 'cart' is an engagement attribute type: "
        "engagement attributes belong in engagementAttributes, not impAttributes"
    ]


def test_unknown_engagement_type_lists_known_types() -> None:
    assert errors_of(sde_message({"type": "wishlist"})) == [
        "body.engagementAttributes.0.type: unknown engagement attribute type 'wishlist'; "
        "known types: cart, purchase, prodView, searchInfo, ctmrinfo, mrktInfo, personal, "
        "lead, service, error"
    ]


def test_unknown_impression_type_lists_known_types() -> None:
    assert errors_of(message({"pageId": "p", "impAttributes": [{"type": "impHover"}]})) == [
        "body.impAttributes.0.type: unknown impression event type 'impHover'; "
        "known types: impDisplay, impAccept, impExpanded, impTimeout, impClose"
    ]


@pytest.mark.parametrize("sde", [{"total": 1, "numItems": 1}, {"type": None}])
def test_missing_type_is_reported_at_type(sde: dict[str, Any]) -> None:
    assert errors_of(sde_message(sde)) == [
        "body.engagementAttributes.0.type: Field required; known engagement attribute types: "
        "cart, purchase, prodView, searchInfo, ctmrinfo, mrktInfo, personal, lead, service, error"
    ]


@pytest.mark.parametrize("tag", [5, ["cart"], {"a": 1}])
def test_non_string_type_is_reported_as_unknown(tag: object) -> None:
    (error,) = errors_of(sde_message({"type": tag}))

    assert error.startswith(
        f"body.engagementAttributes.0.type: unknown engagement attribute type {tag!r}; "
    )


def test_non_object_item_is_rejected_at_its_index() -> None:
    assert errors_of(sde_message("cart")) == [
        "body.engagementAttributes.0: "
        "Input should be a valid dictionary or object to extract fields from"
    ]


@pytest.mark.parametrize(
    ("total", "message_text"),
    [
        ("abc", "Input should be a valid number"),
        (True, "Input should be a valid number"),
        ("12.5", "Input should be a valid number"),
        (None, "Input should be a valid number"),
    ],
)
def test_wrong_number_type_is_reported_at_the_field(total: object, message_text: str) -> None:
    sde = {"type": "cart", "total": total, "numItems": 1}

    assert errors_of(sde_message(sde)) == [f"body.engagementAttributes.0.total: {message_text}"]


def test_mandatory_cart_fields_are_required() -> None:
    assert errors_of(sde_message({"type": "cart"})) == [
        "body.engagementAttributes.0.total: Field required",
        "body.engagementAttributes.0.numItems: Field required",
    ]


def test_nested_errors_use_the_path_the_producer_wrote() -> None:
    personal = {"type": "personal", "personal": {"age": {"age": "30"}}}
    contact = {"phoneType": "CELL", "address": {"country": "USA"}}
    info = {"type": "ctmrinfo", "info": {"companySize": 1.5}}
    service = {"type": "service", "service": {"status": 14}}
    body = {
        "pageId": "p",
        "engagementAttributes": [
            personal,
            {"type": "personal", "personal": {"contacts": [contact]}},
            info,
            service,
        ],
    }

    assert errors_of(message(body)) == [
        "body.engagementAttributes.0.personal.age.age: Input should be a valid number",
        "body.engagementAttributes.1.personal.contacts.0.phoneType: "
        "Input should be 'HOME', 'MOBILE', 'WORK', 'FAX', 'MAIN', 'HOME_FAX', 'WORK_FAX', "
        "'PAGER' or 'OTHER'",
        "body.engagementAttributes.1.personal.contacts.0.address.country: "
        "String should match pattern '^[A-Za-z]{2}$'",
        "body.engagementAttributes.2.info.companySize: Input should be a valid integer",
        "body.engagementAttributes.3.service.status: Input should be less than or equal to 13",
    ]


def test_integers_reject_floats_and_bools() -> None:
    body = {"pageId": "p", "impAttributes": [{"type": "impClose", "campaign": 1.0, "engId": True}]}

    assert errors_of(message(body)) == [
        "body.impAttributes.0.campaign: Input should be a valid integer",
        "body.impAttributes.0.engId: Input should be a valid integer",
    ]


def test_extra_fields_inside_the_body_pass_through() -> None:
    sde = {"type": "cart", "total": 1.5, "numItems": 1, "promo": {"code": "X"}}
    body = {"pageId": "p", "engagementAttributes": [sde], "futureField": [1, 2]}

    update = SessionUpdate.model_validate(message(body))

    assert update.body.model_dump(exclude_unset=True) == body
    assert update.body.engagement_attributes is not None
    assert update.body.engagement_attributes[0].model_extra == {"promo": {"code": "X"}}


@pytest.mark.parametrize("account_id", ["1234/5678", "a" * 21, "", "12 34", "../x", 12345678])
def test_bad_account_id_is_rejected(account_id: object) -> None:
    (error,) = errors_of(message(accountId=account_id))

    assert error.startswith("accountId: ")


def test_account_id_pattern_is_named_in_the_error() -> None:
    assert errors_of(message(accountId="1234/5678")) == [
        "accountId: String should match pattern '^[A-Za-z0-9_]{1,20}$'"
    ]


@pytest.mark.parametrize("field", ["visitorId", "sessionId", "id"])
@pytest.mark.parametrize("value", ["", "a\nb", "tab\there", "x" * 257, "nul\x00", 7])
def test_bad_ids_are_rejected(field: str, value: object) -> None:
    (error,) = errors_of(message(**{field: value}))

    assert error.startswith(f"{field}: ")


def test_a_message_whose_wire_form_outgrows_the_cap_is_refused_before_it_is_sent() -> None:
    # Python names go through the models, which write 1e9 as 1000000000.0: under the cap
    # as pushed, its retry would be far over it, and refused after a first attempt.
    item = {"product": {"price": "BIG"}}
    cart = {"type": "cart", "total": 1.0, "num_items": 1, "products": [item] * 300}
    body = {"page_id": "p", "engagementAttributes": [cart]}
    raw = orjson.dumps(message(body)).replace(b'"BIG"', b"1e9")
    assert len(raw) < 8192
    with pytest.raises(InvalidMessage, match="over the 8192-byte cap in wire form"):
        decode(raw, 8192)
    assert decode(raw, 16384).body.count(b"1000000000.0") == 300


@pytest.mark.parametrize("extra", [b"", b'"attempts":1,'])
def test_an_element_over_the_cap_that_is_no_json_is_said_to_be_too_large(extra: bytes) -> None:
    # Within the allowance, it was read for the forwarder's own fields first, and said
    # to be no JSON: its size, found first, was not said at all.
    raw = b"{" + extra + b'"x":"' + b"y" * 4096 + b'"'  # cut short: no closing brace
    with pytest.raises(InvalidMessage, match="over the 4096-byte cap"):
        decode(raw, 4096)


def test_each_form_the_forwarder_writes_back_fits_the_allowance() -> None:
    # A producer's element at the cap, no id, and an enqueuedAt that grows when written
    # again: its retry, a park and a replay each carry one of the forwarder's own fields.
    raw = wire(body={"pageId": "p", "note": ""}, enqueuedAt=0).replace(b'"id":"m-1",', b"")
    raw = raw.replace(b'"enqueuedAt":0', b'"enqueuedAt":1e15')
    raw = raw.replace(b'"note":""', b'"note":"' + b"x" * (4096 - len(raw)) + b'"')
    policy = RetryPolicy((1.0,) * 3, 60.0)
    failed = Attempt(None, 0.1, failure="domain_lookup")
    claimed = Claimed(1, raw)
    park = parked(claimed, decode(raw, 4096).message, 1.0, "host_throttled")
    for _ in range(3):
        retry = after_attempt(claimed, decode(claimed.raw, 4096).message, failed, policy)
        claimed = Claimed(1, retry.settlement.payload)
    message = decode(claimed.raw, 4096).message
    dead = after_attempt(claimed, message, failed, policy).settlement.payload
    replay = DeadLetter.parse(dead).replay_message()
    assert replay is not None
    for again in (park.settlement.payload, claimed.raw, replay):
        assert len(again) > 4096
        decode(again, 4096)


@pytest.mark.parametrize("visitor_id", [".", ".."])
def test_a_visitor_id_that_is_a_dot_segment_is_refused(visitor_id: str) -> None:
    # Sent, /visitors/.. would be resolved to another resource of the API.
    (error,) = errors_of(message(visitorId=visitor_id))
    assert error.startswith("visitorId: String should match pattern")
    with pytest.raises(InvalidMessage, match="visitorId"):
        decode(wire(visitorId=visitor_id), 1 << 20)


@pytest.mark.parametrize("visitor_id", ["...", ".v", "v.", "..v", "v..", "é."])
def test_visitor_ids_with_dots_that_are_no_dot_segment_pass(visitor_id: str) -> None:
    assert decode(wire(visitorId=visitor_id), 1 << 20).message["visitorId"] == visitor_id


def test_a_session_id_of_dots_passes_it_goes_in_the_query() -> None:
    assert decode(wire(sessionId=".."), 1 << 20).message["sessionId"] == ".."


@pytest.mark.parametrize("field", ["visitorId", "sessionId", "id"])
@pytest.mark.parametrize("raw_id", [b'"v\\u0001"', b'"v\\t"', b'"v\x7f"', b'"v\xc2\x85"'])
def test_control_characters_in_ids_are_refused_however_the_json_spells_them(
    field: str, raw_id: bytes
) -> None:
    # Escaped (C0), as is (DEL), as UTF-8 (C1): each takes the decoder with the pattern.
    raw = wire(**{field: "PLACEHOLDER"}).replace(b'"PLACEHOLDER"', raw_id)
    with pytest.raises(InvalidMessage, match=field):
        decode(raw, 1 << 20)
    printable = raw.replace(raw_id, '"v\u00e9\u00a3"'.encode())  # é and £ (0xC2 0xA3) pass
    assert decode(printable, 1 << 20).message[field] == "v\u00e9\u00a3"


def test_unknown_envelope_field_is_rejected() -> None:
    msg = message()
    msg["sesionId"] = msg.pop("sessionId")

    assert errors_of(msg) == [
        "sessionId: Field required",
        "sesionId: Extra inputs are not permitted",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempts", -1), ("replayed", -1), ("attempts", "1"), ("enqueuedAt", "now"), ("id", "")],
)
def test_bad_bookkeeping_values_are_rejected(field: str, value: object) -> None:
    (error,) = errors_of(message(**{field: value}))

    assert error.startswith(f"{field}: ")


def test_format_errors_on_non_object_input() -> None:
    assert errors_of(["not", "an", "object"]) == [
        "(root): Input should be a valid dictionary or instance of SessionUpdate"
    ]


def test_format_errors_on_non_object_body() -> None:
    assert errors_of(message("body")) == [
        "body: Input should be a valid dictionary or instance of UpdateSessionBody"
    ]


def test_json_schema_describes_the_wire_message() -> None:
    schema = message_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Forwarder session update"
    assert schema["required"] == ["accountId", "visitorId", "sessionId", "body"]
    assert schema["additionalProperties"] is False
    assert all(prop.get("description") for prop in schema["properties"].values())
    body = schema["$defs"]["UpdateSessionBody"]
    assert body["required"] == ["pageId"]
    assert schema["$defs"]["Cart"]["required"] == ["type", "total", "numItems"]
    assert json.loads(json.dumps(schema)) == schema


def test_json_schema_maps_every_type_tag() -> None:
    body = message_json_schema()["$defs"]["UpdateSessionBody"]["properties"]

    def mapping(field: str) -> set[str]:
        items = body[field]["anyOf"][0]["items"]
        return set(items["discriminator"]["mapping"])

    assert mapping("impAttributes") == {event["type"] for event, _ in IMPRESSION_EXAMPLES}
    assert mapping("engagementAttributes") == {sde["type"] for sde, _ in SDE_EXAMPLES}


# --- the fast validator: the models' verdicts and errors, without model objects -------------

SAMPLE_MESSAGES = (
    [message(copy.deepcopy(body)) for body in SAMPLE_BODIES]
    + [sde_message(sde) for sde, _ in SDE_EXAMPLES]
    + [message({"pageId": "p", "impAttributes": [event]}) for event, _ in IMPRESSION_EXAMPLES]
)
SAMPLE_IDS = [f"sample{i}" for i in range(len(SAMPLE_BODIES))] + [
    m.__name__ for _, m in SDE_EXAMPLES + IMPRESSION_EXAMPLES
]
TAGS = [event["type"] for event, _ in IMPRESSION_EXAMPLES + SDE_EXAMPLES]
_DELETE = object()


def _deep(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


# Wrong types, numbers as strings, bools for ints, floats JSON cannot carry, ids with C0/C1
# control characters or over length, and values no JSON parser produces.
ODD_VALUES: list[object] = [
    *["", "x", "12", "1.5", "MALE", "cart", "1234/5678", "a" * 21, "x" * 300],
    *["a\nb", "nul\x00", "c1\x85", "é", ".", "..", "..."],
    *[0, 1, 2, -1, 7, 14, 2**64, 1.0, 2.5, float("nan"), float("inf"), float("-inf")],
    *[True, False, None, [], [1], ["x"], {}, {"a": 1}, [{}]],
    *[b"bytes", (1,), {1, 2}, object()],
]
UNKNOWN_FIELD_VALUES: list[object] = [
    *[1, None, "x", [1, "x"], {"nested": {"deeper": [True]}}, _deep(100), _deep(300)],
    *[float("nan"), [float("inf")], {"k": object()}, b"bytes", {1: "int key"}],
]


def _paths(node: object, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], object]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


def _replaced(msg: dict[str, Any], path: tuple[Any, ...], value: object) -> object:
    """``msg`` with the value at ``path`` replaced (or deleted, for ``_DELETE``)."""
    if not path:
        return value
    out = copy.deepcopy(msg)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def _snake(key: str) -> str:
    return re.sub("[A-Z]", lambda m: "_" + m[0].lower(), key)


def mutations(msg: dict[str, Any]) -> Iterator[object]:
    """``msg``, and ``msg`` broken (or not) in every place, one way at a time."""
    yield msg
    for path, node in _paths(msg):
        if path:
            yield _replaced(msg, path, _DELETE)
        for value in ODD_VALUES:
            yield _replaced(msg, path, value)
        if not isinstance(node, dict):
            continue
        for value in UNKNOWN_FIELD_VALUES:
            yield _replaced(msg, path, {**node, "unknownField": value})
        for key, value in node.items():
            snake = _snake(key)
            if snake != key:
                yield _replaced(msg, path, {(snake if k == key else k): v for k, v in node.items()})
                yield _replaced(msg, path, {**node, snake: value})
                yield _replaced(msg, path, {**node, snake: 12})
        if "type" in node:
            for tag in [*TAGS, "wishlist", "", None, 5, ["cart"]]:
                yield _replaced(msg, path, {**node, "type": tag})


def model_errors(data: object) -> list[str] | None:
    try:
        SessionUpdate.model_validate(data)
    except ValidationError as exc:
        return format_errors(exc)
    return None


def fast_accepts(data: object) -> bool:
    """The fast validator's verdict, where validate_wire asks it; else the models'."""
    verdict = _fast_verdict(data)
    return model_errors(data) is None if verdict is None else verdict


def wire_errors(data: object) -> list[str] | None:
    try:
        validate_wire(data)
    except InvalidMessage as exc:
        return exc.errors
    return None


def disagreement(data: object) -> str | None:
    """How the fast validator and the models disagree on ``data``, if they do."""
    expected = model_errors(data)
    if fast_accepts(data) != (expected is None):
        return f"fast verdict differs: models say {expected} for {data!r}"
    got = wire_errors(data)
    if got != expected:
        return f"errors differ: {got} != {expected} for {data!r}"
    return None


@pytest.mark.parametrize("msg", SAMPLE_MESSAGES, ids=SAMPLE_IDS)
def test_fast_validator_agrees_with_the_models_on_mutations(msg: dict[str, Any]) -> None:
    verdicts = {"accepted": 0, "rejected": 0}
    disagreements = []
    for data in mutations(msg):
        verdicts["accepted" if model_errors(data) is None else "rejected"] += 1
        if (problem := disagreement(data)) is not None:
            disagreements.append(problem)

    assert disagreements[:5] == []
    assert verdicts["accepted"] > 10
    assert verdicts["rejected"] > 100


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
FIELD_NAMES = sorted(
    {
        key
        for msg in SAMPLE_MESSAGES
        for path, _ in _paths(msg)
        for key in path
        if isinstance(key, str)
    }
)


@given(st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_validator_agrees_with_the_models_on_random_json(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(SAMPLE_MESSAGES))
    path, node = data.draw(st.sampled_from(list(_paths(msg))))
    value = data.draw(json_values)
    if isinstance(node, dict) and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(FIELD_NAMES) | st.sampled_from(FIELD_NAMES).map(_snake))
        value = {**node, key: value}
    mutated = _replaced(msg, path, value)

    assert disagreement(mutated) is None


@pytest.mark.parametrize("data", [["not", "an", "object"], "text", None, 1.5])
def test_validate_wire_on_non_object_input(data: object) -> None:
    assert wire_errors(data) == [
        "(root): Input should be a valid dictionary or instance of SessionUpdate"
    ]


def test_validate_wire_names_the_model_of_a_non_object_field() -> None:
    # What the fast validator cannot say: hence the errors come from the models.
    assert wire_errors(message("body")) == [
        "body: Input should be a valid dictionary or instance of UpdateSessionBody"
    ]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), {1, 2}, b"bytes"])
def test_a_python_named_key_beside_its_wire_name_is_checked_as_the_models_check_it(
    value: object,
) -> None:
    # The fast validator knows wire names only; the models check this key as an extra.
    data = message({**DOCS_BODY, "imp_attributes": value})

    assert wire_errors(data) == model_errors(data) != None  # noqa: E711


def test_a_python_named_key_with_a_json_value_passes_as_an_extra() -> None:
    data = message({**DOCS_BODY, "imp_attributes": [1, "x"]})

    assert wire_errors(data) is None
    assert model_errors(data) is None


def test_validate_wire_takes_a_model_where_the_models_do() -> None:
    data = message(UpdateSessionBody.model_validate({"pageId": "p"}))

    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(data, option=PASSTHROUGH)
    assert model_errors(data) is None
    assert wire_errors(data) is None


def test_translation_refuses_models_that_validate_in_python() -> None:
    class Hooked(BaseModel):
        model_config = ConfigDict(strict=True)
        x: int = 0

        def model_post_init(self, context: Any) -> None:
            pass

    with pytest.raises(TypeError, match="post_init"):
        _fast_decoder(Hooked)


def test_translation_refuses_models_that_coerce() -> None:
    class Lax(BaseModel):
        x: int = 0

    with pytest.raises(TypeError, match="coerce"):
        _fast_decoder(Lax)


class ValidatesDefaults(BaseModel):
    model_config = ConfigDict(strict=True, validate_default=True)
    x: int = "not a number"  # type: ignore[assignment]


class ValidatesOneDefault(BaseModel):
    model_config = ConfigDict(strict=True)
    x: int = Field(default="not a number", validate_default=True)


@pytest.mark.parametrize("model", [ValidatesDefaults, ValidatesOneDefault])
def test_translation_refuses_defaults_that_are_validated(model: type[BaseModel]) -> None:
    with pytest.raises(TypeError, match="default"):
        _fast_decoder(model)


@pytest.mark.parametrize(
    ("pattern", "python"),
    [(r"^[0-6]$", r"^[0-6]\Z"), (r"^a", r"^a"), (r"^a\$", r"^a\\Z")],
)
def test_patterns_end_at_the_end_of_the_text_as_in_pydantic(pattern: str, python: str) -> None:
    assert _python_pattern(pattern) == python


@pytest.mark.parametrize("field", ["accountId", "visitorId", "sessionId"])
def test_a_final_newline_fails_an_anchored_pattern(field: str) -> None:
    data = message(**{field: "v1\n"})

    assert wire_errors(data) == model_errors(data) != None  # noqa: E711


def test_python_values_are_judged_as_the_json_they_are_pushed_as() -> None:
    body = {**DOCS_BODY, "impAttributes": tuple(DOCS_BODY["impAttributes"])}

    assert wire_errors(message(body)) is None


@pytest.mark.parametrize("spelled", ["as the producer writes it", "with every default", "spaced"])
def test_decode_gives_the_wire_form_with_an_id_and_the_body_as_written(spelled: str) -> None:
    raw = {
        "as the producer writes it": wire(),
        "with every default": orjson.dumps(message()),
        "spaced": json.dumps(message(), indent=1).encode(),
    }[spelled]
    given = orjson.loads(raw)

    decoded = decode(raw, 1 << 20)
    unnamed = decode(orjson.dumps({k: v for k, v in given.items() if k != "id"}), 1 << 20)

    assert orjson.loads(orjson.dumps(decoded.message)) == given
    assert orjson.loads(decoded.body) == given["body"]
    assert decoded.body in raw  # the very text, spacing and all
    assert re.fullmatch("[0-9a-f]{32}", unnamed.message["id"])


@pytest.mark.parametrize("compact", [True, False])
def test_a_key_twice_is_refused_in_the_envelope_and_sent_as_written_in_the_body(
    compact: bool,
) -> None:
    space = b"" if compact else b" "
    twice = b'"accountId":' + space + b'"1",' + space
    envelope = wire().replace(b'"accountId":', twice + b'"accountId":')
    with pytest.raises(InvalidMessage, match="duplicate key 'accountId'"):
        decode(envelope, 1 << 20)
    # LivePerson parses the body: each value was checked, its parser picks one.
    first = b'{"pageId":' + space + b'"first",' + space
    body_twice = wire().replace(b'{"pageId":', first + b'"pageId":')
    assert decode(body_twice, 1 << 20).body.count(b'"pageId"') == 2
    with pytest.raises(InvalidMessage, match=r"body\.pageId: Expected `str`, got `int`"):
        decode(body_twice.replace(b'"first"', b"1"), 1 << 20)  # both are checked


@pytest.mark.parametrize(
    "extra", [b'"x":1e999', b'"x":"\xff"', b'"x":"\\ud800"', b'"x":' + b"[" * 300 + b"]" * 300]
)
def test_a_body_field_the_models_do_not_know_is_read_in_full(extra: bytes) -> None:
    # msgspec skips unknown fields unread: such a body is read by orjson instead.
    raw = wire().replace(b'{"pageId":', b"{" + extra + b',"pageId":')
    if extra.startswith(b'"x":['):
        assert decode(raw, 1 << 20).body.startswith(b'{"x":[[[')
        return
    with pytest.raises(InvalidMessage, match="not valid JSON"):
        decode(raw, 1 << 20)


NOT_AN_OBJECT = "(root): a wire message must be a JSON object"


@pytest.mark.parametrize("msg", SAMPLE_MESSAGES, ids=SAMPLE_IDS)
def test_decode_agrees_with_the_models_on_mutations(msg: dict[str, Any]) -> None:
    # The worker's own path: its envelope is read straight into a dict, which drops an
    # unknown key rather than refusing it, and its account id is checked without a regex.
    disagreements = []
    for data in mutations(msg):
        try:
            raw = orjson.dumps(data)
        except orjson.JSONEncodeError:
            continue  # no JSON: never on a queue
        parsed = orjson.loads(raw)
        # The worker says a non-object is no wire message in words of its own.
        expected = model_errors(parsed) if isinstance(parsed, dict) else [NOT_AN_OBJECT]
        if (got := _worker_says(raw)) != expected:
            disagreements.append(f"{got} != {expected} for {raw!r}")

    assert disagreements[:5] == []


@pytest.mark.parametrize(
    ("account_id", "valid"),
    [
        *[("_", True), ("a_1", True), ("A" * 20, True), ("0" * 20, True)],
        *[("a" * 21, False), ("", False), ("a-b", False), ("a b", False), ("é", False)],
        # Letters and digits to str.isalnum, but not the pattern's ASCII ones.
        *[("\u0661\u0662", False), ("\uff41", False), ("x\u00b2", False)],
    ],
)
def test_decode_checks_the_account_id_as_the_models_do(account_id: str, valid: bool) -> None:
    data = message(accountId=account_id)
    raw = orjson.dumps(data)

    assert _worker_says(raw) == model_errors(data) == wire_errors(data)
    assert (model_errors(data) is None) is valid


def test_decode_takes_the_envelope_in_any_key_order() -> None:
    given = message()
    raw = orjson.dumps(dict(reversed(given.items())))

    decoded = decode(raw, MAX_MESSAGE_BYTES)

    assert list(decoded.message) == list(reversed(given))
    assert orjson.loads(orjson.dumps(decoded.message)) == given
    assert decoded.body == orjson.dumps(given["body"])


@pytest.mark.parametrize("extra", [b'"sesionId":"s1"', b'"accountId":"2"', b'"x":{"y":1}'])
def test_decode_refuses_an_envelope_key_unknown_or_given_twice(extra: bytes) -> None:
    raw = wire().replace(b'{"accountId"', b"{" + extra + b',"accountId"')

    with pytest.raises(InvalidMessage):
        decode(raw, MAX_MESSAGE_BYTES)


def test_decode_raises_the_models_errors() -> None:
    msg = message(accountId="1234/5678")

    with pytest.raises(InvalidMessage) as caught:
        decode(orjson.dumps(msg), 1 << 20)

    assert caught.value.errors == errors_of(msg)


@pytest.mark.parametrize("field", ["attempts", "replayed"])
def test_a_counter_the_forwarder_could_not_write_back_is_refused(field: str) -> None:
    message = {"accountId": "1", "visitorId": "v", "sessionId": "s", "body": {"pageId": "p"}}
    assert wire_errors({**message, field: COUNTER_MAX}) is None
    for value in (COUNTER_MAX + 1, 2**64 - 1, 10**30):
        assert disagreement({**message, field: value}) is None
        assert wire_errors({**message, field: value}) == [
            f"{field}: Input should be less than or equal to {COUNTER_MAX}"
        ]
        # Pushed by hand (orjson writes no integer past 64 bits), the worker refuses it.
        raw = orjson.dumps(message)[:-1] + f',"{field}":{value}}}'.encode()
        with pytest.raises(InvalidMessage):
            decode(raw, MAX_MESSAGE_BYTES)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('{"page_id":"p","orderRef":%d}', "body.orderRef"),
        ('{"page_id":"p","x":{"y":[-%d]}}', "body.x.y.0"),
        (
            '{"page_id":"p","impAttributes":[{"type":"impClose","campaign":%d}]}',
            "body.impAttributes.0.campaign",
        ),
        (
            '{"page_id":"p","engagementAttributes":[{"type":"cart","total":%d,"numItems":1}]}',
            "body.engagementAttributes.0.total",
        ),
    ],
)
def test_an_integer_past_64_bits_the_worker_must_write_again_is_refused(
    body: str, path: str
) -> None:
    # Python names make the worker write the message out again: orjson read the number
    # as a float, and the float was sent. Under wire names it is sent as written.
    big = 123456789012345678901234567890
    with pytest.raises(InvalidMessage) as caught:
        decode(_in_envelope(body % big).encode(), MAX_MESSAGE_BYTES)
    assert caught.value.errors == [f"{path}: integer past 64 bits"]
    as_written = (body % big).replace("page_id", "pageId")
    assert decode(_in_envelope(as_written).encode(), MAX_MESSAGE_BYTES).body == as_written.encode()


def test_the_largest_integer_orjson_writes_is_sent_whole_under_a_python_name() -> None:
    raw = _in_envelope('{"page_id":"p","x":18446744073709551615}').encode()
    assert decode(raw, MAX_MESSAGE_BYTES).body == b'{"pageId":"p","x":18446744073709551615}'


@pytest.mark.parametrize("depth", [254, 255])
def test_nesting_too_deep_to_write_again_is_an_invalid_message(depth: int) -> None:
    # The models read it, orjson could not write it out again: a TypeError, logged as a
    # crash in decoding. Under wire names it is sent as written.
    body = '{"page_id":"p","x":' + "[" * depth + "]" * depth + "}"
    with pytest.raises(InvalidMessage) as caught:
        decode(_in_envelope(body).encode(), MAX_MESSAGE_BYTES)
    assert caught.value.errors == ["(root): nested too deep to be written out again"]
    as_written = body.replace("page_id", "pageId")
    assert decode(_in_envelope(as_written).encode(), MAX_MESSAGE_BYTES).body == as_written.encode()


def _in_envelope(body: str) -> str:
    return '{"accountId":"123","visitorId":"v","sessionId":"s","body":' + body + "}"


def _models_say(raw: bytes) -> list[str] | None:
    return model_errors(orjson.loads(raw))


def _worker_says(raw: bytes) -> list[str] | None:
    try:
        decode(raw, MAX_MESSAGE_BYTES)
    except InvalidMessage as exc:
        return exc.errors
    return None


@pytest.mark.parametrize(
    "raw",
    [
        _in_envelope('{"page\\u005fid":"p"}'),  # the models take it
        '{"account\\u005fid":"123","visitorId":"v","sessionId":"s","body":{"pageId":"p"}}',
        # The models refuse it (a Python name is no unknown field of an impression).
        _in_envelope('{"pageId":"p","impAttributes":[{"type":"impDisplay","e\\u005fcontext":5}]}'),
    ],
    ids=["body_page_id", "envelope_account_id", "impression_e_context"],
)
def test_a_python_name_spelt_with_an_escape_gets_the_models_verdict(raw: str) -> None:
    assert _worker_says(raw.encode()) == _models_say(raw.encode())


def test_a_message_nested_deeper_than_msgspec_reads_is_refused_cleanly() -> None:
    deep = "[" * 1000 + "]" * 1000
    body = '{"pageId":"p","impAttributes":[{"type":"impExpanded","expanded":' + deep + "}]}"
    # Python's own parser (the duplicate-key check) stops there: refused, not a crash.
    assert _worker_says(_in_envelope(body).encode()) == ["(root): not valid JSON (RecursionError)"]

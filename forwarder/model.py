"""The wire format: what producers push onto the forwarder's Redis list.

Each list entry is one JSON object, a :class:`SessionUpdate` (camelCase keys)::

    {"id": "optional", "accountId": "12345678", "visitorId": "v1", "sessionId": "s1",
     "body": {"pageId": "4743822558", "impAttributes": [...], "engagementAttributes": [...]},
     "enqueuedAt": 1764380000.123, "attempts": 0, "lastError": null, "replayed": 0}

``accountId``, ``visitorId`` and ``sessionId`` address LivePerson's App Engagement API
"Update Session" call; ``body`` is that call's request body. ``enqueuedAt``, ``attempts``,
``lastError`` and ``replayed`` are the forwarder's own bookkeeping and never reach LivePerson.

The envelope is closed (unknown keys are rejected, so a typo such as ``sesionId`` fails
loudly). Inside ``body`` every known field is type-checked without coercion (``"12"`` is not
a number, ``true`` is not an integer), but unknown keys pass through untouched: LivePerson,
not the forwarder, is the authority on what the body may carry. The worker sends the body
as the producer wrote it; a key given twice is refused in the envelope, while in the body
each of its values is checked and LivePerson's parser picks one.

Dump the body with ``model_dump(exclude_unset=True)`` to get back exactly what the producer
sent: optional fields default to ``None``, and sending those nulls could wipe values that
LivePerson merges across updates (``personal``, ``ctmrinfo``, ``mrktInfo``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter, itemgetter
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    TypeAlias,
    TypedDict,
    Union,
    cast,
    get_args,
)

import msgspec
import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    JsonValue,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

MAX_MESSAGE_BYTES = 256 * 1024
# The forwarder counts attempts and replays up from what a message carries; past 64 bits
# the count could not be written back as JSON (orjson), so a message could be neither
# retried nor dead-lettered.
COUNTER_MAX = 2**31 - 1

_JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_JSON_SCHEMA_TITLE = "Forwarder session update"

# C0 and C1 control characters: ids end up in the request URL and in log lines.
_CONTROLS = r"\x00-\x1f\x7f-\x9f"
_PRINTABLE = rf"^[^{_CONTROLS}]*$"
# The same, but not "." or "..": the visitor id is a URL path segment, and those would be
# dot segments, which servers and proxies resolve to another resource. ("..." is not one.)
_PATH_SEGMENT = rf"^(?:\.*[^{_CONTROLS}.][^{_CONTROLS}]*|\.{{3,}})$"
_ACCOUNT_ID = r"^[A-Za-z0-9_]{1,20}$"


_WIRE_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    # A producer that sends "12" for a number has a bug; coercing would hide it until
    # LivePerson silently drops the attribute.
    strict=True,
    # NaN and Infinity are not JSON: orjson would send them as null.
    allow_inf_nan=False,
    # Titles would otherwise come from the camelCase alias: "Numitems".
    field_title_generator=lambda name, _: name.replace("_", " ").title(),
)


class _BodyModel(BaseModel):
    """Base of the Update Session body and of everything nested in it."""

    model_config = ConfigDict(**_WIRE_CONFIG, extra="allow")
    # Unknown fields pass through to the API, but only as real JSON values.
    __pydantic_extra__: dict[str, JsonValue]


def _one_error(error_type: str, message: str) -> GetPydanticSchema:
    """Report a failed union as one error on the field itself.

    Pydantic otherwise emits one error per union member, with the member's name appended
    to the path, which reads as if the producer had written a nested key.
    """

    def schema(source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        inner = handler(source)
        if inner["type"] != "union":
            return inner
        return {**inner, "custom_error_type": error_type, "custom_error_message": message}

    return GetPydanticSchema(schema)


# LivePerson's field table says 0/1/2 but its own examples send "MALE"/"FEMALE"; the full
# list of strings is not documented, so any string is let through.
Gender: TypeAlias = Annotated[
    Annotated[int, Field(ge=0, le=2)] | str,
    _one_error("gender_value", "Input should be 0, 1, 2 or a string such as 'MALE'"),
]
# The field table says int 0..6, the Update Session example sends the string "1".
Channel: TypeAlias = Annotated[
    Annotated[int, Field(ge=0, le=6)] | Annotated[str, Field(pattern=r"^[0-6]$")],
    _one_error("channel_value", "Input should be an integer 0 to 6, or the same as a string"),
]
PhoneType: TypeAlias = Literal[
    "HOME", "MOBILE", "WORK", "FAX", "MAIN", "HOME_FAX", "WORK_FAX", "PAGER", "OTHER"
]


# --- impression events (impAttributes) ---------------------------------------------------


class EContext(_BodyModel):
    """Engagement context of an impression, e.g. ``{"type": "engagementContext", "id": "1"}``."""

    type: str | None = None
    id: str | None = None


class _Impression(_BodyModel):
    campaign: int | None = Field(default=None, description="Campaign id.")
    eng_id: int | None = Field(default=None, description="Engagement id.")
    revision: int | None = Field(default=None, description="Engagement revision.")


class ImpDisplay(_Impression):
    """The engagement was shown to the visitor."""

    type: Literal["impDisplay"]
    e_context: list[EContext] | None = None


class ImpAccept(_Impression):
    """The visitor accepted (clicked) the engagement."""

    type: Literal["impAccept"]
    e_context: list[EContext] | None = None


class ImpExpanded(_Impression):
    """The engagement was expanded; LivePerson documents these fields only as nullable."""

    type: Literal["impExpanded"]
    expanded: Any = Field(default=None, description="Type undocumented; passed through as is.")
    user_init: Any = Field(default=None, description="Type undocumented; passed through as is.")
    actionable_items: Any = Field(
        default=None, description="Type undocumented; passed through as is."
    )


class ImpTimeout(_Impression):
    """The engagement timed out."""

    type: Literal["impTimeout"]


class ImpClose(_Impression):
    """The visitor closed the engagement."""

    type: Literal["impClose"]


# --- engagement attributes (SDEs, engagementAttributes) --------------------------------------


class Product(_BodyModel):
    name: str | None = None
    category: str | None = None
    sku: str | None = None
    price: float | None = None


class ProductItem(_BodyModel):
    product: Product | None = None
    quantity: int | None = None


class PurchaseCart(_BodyModel):
    """The cart a purchase settled."""

    num_items: int | None = None
    products: list[ProductItem] | None = None


class Date(_BodyModel):
    day: int | None = None
    month: int | None = None
    year: int | None = None


class Age(_BodyModel):
    age: float | None = Field(default=None, description="Age in years; LivePerson sends 30.0.")
    year: int | None = Field(default=None, description="Year of birth.")
    month: int | None = Field(default=None, description="Month of birth.")
    day: int | None = Field(default=None, description="Day of birth.")


class Address(_BodyModel):
    # Case is left to LivePerson: only the shape of an ISO 3166-1 alpha-2 code is checked.
    country: str | None = Field(
        default=None, pattern=r"^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2 code."
    )
    region: str | None = None


class Contact(_BodyModel):
    email: str | None = None
    phone: str | None = None
    phone_type: PhoneType | None = None
    address: Address | None = None


class Cart(_BodyModel):
    """The visitor's cart; a later ``cart`` replaces this one."""

    type: Literal["cart"]
    total: float = Field(description="Cart total; mandatory.")
    currency: str | None = None
    num_items: int = Field(description="Number of items in the cart; mandatory.")
    products: list[ProductItem] | None = None


class Purchase(_BodyModel):
    """A completed purchase."""

    type: Literal["purchase"]
    total: float | None = None
    currency: str | None = None
    order_id: str | None = None
    cart: PurchaseCart | None = None


class ProdView(_BodyModel):
    """Products the visitor viewed."""

    type: Literal["prodView"]
    currency: str | None = None
    products: list[ProductItem] | None = None


class SearchInfo(_BodyModel):
    """A search the visitor ran."""

    type: Literal["searchInfo"]
    keywords: list[str] | None = None


class CustomerInfoPayload(_BodyModel):
    ctype: str | None = None
    cstatus: str | None = None
    balance: float | None = None
    currency: str | None = None
    customer_id: str | None = None
    social_id: str | None = None
    imei: str | None = None
    user_name: str | None = None
    company_size: int | None = None
    company_branch: str | None = None
    account_name: str | None = None
    role: str | None = None
    last_payment_date: Date | None = None
    registration_date: Date | None = None
    login_status: int | None = None
    store_zip_code: str | None = None
    store_number: str | None = None


class CustomerInfo(_BodyModel):
    """Customer info (type ``ctmrinfo``); merged with earlier values. Carries PII."""

    type: Literal["ctmrinfo"]
    info: CustomerInfoPayload


class MarketingInfoPayload(_BodyModel):
    channel: Channel | None = Field(
        default=None,
        description="0 Direct, 1 Search, 2 Social, 3 Email, 4 Referral, 5 Paid search, 6 Display.",
    )
    affiliate: str | None = None
    campaign_id: str | None = None


class MarketingInfo(_BodyModel):
    """Marketing source (type ``mrktInfo``); merged with earlier values."""

    type: Literal["mrktInfo"]
    info: MarketingInfoPayload


class PersonalPayload(_BodyModel):
    firstname: str | None = None
    lastname: str | None = None
    age: Age | None = None
    contacts: list[Contact] | None = None
    gender: Gender | None = None
    language: str | None = Field(default=None, description='Locale, e.g. "en-US".')
    company: str | None = None


class Personal(_BodyModel):
    """Personal info; merged with earlier values. Carries PII."""

    type: Literal["personal"]
    personal: PersonalPayload


class LeadPayload(_BodyModel):
    topic: str | None = None
    value: float | None = None
    currency: str | None = None
    lead_id: str | None = None


class Lead(_BodyModel):
    """A sales lead."""

    type: Literal["lead"]
    lead: LeadPayload


class ServicePayload(_BodyModel):
    topic: str | None = None
    status: int | None = Field(
        default=None,
        ge=0,
        le=13,
        description=(
            "0 Complete, 1 In progress, 2 Approved, 3 Cancelled, 4 Not approved, 5 Reviewed, "
            "6 Missing details, 7 Closed, 8 Removed, 9 Assigned, "
            "10 Waiting for customer response, 11 Waiting for response, 12 Pending, 13 Resolved."
        ),
    )
    category: str | None = None
    service_id: str | None = None


class Service(_BodyModel):
    """A service activity, such as a support ticket."""

    type: Literal["service"]
    service: ServicePayload


class ErrorInfoPayload(_BodyModel):
    context_id: str | None = None
    message: str | None = None
    code: str | None = None
    level: int | None = None
    resolved: bool | None = None


class ErrorInfo(_BodyModel):
    """An error the visitor ran into (type ``error``)."""

    type: Literal["error"]
    error: ErrorInfoPayload


# --- the discriminated unions ------------------------------------------------------------

_ImpressionUnion: TypeAlias = ImpDisplay | ImpAccept | ImpExpanded | ImpTimeout | ImpClose
_EngagementUnion: TypeAlias = (
    Cart
    | Purchase
    | ProdView
    | SearchInfo
    | CustomerInfo
    | MarketingInfo
    | Personal
    | Lead
    | Service
    | ErrorInfo
)


def _tags(union: Any) -> tuple[str, ...]:
    models: tuple[type[BaseModel], ...] = get_args(union)
    return tuple(get_args(model.model_fields["type"].annotation)[0] for model in models)


_IMPRESSION_TYPES = _tags(_ImpressionUnion)
_ENGAGEMENT_TYPES = _tags(_EngagementUnion)

# format_errors points these at the item's "type" key, which pydantic cannot do for an
# error raised before the item is validated.
_TYPE_ERRORS = frozenset({"type_missing", "type_unknown", "type_misplaced"})
# The checkers below, which the fast validator leaves out (see _verdict_schema).
_TAG_CHECKERS: set[Callable[[object], object]] = set()


def _type_checker(
    kind: str, known: tuple[str, ...], other_kind: str, other: tuple[str, ...], hint: str
) -> BeforeValidator:
    """Explain a bad ``type`` in words, ahead of the discriminator's generic tag errors."""
    known_set, other_set = frozenset(known), frozenset(other)
    context = {"kind": kind, "known": ", ".join(known), "other_kind": other_kind}

    def check(value: object) -> object:
        if not isinstance(value, dict):
            return value
        tag = value.get("type")
        if isinstance(tag, str) and tag in known_set:
            return value
        if tag is None:
            raise PydanticCustomError(
                "type_missing", "Field required; known {kind} types: {known}", context
            )
        if isinstance(tag, str) and tag in other_set:
            raise PydanticCustomError(
                "type_misplaced",
                "{tag} is {other_kind} type: " + hint,
                {**context, "tag": repr(tag)},
            )
        raise PydanticCustomError(
            "type_unknown",
            "unknown {kind} type {tag}; known types: {known}",
            {**context, "tag": repr(tag)},
        )

    _TAG_CHECKERS.add(check)
    return BeforeValidator(check)


ImpressionEvent: TypeAlias = Annotated[
    _ImpressionUnion,
    Field(discriminator="type"),
    _type_checker(
        "impression event",
        _IMPRESSION_TYPES,
        "an engagement attribute",
        _ENGAGEMENT_TYPES,
        "engagement attributes belong in engagementAttributes, not impAttributes",
    ),
]
"""One item of ``impAttributes``, chosen by its ``type``."""

EngagementAttribute: TypeAlias = Annotated[
    _EngagementUnion,
    Field(discriminator="type"),
    _type_checker(
        "engagement attribute",
        _ENGAGEMENT_TYPES,
        "an impression event",
        _IMPRESSION_TYPES,
        "impression events belong in impAttributes, not engagementAttributes",
    ),
]
"""One item of ``engagementAttributes`` (an SDE), chosen by its ``type``."""


# --- the Update Session body and the envelope --------------------------------------------


class UpdateSessionBody(_BodyModel):
    """The App Engagement API "Update Session" request body."""

    page_id: str = Field(min_length=1, description="Page id returned by Create Session.")
    imp_attributes: list[ImpressionEvent] | None = Field(
        default=None, description="Impression events (impDisplay, impAccept, ...)."
    )
    engagement_attributes: list[EngagementAttribute] | None = Field(
        default=None, description="Engagement attributes (SDEs); no impression events here."
    )


class SessionUpdate(BaseModel):
    """One entry of the Redis list: an Update Session call plus the forwarder's bookkeeping."""

    model_config = ConfigDict(**_WIRE_CONFIG, extra="forbid")

    account_id: str = Field(pattern=_ACCOUNT_ID, description="LivePerson account (site) id.")
    visitor_id: str = Field(
        min_length=1,
        max_length=256,
        pattern=_PATH_SEGMENT,
        description="Visitor id returned by Create Session.",
    )
    session_id: str = Field(
        min_length=1,
        max_length=256,
        pattern=_PRINTABLE,
        description="Session id returned by Create Session.",
    )
    body: UpdateSessionBody = Field(description="Update Session request body, sent as is.")
    # In the order the producer writes them.
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=_PRINTABLE,  # printed by the ops CLI, one per line, and logged
        description="Producer-chosen message id, for tracing; optional.",
    )
    enqueued_at: float | None = Field(
        default=None, description="When the message was first pushed, in Unix seconds."
    )
    attempts: int = Field(
        default=0, ge=0, le=COUNTER_MAX, description="Failed delivery attempts so far."
    )
    last_error: str | None = Field(
        default=None, description="Why the latest delivery attempt failed."
    )
    replayed: int = Field(
        default=0,
        ge=0,
        le=COUNTER_MAX,
        description="Times the message was replayed from the dead-letter queue.",
    )


_UNION_LISTS = frozenset(
    {"impAttributes", "engagementAttributes", "imp_attributes", "engagement_attributes"}
)
_ALL_TYPES = frozenset(_IMPRESSION_TYPES + _ENGAGEMENT_TYPES)


def _wire_path(loc: tuple[int | str, ...]) -> list[int | str]:
    """Drop the tag segment pydantic inserts after a discriminated-union item's index.

    ``engagementAttributes.0.personal.personal.age`` becomes
    ``engagementAttributes.0.personal.age``, the path the producer actually wrote.
    """
    path: list[int | str] = []
    for i, part in enumerate(loc):
        is_tag = (
            i >= 2
            and isinstance(loc[i - 1], int)
            and loc[i - 2] in _UNION_LISTS
            and part in _ALL_TYPES
        )
        if not is_tag:
            path.append(part)
    return path


def format_errors(exc: ValidationError) -> list[str]:
    """Render each error as ``"<dotted.wire.path>: <message>"``; ``(root)`` for the top."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        path = _wire_path(error["loc"])
        if error["type"] in _TYPE_ERRORS:
            path.append("type")
        lines.append(f"{'.'.join(map(str, path)) or '(root)'}: {error['msg']}")
    return lines


def message_json_schema() -> dict[str, Any]:
    """JSON Schema of a list entry, with the camelCase keys producers write."""
    schema = SessionUpdate.model_json_schema(by_alias=True)
    return {"$schema": _JSON_SCHEMA_DIALECT, **schema, "title": _JSON_SCHEMA_TITLE}


DeadReason = Literal["client_error", "retries_exhausted", "invalid_message"]

# Fields the forwarder keeps on a message between attempts; a dead-letter record
# carries them at its top level instead, so its `message` is what the producer sent.
BOOKKEEPING = ("attempts", "lastError")


def iso_utc(seconds: float, timespec: str = "seconds") -> str:
    """``seconds`` (Unix time) as ISO-8601 UTC ending in ``Z``, as in a record's ``deadAt``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


class InvalidMessage(ValueError):
    """A queue element that is not a valid wire message; ``errors`` as :func:`format_errors`."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def parse_object(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object, refusing a key given twice at its top level (parsers disagree
    on which one wins); inside, as in the body, that is left to the body's reader."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage([f"(root): not valid JSON ({exc})"]) from None
    if not isinstance(data, dict):
        raise InvalidMessage(["(root): a wire message must be a JSON object"])
    # Compact JSON (what orjson and our producer write) that re-serializes to the same
    # bytes cannot have had a duplicate key; anything else gets the slower check.
    try:
        canonical = orjson.dumps(data) == raw
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (255)
        canonical = False
    if not canonical:
        _check_duplicate_keys(raw)
    return data


# A run of digits as long as an integer past 64 bits can be.
_LONG_DIGITS = re.compile(rb"\d{19}")


def whole_numbers(raw: bytes, data: dict[str, Any]) -> dict[str, Any]:
    """``data``, as :func:`parse_object` read it from ``raw``, with its integers past 64
    bits kept whole: orjson reads one as a float, changing it without a word, where the
    standard library keeps it, for the writer (orjson again) to refuse."""
    return cast(dict[str, Any], json.loads(raw)) if _LONG_DIGITS.search(raw) else data


def _check_duplicate_keys(raw: bytes) -> None:
    closed: list[list[str]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        closed.append([key for key, _ in pairs])
        return dict(pairs)

    try:
        json.loads(raw, object_pairs_hook=pairs_hook)
    except (RecursionError, ValueError) as exc:
        raise InvalidMessage([f"(root): not valid JSON ({type(exc).__name__})"]) from None
    seen: set[str] = set()
    for key in closed[-1]:  # the top level closes last
        if key in seen:
            raise InvalidMessage([f"(root): duplicate key {key!r}"])
        seen.add(key)


# --- the fast validator -----------------------------------------------------------------
#
# The worker and the producer need only the verdict on a message (and, when it fails, the
# errors). msgspec checks a message's JSON against the same rules in about two thirds of
# the time pydantic-core takes on the parsed dict (measured on the docs' example: 4.8 vs
# 7.5 µs), so the models' own core schema is translated, once at import, into msgspec types:
#
# - a model becomes a Struct with the same wire names and required fields, closed where
#   the model forbids extras (open ones ignore extras: from JSON they are always JSON values);
#   the root may become a TypedDict instead, read straight into the dict the worker keeps;
# - constraints (pattern, lengths, bounds), literals, lists, unions and the discriminated
#   unions (tagged Structs) carry over; the ``type`` checkers go: they only choose the
#   words of an error, and the tagged union rejects exactly the items they reject.
#
# Any other schema feature stops the import rather than being dropped silently. Where the
# translation cannot see what the models see (a Python name used instead of a wire name,
# a null that orjson wrote for NaN), the message goes to the models; errors are rare, so
# their texts always come from the models. tests/test_model.py checks the verdicts agree
# on mutations of every sample body and on random JSON.

# Keys of a node that the translation reads, or that change no verdict.
_INERT_MODEL_KEYS = frozenset({"type", "cls", "schema", "config", "ref", "metadata"})
_INERT_FIELDS_KEYS = frozenset(
    {"type", "fields", "model_name", "computed_fields", "extras_schema", "metadata"}
)
_CONSTRAINTS = frozenset({"pattern", "min_length", "max_length", "ge", "le", "gt", "lt"})
_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


class _Translation:
    """The msgspec type of a core schema, Structs shared between the places that use them."""

    def __init__(
        self,
        model: type[BaseModel],
        implied: frozenset[str] = frozenset(),
        *,
        closed: bool = False,
        raw: frozenset[str] = frozenset(),
        as_dict: bool = False,
    ) -> None:
        self._implied = implied  # patterns the caller checks by other means
        self._closed = closed  # unknown fields refused, also where the models allow them
        self._root, self._raw = model, raw  # the root's fields kept as their JSON text
        # The root as a TypedDict, decoded straight into the dict a caller keeps (no
        # conversion a message): unknown keys are dropped, not refused, so that caller
        # must tell them by other means (decode writes the dict back and compares).
        self._as_dict = as_dict
        self._definitions: dict[str, Any] = {}
        self._structs: dict[tuple[str, str | None], Any] = {}
        self.type = self.of(model.__pydantic_core_schema__)

    def of(self, node: Any) -> Any:
        kind = node["type"]
        if kind == "definitions":
            self._definitions.update((d["ref"], d) for d in node["definitions"])
            return self.of(node["schema"])
        if kind == "definition-ref":
            return self.of(self._definitions[node["schema_ref"]])
        if kind == "model":
            return self.struct(node)
        if kind == "tagged-union":
            key = node["discriminator"]
            return _union(self.struct(self._model(c), (key, t)) for t, c in node["choices"].items())
        if kind == "union":
            return _union(self.of(c[0] if isinstance(c, tuple) else c) for c in node["choices"])
        if kind == "nullable":
            return self.of(node["schema"]) | None
        if kind == "list":
            return self._constrained(list[self.of(node["items_schema"])], node, {"items_schema"})  # type: ignore[misc]
        if kind == "literal":
            return Literal[tuple(node["expected"])]
        if kind == "any":
            return Any
        if kind == "function-before" and node["function"]["function"] in _TAG_CHECKERS:
            return self.of(node["schema"])
        if kind in _SCALARS:
            return self._scalar(node)
        raise TypeError(f"no msgspec translation for a {kind!r} schema")

    def _model(self, node: Any) -> Any:
        return self._definitions[node["schema_ref"]] if node["type"] == "definition-ref" else node

    def struct(self, node: Any, tag: tuple[str, str] | None = None) -> Any:
        key = (node["ref"], tag[1] if tag else None)
        if key not in self._structs:
            self._structs[key] = self._new_struct(node, tag)
        return self._structs[key]

    def _new_struct(self, node: Any, tag: tuple[str, str] | None) -> Any:
        model = cast(core_schema.ModelSchema, node)
        fields = cast(core_schema.ModelFieldsSchema, model["schema"])
        unknown = {k for k, v in model.items() if v} - _INERT_MODEL_KEYS
        unknown |= {k for k, v in fields.items() if v} - _INERT_FIELDS_KEYS
        config = model.get("config", {})
        if config.get("validate_default"):
            unknown.add("validate_default")
        if unknown:
            raise TypeError(f"{model['cls'].__name__}: no msgspec translation for {unknown}")
        members: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        rename: dict[str, str] = {}
        raw = self._raw if model["cls"] is self._root else frozenset()
        for name, field in fields["fields"].items():
            if tag is not None and name == tag[0]:
                continue  # the Struct's tag checks it
            schema = field["schema"]
            if name in raw:
                members.append((name, msgspec.Raw))
            elif schema["type"] == "default":
                if "validate_default" in schema or "on_error" in schema:
                    raise TypeError(f"{name}: no msgspec translation for its default")
                members.append((name, self.of(schema["schema"]), None))
            else:
                members.append((name, self.of(schema)))
            alias = field.get("validation_alias")
            rename[name] = alias if isinstance(alias, str) else name
        if self._as_dict and model["cls"] is self._root:
            return _typed_dict(model["cls"].__name__, members, rename)
        return msgspec.defstruct(
            model["cls"].__name__,
            members,
            kw_only=True,
            rename=rename,
            forbid_unknown_fields=self._closed or config.get("extra_fields_behavior") == "forbid",
            # Absent fields decode to None: encoding leaves them out, as the producer did.
            omit_defaults=True,
            tag_field=tag[0] if tag else None,
            tag=tag[1] if tag else None,
            # Never tracked by the garbage collector: the verdict drops them at once, and
            # they hold only JSON values, so no cycle (measured: 9 % off a decode).
            gc=False,
        )

    def _scalar(self, node: Any) -> Any:
        # JSON has no NaN or Infinity (orjson and msgspec refuse 1e999): allow_inf_nan is moot.
        pattern = node.get("pattern")
        keep = pattern is not None and pattern not in self._implied
        extra = {"pattern": _python_pattern(pattern)} if keep else {}
        return self._constrained(_SCALARS[node["type"]], node, {"pattern", "strict"}, extra)

    @staticmethod
    def _constrained(
        base: Any, node: Any, handled: set[str], extra: dict[str, Any] | None = None
    ) -> Any:
        unknown = set(node) - _CONSTRAINTS - handled - {"type", "metadata", "allow_inf_nan"}
        if unknown:
            raise TypeError(f"no msgspec translation for {unknown} on a {node['type']!r}")
        meta = {k: v for k, v in node.items() if k in _CONSTRAINTS - handled}
        meta.update(extra or {})
        return Annotated[base, msgspec.Meta(**meta)] if meta else base


def _typed_dict(
    name: str, members: list[tuple[str, Any] | tuple[str, Any, Any]], rename: dict[str, str]
) -> Any:
    """A TypedDict of ``members`` (a field with a default may be left out), by wire name.

    A field kept as JSON text may be left out too: msgspec (0.23) refuses a required Raw
    in a TypedDict ("Expected `raw`, got `object`"). The caller checks it is there.
    """
    fields = {
        rename[m[0]]: NotRequired[m[1]] if len(m) == 3 or m[1] is msgspec.Raw else m[1]
        for m in members
    }
    return TypedDict(name, fields)  # type: ignore[operator]


def _union(members: Iterable[Any]) -> Any:
    return Union[tuple(members)]  # noqa: UP007 (built at run time)


def _python_pattern(pattern: str) -> str:
    """``pattern`` for Python's re: pydantic's Rust regex reads ``$`` as the end of the text,
    Python's also matches before a final newline."""
    if "$" in pattern.removesuffix("$"):
        raise TypeError(f"no msgspec translation for the pattern {pattern!r}")
    return pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern


def _fast_decoder(
    model: type[BaseModel],
    implied: frozenset[str] = frozenset(),
    *,
    closed: bool = False,
    raw: frozenset[str] = frozenset(),
    as_dict: bool = False,
) -> msgspec.json.Decoder[Any]:
    if not model.model_config.get("strict"):
        raise TypeError(f"{model.__name__}: msgspec never coerces; the models must not either")
    translation = _Translation(model, implied, closed=closed, raw=raw, as_dict=as_dict)
    return msgspec.json.Decoder(translation.type)


_DOT_SEGMENTS = frozenset({".", ".."})


@dataclass(frozen=True, slots=True)
class _Judges:
    """A message's msgspec translation, and the same but for the ids' patterns, for JSON
    in which no string can hold a control character: nearly every message, and a Python
    re call less for each id, a fifth or more off the verdict's time (the visitor id's
    dot segments are then looked for by a set lookup, the account id's characters by
    string methods)."""

    full: msgspec.json.Decoder[Any]
    plain: msgspec.json.Decoder[Any]
    ids: Callable[[Any], tuple[str, str]]  # the account and visitor ids of a decoded one

    @classmethod
    def of(cls, raw: frozenset[str] = frozenset(), *, as_dict: bool = False) -> _Judges:
        full = _fast_decoder(SessionUpdate, raw=raw, as_dict=as_dict)
        implied = frozenset({_PRINTABLE, _PATH_SEGMENT, _ACCOUNT_ID})
        plain = _fast_decoder(SessionUpdate, implied, raw=raw, as_dict=as_dict)
        if as_dict:
            return cls(full, plain, itemgetter("accountId", "visitorId"))
        return cls(full, plain, attrgetter("account_id", "visitor_id"))

    def decode(self, raw: bytes) -> Any:
        """``raw`` decoded and checked, as by the full translation (whose errors it
        raises); None where only the models can judge it."""
        if _has_python_names(raw):
            return None
        if _may_hold_controls(raw):
            return self.full.decode(raw)
        decoded = self.plain.decode(raw)
        account, visitor = self.ids(decoded)
        if visitor in _DOT_SEGMENTS or not _is_account_id(account):
            return self.full.decode(raw)  # refuses it, naming the pattern
        return decoded


def _is_account_id(text: str) -> bool:
    """Does ``text`` match :data:`_ACCOUNT_ID`? (isalnum alone takes any letter or digit.)"""
    return len(text) <= 20 and text.isascii() and text.replace("_", "0").isalnum()


_VERDICT = _Judges.of()


# Searched for as ints: a bytes needle costs 9 times as much (CPython 3.11).
_BACKSLASH, _DEL, _C1_LEAD, _UNDERSCORE = 0x5C, 0x7F, 0xC2, 0x5F


def _may_hold_controls(raw: bytes) -> bool:
    # JSON has C0 controls only as escapes; DEL may stand as is; a C1 control is
    # U+0080-U+009F, whose UTF-8 starts with 0xC2 (so do a few printable characters).
    return _BACKSLASH in raw or _DEL in raw or _C1_LEAD in raw


def _python_names(model: type[BaseModel]) -> set[str]:
    names = {name for name, field in model.model_fields.items() if field.alias != name}
    for sub in model.__subclasses__():
        names |= _python_names(sub)
    return names


# The models also take a field under its Python name (``imp_attributes``), which the fast
# validator knows only by its wire name: messages with such a key go to the models.
_PYTHON_NAMES = frozenset(
    name.encode() for name in _python_names(SessionUpdate) | _python_names(_BodyModel)
)
_SNAKE_KEY = re.compile(rb'"([a-z][a-z0-9]*_[a-z0-9_]*)"\s*:')
# An escape of a digit, a letter or an underscore (U+0030 to U+007F).
_ASCII_ESCAPE = re.compile(rb"\\u00[3-7][0-9a-fA-F]")
# Python values with no JSON form of their own stop orjson, for the models to name.
PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _has_python_names(raw: bytes) -> bool:
    if _BACKSLASH in raw and _ASCII_ESCAPE.search(raw):
        # A key may spell a character of a Python name as an escape (page\u005fid): look
        # at the keys as orjson writes them, literally. (Other escapes, a quote or a
        # non-ASCII character, cannot spell one: no round trip for them.)
        with contextlib.suppress(orjson.JSONDecodeError, orjson.JSONEncodeError):
            raw = orjson.dumps(orjson.loads(raw))
    # Most messages have no underscore at all: one scan in C rules them out.
    return _UNDERSCORE in raw and not _PYTHON_NAMES.isdisjoint(_SNAKE_KEY.findall(raw))


def validate_wire(data: object, raw: bytes | None = None) -> SessionUpdate | None:
    """Raise :class:`InvalidMessage` unless ``data`` is a valid wire message (a dict).

    Accepts and rejects what ``SessionUpdate.model_validate`` does, with the same
    :func:`format_errors` texts, in less time: the fast validator reads
    ``data``'s JSON (``raw``: ``orjson.dumps(data)``, if the caller has it). Python values
    that orjson writes as JSON (a tuple as an array, a UUID or an Enum as a string) are
    taken as that JSON; the models alone would refuse them.

    Returns the models' instance where they judged ``data`` (a field under its Python
    name, for one: see :func:`wire_form`), None where the fast validator took it.
    """
    if _fast_verdict(data, raw):
        return None
    return _check_by_models(data)


def _fast_verdict(data: object, raw: bytes | None = None) -> bool | None:
    """The fast validator's verdict on ``data``; None where only the models can judge it."""
    if raw is None:
        try:
            raw = orjson.dumps(data, option=PASSTHROUGH)
        except orjson.JSONEncodeError:
            return None  # no JSON at all: the models say where
    if b"null" in raw and non_finite_at(data) is not None:
        return None  # orjson wrote NaN or Infinity as null
    return _json_verdict(raw)


def non_finite_at(value: object) -> str | None:
    """The path (``body.x.0``) of a NaN or infinite float in ``value``, if there is one."""
    return _first_at(value, lambda v: isinstance(v, float) and not math.isfinite(v))


def _past_64_bits_at(value: object) -> str | None:
    """The path of an integer orjson cannot write (past 64 bits) in ``value``, if any."""
    return _first_at(value, lambda v: isinstance(v, int) and not -(2**63) <= v < 2**64)


def _first_at(value: object, wanted: Callable[[object], bool], path: str = "") -> str | None:
    if wanted(value):
        return path or "(root)"
    if isinstance(value, Mapping):
        items: Iterable[tuple[object, object]] = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_at(item, wanted, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _json_verdict(raw: bytes) -> bool | None:
    """The fast validator's verdict on a message's JSON; None where it cannot judge it."""
    try:
        decoded = _VERDICT.decode(raw)
    except msgspec.ValidationError:
        return False
    except RecursionError:  # nested deeper than msgspec reads (the models read on)
        return None
    return None if decoded is None else True


def _check_by_models(data: object) -> SessionUpdate:
    # The models have the last word, on the verdict too: a model instance where a dict
    # is expected (producers in Python) passes there, as it always has.
    try:
        return SessionUpdate.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(format_errors(exc)) from None


def wire_form(model: BaseModel) -> dict[str, Any]:
    """``model``'s fields under their wire names, only those given, as Python values.

    The models also take a field under its Python name (``account_id``, ``page_id``),
    but the worker reads wire names and the API knows only those: a message the models
    judged is written out again in this form.
    """
    # Python values, not JSON ones: a model's "JSON" would turn NaN into null, a Decimal
    # or a datetime into a string, a set into a list, where the checks that follow
    # (orjson's, non_finite_at) refuse them in a dict; a model is judged as a dict is.
    # No warnings: pydantic's, for a field set to a wrong type after validation, quote
    # the value (personal data); the validation that follows names the field instead.
    return model.model_dump(by_alias=True, exclude_unset=True, warnings=False)


# What the forwarder may add to a message on its way (an id where the producer gave none,
# attempts, lastError, replayed) and how much re-encoding its envelope may lengthen it: a
# message taken at the cap must not become too large for its retry.
BOOKKEEPING_BYTES = 256
# The fields only the forwarder writes: a retry has attempts, a parked message lastError,
# a replay replayed. An element without any is a producer's, held to the producers' cap:
# taken above it, its first retry would be over the allowance and dead-lettered.
_FORWARDERS_OWN = frozenset({"attempts", "lastError", "replayed"})


def too_large(size: int, max_bytes: int) -> str:
    return f"(root): message is {size} bytes, over the {max_bytes}-byte cap"


def _refuse_over_cap(
    size: int, max_bytes: int, keys: Callable[[], Iterable[str]], where: str = ""
) -> None:
    """Refuse a message of ``size`` bytes, over ``max_bytes``, unless it carries the
    forwarder's own fields (``keys()``: its top-level keys) and is within the allowance."""
    if size > max_bytes + BOOKKEEPING_BYTES or _FORWARDERS_OWN.isdisjoint(keys()):
        raise InvalidMessage([too_large(size, max_bytes) + where])


def _top_keys(raw: bytes) -> Iterable[str]:
    """The element's top-level keys; none where it is no JSON object: its size is the
    first thing wrong with it, and said first."""
    try:
        return parse_object(raw).keys()
    except InvalidMessage:
        return ()


class Decoded(msgspec.Struct, gc=False):  # a Struct, as forwarder.queue.Claimed
    """A valid queue element: the Update Session body to send, as the producer wrote it,
    and the wire form, whose ``body`` is that text again (an :class:`orjson.Fragment`,
    written out as is when the message is re-enqueued or dead-lettered)."""

    message: dict[str, Any]
    body: bytes


# The worker's fast path reads each message once, with msgspec: the envelope checked and
# the body located (kept as its JSON text), straight into the message's dict, then the
# body checked against closed types, which read every value of it. See decode.
_BODY = frozenset({"body"})
_ENVELOPE = _Judges.of(raw=_BODY, as_dict=True)
_CLOSED_BODY = _fast_decoder(UpdateSessionBody, closed=True)
_encode = msgspec.json.Encoder().encode


def decode(raw: bytes, max_bytes: int) -> Decoded:
    """Parse and validate one queue element of at most ``max_bytes`` (the producers' cap;
    :data:`BOOKKEEPING_BYTES` more once the forwarder has added its own fields); an ``id``
    is assigned when the producer gave none."""
    if len(raw) > max_bytes:
        _refuse_over_cap(len(raw), max_bytes, lambda: _top_keys(raw))
    envelope = _envelope(raw)
    # The fast path takes a message msgspec writes back byte for byte (compact, no key
    # twice or unknown, which the envelope's dict left out) whose body has only fields the
    # models know: msgspec skips unknown ones unread (bad UTF-8, 1e999), so those bodies
    # are read by orjson on the other path.
    if envelope is not None and _encode(envelope) == raw and _closed_body_passes(envelope["body"]):
        message = envelope
        body = bytes(message["body"])
    else:
        message = parse_object(raw)
        verdict = _json_verdict(raw)
        if verdict is None:  # only the models read it (Python-named keys): their form
            message = wire_form(_check_by_models(_within_64_bits(raw, message)))
            # Written out again (names, numbers: 1e9 is 1000000000.0), it can grow without
            # bound: the cap holds for the form it is sent and retried in, as a producer's.
            size = _written_size(message)
            if size > max_bytes:
                _refuse_over_cap(size, max_bytes, message.keys, " in wire form")
        elif verdict is False:
            _check_by_models(message)
            # The models took what msgspec refused: a body key given twice, where the
            # models saw only the last value and msgspec each one.
            raise InvalidMessage([_refusal(raw)])
        # As written where msgspec read it; msgspec leaves Python-named keys to the models.
        body = bytes(envelope["body"]) if envelope is not None else orjson.dumps(message["body"])
    message["body"] = orjson.Fragment(body)
    if message.get("id") is None:
        # 128 random bits, as uuid4 has, at a fifth of its cost.
        message["id"] = os.urandom(16).hex()
    return Decoded(message, body)


def _within_64_bits(raw: bytes, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` (``raw`` as orjson read it), to be written out again: refused if it
    holds an integer past 64 bits, which orjson read as a float (and the float was sent)
    and cannot write as it stands."""
    whole = whole_numbers(raw, message)
    where = None if whole is message else _past_64_bits_at(whole)
    if where is not None:
        raise InvalidMessage([f"{where}: integer past 64 bits"])
    return whole


def _written_size(message: dict[str, Any]) -> int:
    try:
        return len(orjson.dumps(message))
    except orjson.JSONEncodeError:
        # Read from JSON, with no integer past 64 bits: only its depth can stop orjson,
        # which writes 254 levels where it and the models read more.
        raise InvalidMessage(["(root): nested too deep to be written out again"]) from None


def _envelope(raw: bytes) -> Any:
    """The message with its envelope checked and its body as JSON text (msgspec); None
    where msgspec cannot judge it or refuses it (the slow path then says why)."""
    try:
        envelope = _ENVELOPE.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError too
        return None
    return envelope if envelope is None or "body" in envelope else None


def _refusal(raw: bytes) -> str:
    """msgspec's error on ``raw``, as ``"<path>: <reason>"``."""
    try:
        _VERDICT.full.decode(raw)
    except msgspec.ValidationError as exc:
        reason, _, path = str(exc).rpartition(" - at `$")
        return f"{path.rstrip('`').lstrip('.') or '(root)'}: {reason or exc}"
    raise AssertionError("msgspec took it this time")


def _closed_body_passes(body: msgspec.Raw) -> bool:
    try:
        _CLOSED_BODY.decode(body)
    except msgspec.DecodeError:
        return False
    return True

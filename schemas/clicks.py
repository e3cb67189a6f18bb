"""Click logs: the training pipeline's input schema, its row rules, and the tables it writes.

Beam-free (pyarrow only), so the training code and tests use the same rules as
``pipelines/train_preprocess.py``.

A click log row is one search event::

    event_time       timestamp (UTC)       when it happened; see "Timestamps" below
    query            string, nullable      the typed text; null for a photo search
    query_image_uri  string, optional      the photo the shopper searched with (optional column)
    item_id          string                the item shown / clicked / bought
    event            string                click | add_to_cart | purchase | impression
    session_id       string, optional
    position         int, optional         rank at which the item was shown

Other columns are ignored. As for catalogs, schema problems are file-level (a
ConfigError naming the file and the column, before any work), value problems
are row-level (the row is written to the rejected table with a reason).

Timestamps: an ``event_time`` column of any Arrow timestamp type (any unit; a
zone-naive column is read as UTC) or of ISO 8601 strings (``2026-11-28``,
``2026-11-28T07:00:00Z``, ``...+01:00``; no offset = UTC). Anything else, and
nulls, are ``bad_timestamp`` rows with the value in the detail. An int64 column
of epoch microseconds is deliberately *not* guessed at: cast it to a timestamp
when writing the log (the detail of every such row says so).
"""

import datetime
import math
from typing import Mapping, NamedTuple, Optional, Union

import pyarrow as pa

from schemas import rejected as rej
from schemas.errors import ConfigError

# ----------------------------------------------------------------------------- the click log

EVENT_TIME = "event_time"
QUERY = "query"
QUERY_IMAGE_URI = "query_image_uri"
ITEM_ID = "item_id"
EVENT = "event"
SESSION_ID = "session_id"
POSITION = "position"

# Every column the pipeline reads, in table order.
COLUMNS = (EVENT_TIME, QUERY, QUERY_IMAGE_URI, ITEM_ID, EVENT, SESSION_ID, POSITION)
# Required in every file; besides, each file needs at least one of QUERY_COLUMNS.
REQUIRED_COLUMNS = (EVENT_TIME, ITEM_ID, EVENT)
QUERY_COLUMNS = (QUERY, QUERY_IMAGE_URI)
STRING_COLUMNS = (QUERY, QUERY_IMAGE_URI, ITEM_ID, EVENT, SESSION_ID)

CLICK = "click"
ADD_TO_CART = "add_to_cart"
PURCHASE = "purchase"
IMPRESSION = "impression"
EVENTS = (CLICK, ADD_TO_CART, PURCHASE, IMPRESSION)
# What the shopper chose: the training positives. Impressions are counted, never trained on.
POSITIVE_EVENTS = (CLICK, ADD_TO_CART, PURCHASE)
# An example's weight in the loss, by its event: stronger intent weighs more.
DEFAULT_EVENT_WEIGHTS = {CLICK: 1.0, ADD_TO_CART: 2.0, PURCHASE: 4.0}

# The canonical schema for writers of click logs (readers accept the variants above).
CLICKS_SCHEMA = pa.schema(
    [
        pa.field(EVENT_TIME, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(QUERY, pa.string(), nullable=True),
        pa.field(QUERY_IMAGE_URI, pa.string(), nullable=True),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(EVENT, pa.string(), nullable=False),
        pa.field(SESSION_ID, pa.string(), nullable=True),
        pa.field(POSITION, pa.int64(), nullable=True),
    ]
)

# Query texts are stripped and cut to this many characters before encoding, as the index cuts an
# item's text (pipelines/transforms.MAX_TEXT_CHARS) and the search service a query's (search/embedder.py).
MAX_QUERY_CHARS = 4096

_STRING_TYPES = (pa.string(), pa.large_string())


def _is_string(typ: pa.DataType) -> bool:
    return typ in _STRING_TYPES


def check_clicks_schema(schema: pa.Schema, source: str) -> list:
    """Checks one click file's schema; returns the known columns it has, in COLUMNS order.

    Raises ConfigError naming the file and the column when a required column is
    missing, when neither ``query`` nor ``query_image_uri`` is there, or when a
    column has a type the pipeline cannot read (``event_time`` of any type is
    accepted: its values are checked row by row, see the module docstring).
    """
    names = ", ".join(schema.names) or "none"
    for name in REQUIRED_COLUMNS:
        if schema.get_field_index(name) < 0:
            raise ConfigError(f"{source}: required column {name!r} is missing (columns present: {names})")
    if all(schema.get_field_index(name) < 0 for name in QUERY_COLUMNS):
        raise ConfigError(f"{source}: neither column {QUERY!r} nor {QUERY_IMAGE_URI!r} is present; a click log "
                          f"needs at least one of them (columns present: {names})")
    present = []
    for name in COLUMNS:
        index = schema.get_field_index(name)
        if index < 0:
            continue
        typ = schema.field(index).type
        if name in STRING_COLUMNS:
            # A writer that saw only nulls types a column "null"; fine for optional ones, whose values read as None.
            if not (_is_string(typ) or (typ == pa.null() and name not in REQUIRED_COLUMNS)):
                raise ConfigError(f"{source}: column {name!r} has type {typ}, expected string "
                                  f"(cast it to string when writing the click log)")
        elif name == POSITION:
            if not (pa.types.is_integer(typ) or typ == pa.null()):
                raise ConfigError(f"{source}: column {name!r} has type {typ}, expected an integer type")
        present.append(name)
    return present


# ----------------------------------------------------------------------------- timestamps

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_UTC = pa.timestamp("us", tz="UTC")


class EventTime(NamedTuple):
    """One ``event_time`` value as read: the UTC time, or None and why not."""

    value: Optional[datetime.datetime]  # aware, UTC; None when the value is null or unusable
    text: Optional[str]  # the value as written, as a string (for the rejected table); None when null
    problem: Optional[str]  # set exactly when value is None


def parse_event_time(text: str) -> datetime.datetime:
    """An ISO 8601 date or date-time string -> aware UTC datetime (no offset = UTC).

    Raises ValueError when the text is not ISO 8601.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty string")
    raw = text.strip()
    value = datetime.datetime.fromisoformat(raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def format_time(value: datetime.datetime) -> str:
    """ISO 8601 with microseconds, UTC, ``Z``: how times are written back as strings."""
    return value.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def read_event_times(column: Union[pa.Array, pa.ChunkedArray]) -> list:
    """An ``event_time`` column -> one EventTime per row (see the module docstring for what is accepted)."""
    typ = column.type
    if pa.types.is_timestamp(typ):
        # A zone-naive column's values are UTC wall times; an aware one's are UTC instants anyway:
        # either way the stored integers count from the epoch in UTC. Sub-microsecond digits are dropped.
        micros = column.cast(pa.timestamp("us", tz=typ.tz), safe=False).cast(pa.int64()).to_pylist()
        out = []
        for us in micros:
            if us is None:
                out.append(EventTime(None, None, "event_time is null"))
                continue
            try:
                value = _EPOCH + datetime.timedelta(microseconds=us)
            except OverflowError:
                out.append(EventTime(None, f"{us} us since the epoch",
                                     f"event_time {us} us since the epoch is outside years 1-9999"))
                continue
            out.append(EventTime(value, format_time(value), None))
        return out
    if _is_string(typ):
        out = []
        for text in column.to_pylist():
            if text is None:
                out.append(EventTime(None, None, "event_time is null"))
                continue
            try:
                value = parse_event_time(text)
            except (ValueError, OverflowError):
                out.append(EventTime(None, text, f"event_time {text!r} is not an ISO 8601 time "
                                                 f"like 2026-11-28T07:00:00Z"))
                continue
            out.append(EventTime(value, text, None))
        return out
    out = []
    for value in column.to_pylist():
        if value is None:
            out.append(EventTime(None, None, "event_time is null"))
        else:
            out.append(EventTime(None, str(value), f"event_time {value!r} ({typ}) is not a timestamp: the column must "
                                                   f"be an Arrow timestamp or ISO 8601 strings (column type {typ})"))
    return out


# ----------------------------------------------------------------------------- event weights


def parse_event_weights(spec: Union[None, str, Mapping[str, float]]) -> dict:
    """``--event-weights`` -> {event: weight} for every positive event.

    Accepts text like ``click=1,add_to_cart=2,purchase=4`` or a mapping; events
    not named keep their DEFAULT_EVENT_WEIGHTS; None gives the defaults. Raises
    ConfigError on an unknown event, on ``impression`` (never trained on), on an
    event named twice, and on a weight that is not a finite number > 0.
    """
    weights = dict(DEFAULT_EVENT_WEIGHTS)
    if spec is None:
        return weights
    if isinstance(spec, str):
        pairs = []
        if not spec.strip():
            raise ConfigError("--event-weights is empty; give EVENT=WEIGHT pairs like "
                              "click=1,add_to_cart=2,purchase=4")
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"--event-weights: {part.strip()!r} is not EVENT=WEIGHT "
                                  f"(expected something like click=1,add_to_cart=2,purchase=4)")
            pairs.append((name.strip(), value.strip()))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise ConfigError(f"--event-weights must be text like click=1,purchase=4 or a mapping, "
                          f"not {type(spec).__name__}")
    seen = set()
    for name, value in pairs:
        if name == IMPRESSION:
            raise ConfigError("--event-weights: impressions are not positive events and are never trained on; "
                              f"weights apply to {', '.join(POSITIVE_EVENTS)}")
        if name not in POSITIVE_EVENTS:
            raise ConfigError(f"--event-weights: unknown event {name!r}; the events are "
                              f"{', '.join(POSITIVE_EVENTS)}")
        if name in seen:
            raise ConfigError(f"--event-weights: event {name!r} is given twice")
        seen.add(name)
        try:
            if isinstance(value, bool):
                raise ValueError
            weight = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--event-weights: the weight of {name!r} is {value!r}, not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"--event-weights: the weight of {name!r} must be a finite number > 0, got {value!r}")
        weights[name] = weight
    return weights


def format_event_weights(weights: Mapping[str, float]) -> str:
    """The inverse of parse_event_weights, in POSITIVE_EVENTS order."""
    return ",".join(f"{e}={weights[e]:g}" for e in POSITIVE_EVENTS if e in weights)


# ----------------------------------------------------------------------------- row rules

BAD_TIMESTAMP = "bad_timestamp"  # null or unparseable event_time
MISSING_ITEM_ID = rej.MISSING_ITEM_ID  # null or blank item_id
UNKNOWN_EVENT = "unknown_event"  # event not one of EVENTS
NO_QUERY = "no_query"  # neither a non-blank query text nor a query image URI
UNKNOWN_ITEM = "unknown_item"  # item_id not in the index's embeddings table
INVALID_VALUE = rej.INVALID_VALUE  # a string that is not valid UTF-8
ENCODER_FAILED = rej.ENCODER_FAILED  # the query's text or image could not be encoded
IMAGE_REASONS = rej.IMAGE_REASONS  # the query photo cannot be fetched, decoded, or is too large

# In the order the checks run: a row gets the first reason that applies.
ROW_REASONS = (INVALID_VALUE, BAD_TIMESTAMP, MISSING_ITEM_ID, UNKNOWN_EVENT, NO_QUERY, UNKNOWN_ITEM)
# Only positive rows reach the encoders, so only they can get these.
ENCODE_REASONS = (*IMAGE_REASONS, ENCODER_FAILED)
REJECT_REASONS = ROW_REASONS + ENCODE_REASONS


def _blank(value: Optional[str]) -> bool:
    return value is None or not value.strip()


def query_text(query: Optional[str]) -> Optional[str]:
    """The text the text encoder sees: stripped and cut to MAX_QUERY_CHARS; None when blank."""
    if _blank(query):
        return None
    return query.strip()[:MAX_QUERY_CHARS]


def query_image(uri: Optional[str]) -> Optional[str]:
    """The photo URI as fetched (stripped); None when blank."""
    return None if _blank(uri) else uri.strip()


def normalize_event(event: Optional[str]) -> Optional[str]:
    """Events are matched stripped and case-insensitively (``" Click"`` is a click)."""
    return None if event is None else event.strip().lower()


def row_problem(event_time: EventTime, item_id: Optional[str], event: Optional[str], query: Optional[str],
                query_image_uri: Optional[str], known_items, problem: Optional[str] = None) -> Optional[tuple]:
    """(reason, detail) of the first ROW_REASONS rule a row breaks, or None for a usable row.

    Applies to every row, impressions included: a malformed impression is a malformed log
    row. ``known_items`` is the set of the index's item_ids (``in`` is all it needs).
    ``problem`` is a read problem (a value that is not valid UTF-8).
    """
    if problem is not None:
        return INVALID_VALUE, problem
    if event_time.problem is not None:
        return BAD_TIMESTAMP, event_time.problem
    if _blank(item_id):
        return MISSING_ITEM_ID, "item_id is null" if item_id is None else "item_id is empty"
    if normalize_event(event) not in EVENTS:
        return UNKNOWN_EVENT, (f"event {event!r} is not one of {', '.join(EVENTS)}" if event is not None
                               else "event is null")
    if query_text(query) is None and query_image(query_image_uri) is None:
        return NO_QUERY, "neither a query text nor a query_image_uri"
    if item_id not in known_items:
        return UNKNOWN_ITEM, f"item_id {item_id!r} is not in the index"
    return None


# ----------------------------------------------------------------------------- what the preprocessing writes

SOURCE = "source"
ROW = "row"
REASON = "reason"
DETAIL = "detail"

# One row per rejected click row: where it came from, its columns as strings (null when null or absent),
# the reason (REJECT_REASONS) and a detail naming the bad value.
REJECTED_CLICKS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(ROW, pa.int64(), nullable=False),
        *[pa.field(name, pa.string(), nullable=True) for name in COLUMNS],
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
    ]
)

SPLIT = "split"
TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)
WEIGHT = "weight"
LOG_Q = "log_q"
QUERY_TEXT_EMBEDDING = "query_text_embedding"
QUERY_IMAGE_EMBEDDING = "query_image_embedding"

# One row per kept positive event. ``query`` is the text as encoded (query_text), ``query_image_uri``
# the photo as fetched; each is null when the search had none, and so is its embedding. ``log_q`` is
# the log of the item's sampling probability among the train rows (pipelines/train_preprocess.py).
EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field(EVENT_TIME, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(QUERY, pa.string(), nullable=True),
        pa.field(QUERY_IMAGE_URI, pa.string(), nullable=True),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(EVENT, pa.string(), nullable=False),
        pa.field(WEIGHT, pa.float32(), nullable=False),
        pa.field(LOG_Q, pa.float32(), nullable=False),
        pa.field(QUERY_TEXT_EMBEDDING, pa.list_(pa.float32()), nullable=True),
        pa.field(QUERY_IMAGE_EMBEDDING, pa.list_(pa.float32()), nullable=True),
    ]
)

"""schemas/clicks.py: the click log schema check, timestamps, event weights and the row rules (no Beam)."""

import datetime
import subprocess
import sys

import pyarrow as pa
import pytest

from schemas import clicks as clk
from schemas.errors import ConfigError

UTC = datetime.timezone.utc


def test_the_module_imports_without_beam_or_tensorflow():
    code = ("import sys, schemas.clicks; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('apache_beam', 'tensorflow')]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_canonical_schema_and_variants_are_accepted():
    assert clk.check_clicks_schema(clk.CLICKS_SCHEMA, "f.parquet") == list(clk.COLUMNS)
    schema = pa.schema([("event_time", pa.string()), ("item_id", pa.large_string()), ("event", pa.string()),
                        ("query_image_uri", pa.string()), ("position", pa.int16()), ("session_id", pa.null()),
                        ("other", pa.float64())])
    assert clk.check_clicks_schema(schema, "f.parquet") == ["event_time", "query_image_uri", "item_id", "event",
                                                            "session_id", "position"]
    # event_time of any type passes the file check: its values are judged row by row.
    odd = pa.schema([("event_time", pa.int64()), ("item_id", pa.string()), ("event", pa.string()),
                     ("query", pa.null())])
    assert clk.check_clicks_schema(odd, "f.parquet") == ["event_time", "query", "item_id", "event"]


@pytest.mark.parametrize("column", ["event_time", "item_id", "event"])
def test_missing_required_column_names_file_and_column(column):
    schema = pa.schema([(n, t) for n, t in zip(clk.CLICKS_SCHEMA.names, clk.CLICKS_SCHEMA.types) if n != column])
    with pytest.raises(ConfigError, match=rf"gs://b/c\.parquet: required column '{column}' is missing"):
        clk.check_clicks_schema(schema, "gs://b/c.parquet")


def test_a_query_column_is_required():
    schema = pa.schema([("event_time", pa.string()), ("item_id", pa.string()), ("event", pa.string())])
    with pytest.raises(ConfigError, match=r"x\.parquet: neither column 'query' nor 'query_image_uri'"):
        clk.check_clicks_schema(schema, "x.parquet")


@pytest.mark.parametrize("column, typ", [("item_id", pa.int64()), ("event", pa.null()), ("query", pa.int32()),
                                         ("session_id", pa.float32()), ("position", pa.string())])
def test_wrong_types_name_file_and_column(column, typ):
    schema = pa.schema([(n, typ if n == column else t) for n, t in zip(clk.CLICKS_SCHEMA.names,
                                                                        clk.CLICKS_SCHEMA.types)])
    with pytest.raises(ConfigError, match=rf"y\.parquet: column '{column}' has type"):
        clk.check_clicks_schema(schema, "y.parquet")


def test_timestamp_columns_of_any_unit_and_zone():
    moment = datetime.datetime(2026, 11, 2, 23, 30, 0, 123456, tzinfo=UTC)
    naive = moment.replace(tzinfo=None)
    cases = [
        pa.array([moment, None], pa.timestamp("us", tz="UTC")),
        pa.array([naive, None], pa.timestamp("us")),  # naive = UTC
        pa.array([moment, None], pa.timestamp("us", tz="America/Sao_Paulo")),  # the same instant
        pa.array([moment, None], pa.timestamp("ns", tz="UTC")),
    ]
    for column in cases:
        (good, null) = clk.read_event_times(column)
        assert good.value == moment and good.problem is None and good.text == "2026-11-02T23:30:00.123456Z"
        assert null == clk.EventTime(None, None, "event_time is null")
    (ms,) = clk.read_event_times(pa.array([naive], pa.timestamp("ms")))
    assert ms.value == moment.replace(microsecond=123000)
    (s,) = clk.read_event_times(pa.chunked_array([pa.array([0], pa.timestamp("s"))]))
    assert s.value == datetime.datetime(1970, 1, 1, tzinfo=UTC)


def test_iso_strings_and_what_is_refused():
    got = clk.read_event_times(pa.array(["2026-11-02T23:30:00-02:00", "2026-11-03", "2026-11-03T01:02:03Z",
                                         "2026-11-03 04:05", "yesterday", "", None]))
    assert [g.value for g in got[:4]] == [datetime.datetime(2026, 11, 3, 1, 30, tzinfo=UTC),
                                          datetime.datetime(2026, 11, 3, tzinfo=UTC),
                                          datetime.datetime(2026, 11, 3, 1, 2, 3, tzinfo=UTC),
                                          datetime.datetime(2026, 11, 3, 4, 5, tzinfo=UTC)]
    assert got[0].text == "2026-11-02T23:30:00-02:00"  # the rejected table keeps what was written
    assert got[4].value is None and "'yesterday' is not an ISO 8601 time" in got[4].problem
    assert got[5].value is None and got[5].problem
    assert got[6].problem == "event_time is null"
    # Epoch integers are not guessed at (seconds? micros?): every row says what the column is.
    (epoch,) = clk.read_event_times(pa.array([1_700_000_000_000_000], pa.int64()))
    assert epoch.value is None and epoch.text == "1700000000000000" and "(int64) is not a timestamp" in epoch.problem


def test_event_weights():
    assert clk.parse_event_weights(None) == {"click": 1.0, "add_to_cart": 2.0, "purchase": 4.0}
    assert clk.DEFAULT_EVENT_WEIGHTS["purchase"] > clk.DEFAULT_EVENT_WEIGHTS["add_to_cart"] > \
        clk.DEFAULT_EVENT_WEIGHTS["click"]
    assert clk.IMPRESSION not in clk.POSITIVE_EVENTS
    assert clk.parse_event_weights(" click=0.5 , purchase=10") == {"click": 0.5, "add_to_cart": 2.0, "purchase": 10.0}
    assert clk.parse_event_weights({"add_to_cart": 3}) == {"click": 1.0, "add_to_cart": 3.0, "purchase": 4.0}
    assert clk.parse_event_weights(clk.format_event_weights({"click": 1.5, "add_to_cart": 2, "purchase": 4})) == {
        "click": 1.5, "add_to_cart": 2.0, "purchase": 4.0}


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"),
    ("click=1,,purchase=2", "'' is not EVENT=WEIGHT"),
    ("=2", "is not EVENT=WEIGHT"),
    ("view=1", "unknown event 'view'"),
    ("impression=1", "impressions are not positive events"),
    ("click=1,click=2", "'click' is given twice"),
    ("click=nan", "finite number > 0"),
    ("click=inf", "finite number > 0"),
    ("click=0", "finite number > 0"),
    ("click=-1", "finite number > 0"),
    ("click=", "not a number"),
    ({"click": True}, "not a number"),
    (3, "must be text"),
])
def test_bad_event_weights(spec, message):
    with pytest.raises(ConfigError, match=message):
        clk.parse_event_weights(spec)


def _problem(time="ok", item="p1", event="click", query="red apple", image=None, problem=None):
    when = (clk.EventTime(datetime.datetime(2026, 11, 1, tzinfo=UTC), "2026-11-01", None) if time == "ok"
            else clk.EventTime(None, None, "event_time is null"))
    found = clk.row_problem(when, item, event, query, image, {"p1"}, problem)
    return found and found[0]


def test_row_rules_in_order():
    assert _problem() is None
    assert _problem(query=None, image="gs://b/q.jpg") is None
    assert _problem(event=" Purchase ") is None and _problem(event="impression") is None
    assert _problem(problem="not utf-8", time=None, item=None) == clk.INVALID_VALUE
    assert _problem(time=None, item=None, event="x") == clk.BAD_TIMESTAMP
    assert _problem(item=None, event="x") == clk.MISSING_ITEM_ID
    assert _problem(item="  ") == clk.MISSING_ITEM_ID
    assert _problem(event="view", query=None) == clk.UNKNOWN_EVENT
    assert _problem(event=None) == clk.UNKNOWN_EVENT
    assert _problem(query="  ", image=" ", item="zz") == clk.NO_QUERY
    assert _problem(item="zz") == clk.UNKNOWN_ITEM
    assert _problem(item="p1 ") == clk.UNKNOWN_ITEM  # ids match exactly, as the index stores them
    assert set(clk.REJECT_REASONS) >= {"no_query", "unknown_item", "unknown_event", "bad_timestamp",
                                       "missing_item_id", "image_fetch_failed", "image_decode_failed",
                                       "image_too_large"}


def test_query_normalisation():
    assert clk.query_text("  red  apple \n") == "red  apple"
    assert clk.query_text(" ") is None and clk.query_text(None) is None
    assert len(clk.query_text("x" * 5000)) == clk.MAX_QUERY_CHARS
    assert clk.query_image(" /a/b.png ") == "/a/b.png" and clk.query_image("") is None


def test_output_schemas():
    assert clk.EXAMPLES_SCHEMA.names == ["event_time", "split", "query", "query_image_uri", "item_id", "event",
                                         "weight", "log_q", "query_text_embedding", "query_image_embedding"]
    assert clk.EXAMPLES_SCHEMA.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert clk.EXAMPLES_SCHEMA.field("weight").type == pa.float32()
    assert clk.EXAMPLES_SCHEMA.field("query_text_embedding").type == pa.list_(pa.float32())
    rejected = clk.REJECTED_CLICKS_SCHEMA
    assert rejected.names == ["source", "row", *clk.COLUMNS, "reason", "detail"]
    assert all(rejected.field(c).type == pa.string() for c in clk.COLUMNS)

"""The training pipeline's Beam preprocessing on the DirectRunner: exact accounting, split, logQ, vectors.

One real tiny index (tiny encoders, 6 items) and one hand-made click log over three files (a naive
millisecond timestamp column, ISO 8601 strings, the canonical schema without the optional photo
column), with every kind of good and bad row; expectations are computed here from the click list,
independently of the pipeline.
"""

import datetime
import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedding import encoders as enc
from embedding import images
from pipelines import train_preprocess as tp
from schemas import clicks as clk
from schemas.errors import ConfigError, DataError

UTC = datetime.timezone.utc
ITEMS = {"p1": "red apple", "p2": "green pear", "p3": "yellow banana", "p4": "orange carrot",
         "p5": "white milk", "p6": "brown bread"}
COLOURS = {"red": (220, 20, 20), "yellow": (240, 220, 30), "green": (30, 200, 40)}


def _png(path, colour, size=(40, 30)):
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return str(path)


@pytest.fixture(scope="module")
def index(tiny_encoders, tmp_path_factory):
    """A published 6-item index (two items with pictures); returns (release_dir, manifest)."""
    from pipelines import index_pipeline

    root = tmp_path_factory.mktemp("train-index")
    os.makedirs(root / "catalog")
    rows = [{"item_id": k, "title": v, "description": None,
             "image_uri": _png(root / f"{k}.png", "red" if k == "p1" else "yellow") if k in ("p1", "p3") else None}
            for k, v in ITEMS.items()]
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog" / "part-0.parquet")
    result = index_pipeline.run(["--catalog", str(root / "catalog" / "*.parquet"), "--output", str(root / "out"),
                                 "--text-encoder", tiny_encoders[0], "--image-encoder", tiny_encoders[1],
                                 "--version", "v1", "--snapshot-time", "2026-11-01", "--shards", "1"])
    assert result.manifest["counts"]["indexed"] == len(ITEMS)
    return result.release_dir, result.manifest


def t(day, hour, minute=0):
    return datetime.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


@pytest.fixture(scope="module")
def click_log(tmp_path_factory):
    """Three click files and, per row, what must become of it: 'train', 'eval', 'impression' or a reason."""
    root = tmp_path_factory.mktemp("clicks")
    photos = root / "photos"
    os.makedirs(photos)
    red, yellow = _png(photos / "red.png", "red"), _png(photos / "yellow.png", "yellow", (64, 64))
    missing = str(photos / "missing.png")
    broken = str(photos / "broken.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    # (event_time, query, query_image_uri, item_id, event, expected)
    a = [
        (t(1, 10), "red apple", None, "p1", "click", "train"),
        (t(1, 11), "red apple", None, "p1", "purchase", "train"),
        (t(1, 12), "  green pear ", None, "p2", "add_to_cart", "train"),
        (t(2, 9), None, red, "p1", "click", "train"),  # a photo search
        (t(2, 10), "banana", yellow, "p3", "click", "train"),  # text and photo
        (t(2, 11), "red apple", "  ", "p2", "click", "train"),  # a blank photo URI is no photo
        (t(3, 8), "red apple", None, "p1", "click", "eval"),
        (t(3, 9), None, red, "p4", "purchase", "eval"),  # p4 has no train row
        (t(3, 10), "banana", None, "p3", " Click ", "eval"),  # events match stripped, any case
        (t(1, 13), "red apple", None, "p5", "impression", "impression"),
        (t(2, 13), None, yellow, "p6", "impression", "impression"),  # never fetched
        (t(1, 14), None, None, "p1", "click", clk.NO_QUERY),
        (t(1, 15), "   ", "", "p1", "click", clk.NO_QUERY),
        (t(1, 16), "red apple", None, "zzz", "click", clk.UNKNOWN_ITEM),
        (t(1, 17), "red apple", None, "p1", "view", clk.UNKNOWN_EVENT),
        (t(1, 18), "red apple", None, "p1", None, clk.UNKNOWN_EVENT),
        (None, "red apple", None, "p1", "click", clk.BAD_TIMESTAMP),
        (t(1, 19), "red apple", None, None, "click", clk.MISSING_ITEM_ID),
        (t(1, 20), "red apple", None, " ", "click", clk.MISSING_ITEM_ID),
        (t(2, 14), None, missing, "p2", "click", "image_fetch_failed"),
        (t(2, 15), "pear", broken, "p2", "click", "image_decode_failed"),  # has text, still rejected
    ]
    # File A: a zone-naive millisecond timestamp column (read as UTC), plus a column the pipeline ignores.
    table_a = pa.table({
        "event_time": pa.array([None if r[0] is None else r[0].replace(tzinfo=None) for r in a], pa.timestamp("ms")),
        "query": [r[1] for r in a], "query_image_uri": [r[2] for r in a], "item_id": [r[3] for r in a],
        "event": [r[4] for r in a], "session_id": [f"s{i}" for i in range(len(a))],
        "position": pa.array([i % 5 for i in range(len(a))], pa.int32()), "country": ["fr"] * len(a)})
    # File B: ISO 8601 strings; no query_image_uri column at all.
    b = [
        ("2026-11-02T12:00:00Z", "green pear", "p2", "click", "train", t(2, 12)),
        ("2026-11-02T23:30:00-02:00", "green pear", "p2", "add_to_cart", "eval", t(3, 1, 30)),  # Nov 3, UTC
        ("2026-11-01", "red apple", "p1", "click", "train", t(1, 0)),
        ("yesterday", "red apple", "p1", "click", clk.BAD_TIMESTAMP, None),
        ("", "red apple", "p1", "click", clk.BAD_TIMESTAMP, None),
    ]
    table_b = pa.table({"event_time": [r[0] for r in b], "query": [r[1] for r in b], "item_id": [r[2] for r in b],
                        "event": [r[3] for r in b]})
    # File C: the canonical schema.
    c = [(t(2, 16), "yellow banana", None, "p3", "purchase", None, None, "train")]
    table_c = pa.Table.from_pylist([dict(zip(clk.CLICKS_SCHEMA.names, r[:7])) for r in c], clk.CLICKS_SCHEMA)
    os.makedirs(root / "log")
    pq.write_table(table_a, root / "log" / "a.parquet", row_group_size=8)  # several row groups
    pq.write_table(table_b, root / "log" / "b.parquet")
    pq.write_table(table_c, root / "log" / "c.parquet")

    rows = [dict(time=r[0], query=r[1], image=r[2], item=r[3], event=r[4], expected=r[5]) for r in a]
    rows += [dict(time=r[5], query=r[1], image=None, item=r[2], event=r[3], expected=r[4]) for r in b]
    rows += [dict(time=r[0], query=r[1], image=r[2], item=r[3], event=r[4], expected=r[7]) for r in c]
    return {"glob": str(root / "log" / "*.parquet"), "rows": rows, "root": root, "red": red, "yellow": yellow}


@pytest.fixture(scope="module")
def run(index, click_log, tmp_path_factory):
    release_dir, manifest = index
    out = tmp_path_factory.mktemp("pre") / "examples"
    summary = tp.run_preprocess("file://" + click_log["glob"], release_dir, manifest, str(out),
                                event_weights="purchase=5", max_rejected_fraction=0.5, batch_size=4)
    examples = pa.concat_tables([pq.read_table(p) for p in summary.paths["examples"]])
    rejected = pa.concat_tables([pq.read_table(p) for p in summary.paths["rejected"]])
    return summary, examples, rejected, str(out)


def _expected_counts(rows):
    out = {}
    for r in rows:
        out[r["expected"]] = out.get(r["expected"], 0) + 1
    return out


def test_counts_are_exact_and_add_up(run, click_log):
    summary, examples, rejected, out = run
    expected = _expected_counts(click_log["rows"])
    reasons = {k: v for k, v in expected.items() if k not in ("train", "eval", "impression")}
    assert summary.read == len(click_log["rows"]) == 27
    assert summary.rejected_by_reason == reasons
    assert (summary.train, summary.eval, summary.impressions) == (expected["train"], expected["eval"],
                                                                  expected["impression"])
    assert summary.kept == summary.train + summary.eval == examples.num_rows
    assert summary.read == summary.kept + summary.impressions + summary.rejected
    assert rejected.num_rows == summary.rejected
    assert rejected.schema.equals(clk.REJECTED_CLICKS_SCHEMA, check_metadata=False)
    assert examples.schema.equals(clk.EXAMPLES_SCHEMA, check_metadata=False)
    # summary.json says the same, with paths relative to the output folder.
    data = json.load(open(os.path.join(out, "summary.json")))
    assert data["status"] == "ok" and data["refusal"] is None
    assert (data["read"], data["kept"], data["impressions"], data["rejected_by_reason"]) == (
        summary.read, summary.kept, summary.impressions, summary.rejected_by_reason)
    assert [os.path.join(out, p) for p in data["paths"]["examples"]] == summary.paths["examples"]
    assert data["metrics"]["clicks_read"] == summary.read and data["metrics"]["clicks_kept"] == summary.kept
    assert data["metrics"]["clicks_impressions"] == summary.impressions
    for reason, n in summary.rejected_by_reason.items():
        assert data["metrics"][f"clicks_rejected_{reason}"] == n


def test_rejected_rows_carry_the_row_and_the_bad_value(run, click_log):
    _, _, rejected, _ = run
    rows = rejected.to_pylist()
    for r in rows:
        assert r["source"].endswith(".parquet") and r["row"] >= 0 and r["detail"]
    by = {(os.path.basename(r["source"]), r["row"]): r for r in rows}
    assert by[("b.parquet", 3)]["reason"] == clk.BAD_TIMESTAMP and "'yesterday'" in by[("b.parquet", 3)]["detail"]
    assert by[("b.parquet", 3)]["event_time"] == "yesterday"
    assert by[("a.parquet", 14)]["reason"] == clk.UNKNOWN_EVENT and "'view'" in by[("a.parquet", 14)]["detail"]
    assert by[("a.parquet", 13)]["reason"] == clk.UNKNOWN_ITEM and by[("a.parquet", 13)]["item_id"] == "zzz"
    assert by[("a.parquet", 13)]["session_id"] == "s13" and by[("a.parquet", 13)]["position"] == "3"
    assert by[("a.parquet", 13)]["event_time"] == "2026-11-01T16:00:00.000000Z"
    fetch = by[("a.parquet", 19)]
    assert fetch["reason"] == "image_fetch_failed" and "missing.png" in fetch["detail"]
    assert by[("a.parquet", 20)]["reason"] == "image_decode_failed" and by[("a.parquet", 20)]["query"] == "pear"


def test_split_by_day_weights_and_log_q(run, click_log):
    summary, examples, _, _ = run
    rows = [r for r in click_log["rows"] if r["expected"] in ("train", "eval")]
    assert summary.eval_start == "2026-11-03"
    train = [r for r in rows if r["expected"] == "train"]
    n_train = len(train)
    per_item = {}
    for r in train:
        per_item[r["item"]] = per_item.get(r["item"], 0) + 1
    weights = {"click": 1.0, "add_to_cart": 2.0, "purchase": 5.0}  # purchase=5 given, the others default

    def key(time, item, query):
        return time, item, query

    want = {}
    for r in rows:
        q = math.log(per_item[r["item"]] / n_train) if r["item"] in per_item else math.log(1 / (n_train + 1))
        text = r["query"].strip() if r["query"] and r["query"].strip() else None
        want[key(r["time"], r["item"], text)] = (r["expected"], weights[r["event"].strip().lower()], q)
    got = {}
    for e in examples.to_pylist():
        got[key(e["event_time"], e["item_id"], e["query"])] = (e["split"], e["weight"], e["log_q"])
    assert set(got) == set(want)
    for k, (split, weight, q) in want.items():
        assert got[k][0] == split, k
        assert got[k][1] == pytest.approx(weight), k
        assert got[k][2] == pytest.approx(q, rel=1e-6), k
    assert per_item.get("p4") is None  # the eval-only item: log(1 / (train rows + 1))
    assert min(e["log_q"] for e in examples.to_pylist()) == pytest.approx(math.log(1 / (n_train + 1)), rel=1e-6)
    # Each day is whole: nothing before Nov 3 (UTC) is eval, nothing from it on is train.
    for e in examples.to_pylist():
        assert (e["event_time"].date() >= datetime.date(2026, 11, 3)) == (e["split"] == "eval")


def test_query_vectors_are_the_index_encoders_and_each_input_is_encoded_once(run, click_log, index):
    summary, examples, _, _ = run
    release_dir, manifest = index
    texts = sorted({e["query"] for e in examples.to_pylist() if e["query"] is not None})
    assert texts == ["banana", "green pear", "red apple", "yellow banana"]  # stripped: "  green pear " is one
    # "pear" went to the text encoder too (its photo failed after), so 5 distinct texts were encoded.
    assert summary.distinct_texts == 5 and summary.texts_encoded == 5
    # red.png, yellow.png, the missing and the broken photo: 4 distinct URIs; 2 loaded and encoded.
    assert summary.distinct_images == 4 and summary.images_encoded == 2
    metrics = json.load(open(summary.paths["summary"]))["metrics"]
    assert (metrics["query_texts_encoded"], metrics["query_images_loaded"], metrics["query_images_encoded"]) == (5, 2, 2)

    text_spec = enc.EncoderSpec.from_json("text", manifest["encoders"]["text"])
    image_spec = enc.EncoderSpec.from_json("image", manifest["encoders"]["image"])
    text_encoder = enc.Encoder(text_spec.handle, "text")
    image_encoder = enc.Encoder(image_spec.handle, "image", image_spec.image_size)
    reference = dict(zip(texts, text_encoder.encode(texts)))
    photos = [click_log["red"], click_log["yellow"]]
    pixels = np.stack([images.load_image(p, image_encoder.image_size) for p in photos])
    reference_images = dict(zip(photos, image_encoder.encode(pixels)))
    photo_rows = 0
    for e in examples.to_pylist():
        if e["query"] is None:
            assert e["query_text_embedding"] is None
        else:
            np.testing.assert_allclose(e["query_text_embedding"], reference[e["query"]], rtol=1e-5, atol=1e-6)
        if e["query_image_uri"] is None:
            assert e["query_image_embedding"] is None
        else:
            photo_rows += 1
            np.testing.assert_allclose(e["query_image_embedding"], reference_images[e["query_image_uri"]],
                                       rtol=1e-5, atol=1e-6)
    assert photo_rows == 3


def test_too_many_rejected_rows_stop_after_writing_them(index, click_log, tmp_path):
    release_dir, manifest = index
    out = tmp_path / "refused"
    with pytest.raises(DataError) as failure:
        tp.run_preprocess(click_log["glob"], release_dir, manifest, str(out), max_rejected_fraction=0.2,
                          batch_size=8)
    message = str(failure.value)
    rows = click_log["rows"]
    bad = sum(1 for r in rows if r["expected"] not in ("train", "eval", "impression"))
    assert f"{bad} of {len(rows)} click rows rejected" in message and "--max-rejected-fraction 20.0%" in message
    assert "top reasons: bad_timestamp=3, missing_item_id=2, no_query=2" in message
    data = json.load(open(out / "summary.json"))
    assert data["status"] == "refused" and data["refusal"] == message and data["rejected"] == bad
    written = pa.concat_tables([pq.read_table(out / p) for p in data["paths"]["rejected"]])
    assert written.num_rows == bad


def test_no_train_rows_is_a_data_error(index, click_log, tmp_path):
    release_dir, manifest = index
    with pytest.raises(DataError, match=r"no train rows: .* --eval-days 3 .*2026-11-01, 2026-11-02, 2026-11-03"):
        tp.run_preprocess(click_log["glob"], release_dir, manifest, str(tmp_path / "x"), eval_days=3,
                          max_rejected_fraction=1.0)


def test_eval_start_and_log_q_rules():
    assert tp.eval_start_of([], 1) is None
    assert tp.eval_start_of(["2026-11-05", "2026-11-01", "2026-11-02", "2026-11-05"], 2) == "2026-11-02"  # days present
    assert tp.eval_start_of(["2026-11-01"], 3) == "2026-11-01"
    assert tp.log_q(3, 12) == pytest.approx(math.log(0.25))
    assert tp.log_q(0, 12) == pytest.approx(math.log(1 / 13))
    assert tp.log_q(0, 0) == 0.0


# ------------------------------------------------------------------ configuration errors, before any work


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("drop", ["event_time", "item_id", "event"])
def test_a_missing_required_column_names_the_file_and_column(index, tmp_path, drop):
    columns = {"event_time": ["2026-11-01"], "query": ["x"], "item_id": ["p1"], "event": ["click"]}
    del columns[drop]
    path = _write(tmp_path / "bad.parquet", **columns)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: required column '{drop}' is missing")):
        tp.run_preprocess(path, *index, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_log_without_query_columns_is_refused(index, tmp_path):
    path = _write(tmp_path / "noq.parquet", event_time=["2026-11-01"], item_id=["p1"], event=["click"])
    with pytest.raises(ConfigError, match=r"noq\.parquet: neither column 'query' nor 'query_image_uri'"):
        tp.run_preprocess(path, *index, str(tmp_path / "out"))


@pytest.mark.parametrize("weights, message", [
    ("click=1,view=3", "unknown event 'view'"),
    ("click=0", "must be a finite number > 0"),
    ("purchase=-2", "must be a finite number > 0"),
    ("purchase=lots", "not a number"),
    ("impression=1", "impressions are not positive events"),
    ("click", "is not EVENT=WEIGHT"),
])
def test_bad_event_weights(index, click_log, tmp_path, weights, message):
    with pytest.raises(ConfigError, match=message):
        tp.run_preprocess(click_log["glob"], *index, str(tmp_path / "out"), event_weights=weights)


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_days": 0}, "--eval-days must be an integer >= 1"),
    ({"max_rejected_fraction": 1.5}, r"--max-rejected-fraction must be a number within \[0.0, 1.0\]"),
    ({"batch_size": 0}, "--batch-size"),
])
def test_bad_options(index, click_log, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tp.run_preprocess(click_log["glob"], *index, str(tmp_path / "out"), **kwargs)


def test_a_log_with_no_rows_stops_before_any_work(index, tmp_path):
    empty = pa.Table.from_pylist([], clk.CLICKS_SCHEMA)
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="1 file\\(s\\) with no rows"):
        tp.run_preprocess(str(tmp_path / "*.parquet"), *index, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_no_clicks_and_used_output_folders(index, click_log, run, tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        tp.run_preprocess(str(tmp_path / "none-*.parquet"), *index, str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="already holds preprocessing output"):
        tp.run_preprocess(click_log["glob"], *index, run[3])

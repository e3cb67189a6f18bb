"""`catalog-index query`: JSON lines in input order, per-query errors, exit 1 only for an unusable index."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from catalog_index import cli
from tests.search.conftest import flip_byte, shard_file

EXE = os.path.join(os.path.dirname(sys.executable), "catalog-index")


def lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_text_image_and_a_queries_file(published_v1, small_catalogs, tmp_path, capsys):
    catalog = small_catalogs[0]
    rows = {r["item_id"]: r for f in catalog["files"] for r in pq.read_table(f).to_pylist()}
    text_item = catalog["bad_ids"]["no_image"][0]
    text = "\n".join(p.strip() for p in (rows[text_item]["title"], rows[text_item]["description"]) if p and p.strip())
    image_item = catalog["bad_ids"]["image_no_title"][0]
    image = rows[image_item]["image_uri"]

    assert cli.main(["query", "--index", published_v1, "--text", text, "--k", "3"]) == 0
    (out,) = lines(capsys.readouterr().out)
    assert out["id"] is None and len(out["results"]) == 3
    assert out["results"][0]["item_id"] == text_item and out["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(out["results"][0]) == {"item_id", "score", "shard", "title"}
    assert out["results"][0]["title"] == rows[text_item]["title"]
    assert [r["score"] for r in out["results"]] == sorted((r["score"] for r in out["results"]), reverse=True)

    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join([
        json.dumps({"id": "a", "text": text}),
        json.dumps({"id": "b", "image": str(tmp_path / "missing.jpg")}),
        json.dumps({"id": "c", "image": image}),
        json.dumps({"id": "d", "text": "   "}),
        "{not json",
        json.dumps({"id": "f", "image": str(junk)}),
        json.dumps({"id": "g", "text": text, "image": image}),
        json.dumps({"id": "h"}),
    ]) + "\n")
    assert cli.main(["query", "--index", published_v1, "--queries", str(queries), "--k", "2",
                     "--batch-size", "3", "--search-k", "-1"]) == 0
    got = lines(capsys.readouterr().out)
    assert [g["id"] for g in got] == ["a", "b", "c", "d", 5, "f", "g", "h"]
    ok = {g["id"]: g for g in got if "results" in g}
    assert set(ok) == {"a", "c", "g"}
    assert ok["a"]["results"][0]["item_id"] == text_item
    assert ok["c"]["results"][0]["item_id"] == image_item and not ok["c"]["results"][0]["title"]
    errors = {g["id"]: g["error"] for g in got if "error" in g}
    assert "missing.jpg" in errors["b"] and "empty text" in errors["d"] and "not JSON" in errors[5]
    assert "not a readable" in errors["f"] and "text" in errors["h"]


def test_usage_errors_exit_2(published_v1, capsys):
    assert cli.main(["query", "--index", published_v1, "--text", "x", "--shardz", "2"]) == 2
    assert cli.main(["query", "--index", published_v1]) == 2
    assert cli.main(["query", "--index", published_v1, "--text", "x", "--queries", "q.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("catalog-index query: error:") for line in err)


def test_a_damaged_index_exits_1_naming_the_file(v1_root):
    path = shard_file(v1_root)
    flip_byte(path)
    done = subprocess.run([EXE, "query", "--index", v1_root, "--text", "red"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("catalog-index query: error:") and path in err[0], done.stderr

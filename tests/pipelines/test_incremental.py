"""Incremental runs of `catalog-index index` (pipelines/reuse.py) on the DirectRunner with the tiny encoders.

One module fixture indexes catalog A, changes ~10% of it into catalog B (new texts, new image bytes behind
the same URI, new URIs, image versions, new and deleted items), then indexes B twice: incrementally
(reusing A through LATEST) and in full (--no-reuse). The expected reused/encoded counts are computed here
from the two catalogs and the image files, not from the pipeline.
"""

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from PIL import Image

from catalog_index import cli
from catalog_index import sample
from embedding import images
from embedding import tiny
from pipelines import index_pipeline
from pipelines import options as opt
from pipelines import publication as pub
from pipelines import reuse
from pipelines import transforms as tr
from schemas import catalog as cat
from schemas import embeddings as emb
from schemas import layout
from schemas.errors import CatalogIndexError, CatalogSchemaError, ConfigError

SCHEMA = sample.SAMPLE_SCHEMA.append(pa.field(cat.IMAGE_VERSION, pa.string(), nullable=True))
SIZE = (32, 32)
opt_vector_counts = ("reused_text", "encoded_text", "reused_image", "encoded_image")


def _write_catalog(rows, directory):
    os.makedirs(directory, exist_ok=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), os.path.join(directory, f"part-{i:05d}.parquet"))
    return os.path.join(directory, "part-*.parquet")


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _picture(path, colour):
    Image.new("RGB", (40, 40), colour).save(path, **({"quality": 90} if path.endswith(".jpg") else {}))
    return path


def _text(row):
    return tr.item_text(tr.CatalogRow(row["item_id"], row["title"], row["description"], None, "", 0))


def _image_state(rows):
    """{item_id: (uri, version, sha256 of the bytes now)} for the items whose image decodes now."""
    out = {}
    for r in rows:
        if r["image_uri"]:
            try:
                images.load_image(r["image_uri"], SIZE)
            except images.ImageError:
                continue
            out[r["item_id"]] = (r["image_uri"], r[cat.IMAGE_VERSION], _sha(r["image_uri"]))
    return out


def _expected(rows_a, images_a, rows_b, images_b):
    """Reused/encoded counts and the reused item ids, from the catalogs and the image files alone."""
    text_a = {r["item_id"]: _text(r) for r in rows_a if _text(r) is not None}
    reused_text = {r["item_id"] for r in rows_b if _text(r) is not None and text_a.get(r["item_id"]) == _text(r)}
    with_text = sum(_text(r) is not None for r in rows_b)
    not_fetched, reused_image = set(), set()
    for item_id, (uri, version, sha) in images_b.items():
        before = images_a.get(item_id)
        if before is None:
            continue
        if version is not None and (uri, version) == before[:2]:
            not_fetched.add(item_id)
            reused_image.add(item_id)
        elif sha == before[2]:
            reused_image.add(item_id)
    # Carried: items of A whose every vector is reused and that lack no vector they had; their rows are copied
    # into the new shards without fusion. Not carried: new or changed content, a gone or failing image.
    ids_a = {r["item_id"] for r in rows_a}
    carried = {r["item_id"] for r in rows_b if r["item_id"] in ids_a
               and (r["item_id"] in reused_text or r["item_id"] in reused_image)
               and (r["item_id"] in reused_text or (_text(r) is None and r["item_id"] not in text_a))
               and (r["item_id"] in reused_image or (not r["image_uri"] and r["item_id"] not in images_a))}
    return {
        "counts": {"reused_text": len(reused_text), "encoded_text": with_text - len(reused_text),
                   "reused_image": len(reused_image), "encoded_image": len(images_b) - len(reused_image)},
        "reused_text": reused_text, "reused_image": reused_image, "not_fetched": not_fetched, "carried": carried,
    }


def _table(release_dir):
    manifest = _manifest(release_dir)
    parts = [pq.read_table(os.path.join(release_dir, p)) for p in manifest["tables"]["embeddings"]]
    return {r[emb.ITEM_ID]: r for t in parts for r in t.to_pylist()}


def _manifest(release_dir):
    with open(os.path.join(release_dir, layout.MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)


def _metric(result, name):
    found = result.pipeline_result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


def _args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0], "--image-encoder",
            encoders[1], "--shards", "2", "--batch-size", "16", *extra]


@pytest.fixture(scope="module")
def runs(tiny_encoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    generated = sample.generate_catalog(str(root / "sample"), n_items=150, seed=11, bad_rows=False)
    rows = sorted((r for f in generated["files"] for r in pq.read_table(f).to_pylist()), key=lambda r: r["item_id"])
    with_image = [r for r in rows if r["image_uri"]]
    for i, r in enumerate(rows):
        r[cat.IMAGE_VERSION] = None
    for r in with_image[::3]:
        r[cat.IMAGE_VERSION] = "etag-1"  # a third of the images carry a version
    img_dir = str(root / "sample" / "images")
    rows.append(dict(rows[0], item_id="edge-missing-image", title="pink ceramic vase small", description=None,
                     image_uri=os.path.join(img_dir, "missing.jpg"), **{cat.IMAGE_VERSION: "etag-1"}))
    rows_a = [dict(r) for r in rows]
    catalog_a = _write_catalog(rows_a, str(root / "a"))
    images_a = _image_state(rows_a)
    output = root / "out"
    run_a = index_pipeline.run(_args(catalog_a, output, tiny_encoders, "--version", "a"))

    # Catalog B: about 10% of A changed.
    b = {r["item_id"]: dict(r) for r in rows_a}
    versioned = [r for r in with_image if r[cat.IMAGE_VERSION]]
    unversioned = [r for r in with_image if not r[cat.IMAGE_VERSION]]
    text_only = [r for r in rows_a if not r["image_uri"]]
    for r in (text_only[0], text_only[1], with_image[1]):  # new text
        b[r["item_id"]]["title"] += " (new edition)"
    b[text_only[2]["item_id"]]["title"] = text_only[3]["title"]  # a new text that another item has
    b[text_only[2]["item_id"]]["description"] = text_only[3]["description"]
    for r in unversioned[1:3]:  # new bytes behind the same URI, no version: fetched, hashed, encoded
        _picture(r["image_uri"], (250, 10, 200))
    _picture(versioned[1]["image_uri"], (10, 250, 200))  # new bytes and a new version
    b[versioned[1]["item_id"]][cat.IMAGE_VERSION] = "etag-2"
    b[versioned[2]["item_id"]][cat.IMAGE_VERSION] = "etag-2"  # a new version, the same bytes: reused after a fetch
    moved = os.path.join(img_dir, "moved" + os.path.splitext(unversioned[3]["image_uri"])[1])
    shutil.copyfile(unversioned[3]["image_uri"], moved)  # the same bytes at a new URI: reused after a fetch
    b[unversioned[3]["item_id"]]["image_uri"] = moved
    b[unversioned[4]["item_id"]]["image_uri"] = _picture(os.path.join(img_dir, "new-uri.png"), (90, 90, 90))
    b[unversioned[5]["item_id"]]["image_uri"] = None  # the image is gone: text reused, no image vector
    for r in (text_only[4], unversioned[6], versioned[3]):  # deleted
        del b[r["item_id"]]
    for k in range(3):  # new items
        b[f"new-{k}"] = dict(rows_a[0], item_id=f"new-{k}", title=f"brand new thing {k}", description=None,
                             image_uri=_picture(os.path.join(img_dir, f"new-{k}.png"), (30 * k, 200, 40)),
                             **{cat.IMAGE_VERSION: "etag-1" if k == 0 else None})
    b["new-text-only"] = dict(rows_a[0], item_id="new-text-only", title="plain new words", description=None,
                              image_uri=None, **{cat.IMAGE_VERSION: None})
    rows_b = sorted(b.values(), key=lambda r: r["item_id"])
    catalog_b = _write_catalog(rows_b, str(root / "b"))
    images_b = _image_state(rows_b)

    incremental = index_pipeline.run(_args(catalog_b, output, tiny_encoders, "--version", "b"))
    full = index_pipeline.run(_args(catalog_b, output, tiny_encoders, "--version", "b-full", "--no-reuse"))
    return {
        "root": root, "output": str(output), "catalog_b": catalog_b, "rows_a": rows_a, "rows_b": rows_b,
        "a": run_a, "incremental": incremental, "full": full,
        "expected": _expected(rows_a, images_a, rows_b, images_b),
    }


def test_the_change_is_about_ten_percent(runs):
    ids_a = {r["item_id"] for r in runs["rows_a"]}
    ids_b = {r["item_id"] for r in runs["rows_b"]}
    rows_a = {r["item_id"]: r for r in runs["rows_a"]}
    changed = {r["item_id"] for r in runs["rows_b"] if r["item_id"] in rows_a and r != rows_a[r["item_id"]]}
    changed |= ids_a ^ ids_b
    assert 0.07 < len(changed) / len(ids_a) < 0.15


def test_incremental_counts_are_exact(runs):
    expected = runs["expected"]
    manifest = runs["incremental"].manifest
    counts = manifest["counts"]
    assert {k: counts[k] for k in expected["counts"]} == expected["counts"]
    assert manifest["reuse"]["source"] == {"version": "a", "release": runs["a"].manifest["release"]}
    # Per modality, reused + encoded = the indexed items with that vector, read back from the table.
    table = _table(runs["incremental"].release_dir)
    assert counts["reused_text"] + counts["encoded_text"] == sum(r[emb.TEXT_EMBEDDING] is not None
                                                                 for r in table.values())
    assert counts["reused_image"] + counts["encoded_image"] == sum(r[emb.IMAGE_EMBEDDING] is not None
                                                                   for r in table.values())
    assert counts["reused_text"] > 100 and counts["encoded_text"] >= 8 and counts["encoded_image"] >= 6
    # The same figures as Beam metrics; images equal by (image_uri, image_version) were not even fetched,
    # and only the encoded images were decoded.
    result = runs["incremental"]
    for name in expected["counts"]:
        assert _metric(result, name) == counts[name], name
    assert _metric(result, "images_not_fetched") == len(expected["not_fetched"]) >= 20
    assert _metric(result, "images_loaded") == counts["encoded_image"]
    # Carried items are neither fused again nor decoded: only the others went through fusion.
    assert _metric(result, "items_carried") == len(expected["carried"]) > 100
    assert _metric(result, "items_fused") == counts["indexed"] - len(expected["carried"])
    summary = result.summary()
    assert (f"text vectors reused {counts['reused_text']}, encoded {counts['encoded_text']}; image vectors reused "
            f"{counts['reused_image']}, encoded {counts['encoded_image']} (from a/") in summary


def test_no_reuse_encodes_everything(runs):
    manifest = runs["full"].manifest
    table = _table(runs["full"].release_dir)
    assert manifest["reuse"]["source"] is None
    assert manifest["counts"]["reused_text"] == manifest["counts"]["reused_image"] == 0
    assert manifest["counts"]["encoded_text"] == sum(r[emb.TEXT_EMBEDDING] is not None for r in table.values())
    assert manifest["counts"]["encoded_image"] == sum(r[emb.IMAGE_EMBEDDING] is not None for r in table.values())
    assert _metric(runs["full"], "images_not_fetched") == 0


def test_reused_vectors_are_the_previous_versions_bit_for_bit(runs):
    expected = runs["expected"]
    before = _table(runs["a"].release_dir)
    after = _table(runs["incremental"].release_dir)
    for item_id in expected["reused_text"]:
        assert after[item_id][emb.TEXT_EMBEDDING] == before[item_id][emb.TEXT_EMBEDDING], item_id
        assert after[item_id][emb.TEXT_SHA256] == before[item_id][emb.TEXT_SHA256]
    for item_id in expected["reused_image"]:
        assert after[item_id][emb.IMAGE_EMBEDDING] == before[item_id][emb.IMAGE_EMBEDDING], item_id
        assert after[item_id][emb.IMAGE_SHA256] == before[item_id][emb.IMAGE_SHA256]
    # Carried rows: the fused vector too, and the catalog's current URI, version and title.
    rows_a = {r["item_id"]: r for r in runs["rows_a"]}
    rows_b = {r["item_id"]: r for r in runs["rows_b"]}
    for item_id in expected["carried"]:
        assert after[item_id][emb.EMBEDDING] == before[item_id][emb.EMBEDDING], item_id
        now = rows_b[item_id]
        assert (after[item_id][emb.TITLE], after[item_id][emb.IMAGE_URI], after[item_id][emb.IMAGE_VERSION]) == (
            now["title"], now["image_uri"] or None, now[cat.IMAGE_VERSION]), item_id
    # Among them the same bytes at a new URI and under a new version.
    assert any(rows_a[i]["image_uri"] != rows_b[i]["image_uri"] for i in expected["carried"])
    assert any(rows_a[i][cat.IMAGE_VERSION] != rows_b[i][cat.IMAGE_VERSION] for i in expected["carried"])


def test_read_rows_refuses_a_part_without_the_rows_it_promised(tmp_path):
    path = str(tmp_path / "part.parquet")
    pq.write_table(pa.table({emb.ITEM_ID: ["a", "b", "c"], emb.TITLE: ["x", "y", "z"]}), path)
    table = reuse.read_rows(path, ["c", "a"], [emb.TITLE])
    assert table.column_names == [emb.ITEM_ID, emb.TITLE] and table.to_pydict() == {
        emb.ITEM_ID: ["a", "c"], emb.TITLE: ["x", "z"]}
    with pytest.raises(CatalogIndexError, match="holds 1 of the 2 rows"):
        reuse.read_rows(path, ["a", "gone"], [emb.TITLE])


def test_incremental_output_matches_a_full_run(runs, tiny_encoders):
    inc, full = runs["incremental"], runs["full"]
    mi, mf = inc.manifest, full.manifest
    assert {k: v for k, v in mi["counts"].items() if k not in opt_vector_counts} == {
        k: v for k, v in mf["counts"].items() if k not in opt_vector_counts}  # read, indexed, rejected, degraded
    assert mi["counts"]["degraded_by_reason"] == {"image_fetch_failed": 1}
    assert [s["count"] for s in mi["shards"]] == [s["count"] for s in mf["shards"]]
    for si, sf in zip(mi["shards"], mf["shards"]):  # the same item ids in each shard, in the same order
        ids_i = pq.read_table(os.path.join(inc.release_dir, si["id_map"])).to_pydict()
        ids_f = pq.read_table(os.path.join(full.release_dir, sf["id_map"])).to_pydict()
        assert ids_i == ids_f
    a, b = _table(inc.release_dir), _table(full.release_dir)
    assert sorted(a) == sorted(b) == sorted(r["item_id"] for r in runs["rows_b"])
    worst = 0.0
    for item_id, row in a.items():
        other = b[item_id]
        for key in (emb.TITLE, emb.SHARD, emb.ANNOY_ID, *emb.CONTENT_KEYS):
            assert row[key] == other[key], (item_id, key)
        for key in (emb.TEXT_EMBEDDING, emb.IMAGE_EMBEDDING, emb.EMBEDDING):
            assert (row[key] is None) == (other[key] is None), (item_id, key)
            if row[key] is not None:
                worst = max(worst, float(np.abs(np.array(row[key]) - np.array(other[key])).max()))
    # Bit for bit: encoders and fusion run on fixed shapes (Encoder.fixed_batches, fusion.fuse_fixed), so a
    # vector reused from the previous run equals the one a full run computes beside other items.
    assert worst == 0.0
    assert [s["sha256"] for s in mi["shards"]] == [s["sha256"] for s in mf["shards"]]
    for part in mi["tables"]["embeddings"]:
        assert mi["files"][part] == mf["files"][part]
    # The query encoder was checked on the same sampled items as in the full run, carried ones included.
    for kind in ("text", "image", "text_and_image"):
        assert mi["query_encoder"]["parity"][kind]["items"] == mf["query_encoder"]["parity"][kind]["items"] > 8, kind
    # The content keys are what they claim: sha256 of the text the encoder saw and of the image bytes.
    rows_b = {r["item_id"]: r for r in runs["rows_b"]}
    for item_id, row in a.items():
        text = _text(rows_b[item_id])
        assert row[emb.TEXT_SHA256] == (hashlib.sha256(text.encode()).hexdigest() if text else None)
        if row[emb.IMAGE_EMBEDDING] is not None:
            assert row[emb.IMAGE_SHA256] == _sha(rows_b[item_id]["image_uri"])
        assert (row[emb.IMAGE_URI], row[emb.IMAGE_VERSION]) == (rows_b[item_id]["image_uri"],
                                                                rows_b[item_id][cat.IMAGE_VERSION])


def test_an_incremental_run_is_reproducible(runs, tiny_encoders):
    # The same catalog from the same previous version (named with --reuse-from this time): the same bytes.
    again = index_pipeline.run(_args(runs["catalog_b"], runs["output"], tiny_encoders, "--version", "b-again",
                                     "--reuse-from", os.path.join(runs["output"], "a"),
                                     "--snapshot-time", "2000-01-01"))
    first, second = runs["incremental"].manifest, again.manifest
    assert second["reuse"]["source"] == first["reuse"]["source"]
    assert {k: second["counts"][k] for k in opt_vector_counts} == {k: first["counts"][k] for k in opt_vector_counts}
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    for part in first["tables"]["embeddings"]:
        assert second["files"][part] == first["files"][part]


def test_carried_rows_reach_a_different_shard_count(runs, tiny_encoders):
    # A was built with 2 shards; 3 shards now: a new shard's carried rows come from both previous parts.
    again = index_pipeline.run(_args(runs["catalog_b"], runs["output"], tiny_encoders, "--version", "b-3",
                                     "--shards", "3", "--reuse-from", os.path.join(runs["output"], "a"),
                                     "--snapshot-time", "2000-01-01"))
    assert _metric(again, "items_carried") == len(runs["expected"]["carried"])
    manifest = again.manifest
    assert len(manifest["shards"]) == 3
    for shard in manifest["shards"]:
        ids = pq.read_table(os.path.join(again.release_dir, shard["id_map"])).column("item_id").to_pylist()
        assert ids == sorted(ids) and all(layout.stable_shard(i, 3) == shard["index"] for i in ids)
    # The same vectors, bit for bit, as the 2-shard incremental run from the same source (the encode batches
    # depend on the catalog, not on the shard count).
    three, two = _table(again.release_dir), _table(runs["incremental"].release_dir)
    assert sorted(three) == sorted(two)
    for item_id, row in three.items():
        for key in (emb.TEXT_EMBEDDING, emb.IMAGE_EMBEDDING, emb.EMBEDDING, *emb.CONTENT_KEYS, emb.TITLE):
            assert row[key] == two[item_id][key], (item_id, key)


def _query_encoder_files(manifest):
    prefix = manifest["query_encoder"]["path"] + "/"
    return {rel: f for rel, f in manifest["files"].items() if rel.startswith(prefix)}


def test_the_query_encoder_is_copied_from_the_previous_version(runs):
    previous, inc = _query_encoder_files(runs["a"].manifest), _query_encoder_files(runs["incremental"].manifest)
    assert previous and inc == previous  # the same files, byte for byte (checked with parity all the same)


def test_a_copied_query_encoder_that_fails_parity_is_exported_again(runs, tiny_encoders, monkeypatch, caplog):
    from embedding import query_encoder as qe

    real, calls = qe.parity_problem, []

    def first_fails(parity):  # as if the previous version's query encoder no longer matched this run's vectors
        calls.append(parity)
        return "forced for the test" if len(calls) == 1 else real(parity)

    monkeypatch.setattr(qe, "parity_problem", first_fails)
    caplog.set_level(logging.INFO)
    result = index_pipeline.run(_args(runs["catalog_b"], runs["output"], tiny_encoders, "--version", "b-export",
                                      "--reuse-from", os.path.join(runs["output"], "a"),
                                      "--snapshot-time", "2000-01-01"))
    assert len(calls) == 2 and "forced for the test); exporting a new one" in caplog.text
    assert "files, exported; parity" in caplog.text
    assert result.manifest["query_encoder"]["parity"] == runs["incremental"].manifest["query_encoder"]["parity"]


def test_inputs_digest_does_not_depend_on_reuse(runs, tiny_encoders, capsys):
    inc, full = runs["incremental"].manifest, runs["full"].manifest
    assert inc["inputs"] == full["inputs"]
    # So a rerun of the incremental version, with or without reuse, finds it already published.
    for extra in ((), ("--no-reuse",)):
        rc = cli.main(["index", *_args(runs["catalog_b"], runs["output"], tiny_encoders, "--version", "b", *extra)])
        assert rc == 0 and "already published with identical inputs" in capsys.readouterr().out


def test_a_previous_version_with_another_encoder_is_ignored(runs, tiny_encoders, tmp_path, caplog):
    other = tiny.build_text_encoder(str(tmp_path / "other-text"), seed=1)
    caplog.set_level(logging.INFO, logger="pipelines.reuse")
    result = index_pipeline.run(_args(runs["catalog_b"], runs["output"], (other, tiny_encoders[1]),
                                      "--version", "other", "--snapshot-time", "2000-01-01"))
    lines = [r for r in caplog.records if r.name == "pipelines.reuse" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert "not reusing vectors of LATEST" in message and "encoders.text.fingerprint" in message
    assert "every item is encoded" in message
    counts = result.manifest["counts"]
    assert counts["reused_text"] == counts["reused_image"] == 0 and result.manifest["reuse"]["source"] is None


# --------------------------------------------------------------------------- choosing the source (no pipeline)


class _Plan:
    """What reuse.resolve reads of an IndexPlan: the output root and this run's vector identity."""

    def __init__(self, output, identity):
        self.output = output
        self._identity = identity

    def vector_identity(self):
        return self._identity


def _identity(manifest, **changes):
    identity = opt.vector_identity(manifest["encoders"], manifest["fusion"], manifest["dimension"],
                                   manifest["options"], manifest["reuse"]["preprocessing"])
    identity["options"].update(changes)
    return identity


def _damaged_copy(runs, tmp_path):
    """A copy of the output root whose LATEST names b-full with one flipped byte in an embeddings part."""
    copy = str(tmp_path / "copy")
    shutil.copytree(runs["output"], copy)
    release = os.path.join(copy, pub.resolve(copy).path)
    part = os.path.join(release, _manifest(release)["tables"]["embeddings"][0])
    with open(part, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    return copy, release


def test_resolve_picks_latest_or_the_named_version(runs):
    output = runs["output"]
    latest = pub.resolve(output)
    manifest = _manifest(os.path.join(output, latest.path))
    plan = _Plan(output, _identity(manifest))
    source = reuse.resolve(plan)
    assert (source.version, source.release) == (latest.version, latest.release)
    assert source.items == manifest["counts"]["indexed"] and len(source.embeddings) == 2
    named = reuse.resolve(plan, reuse_from=os.path.join(output, "a"))  # a version folder
    assert (named.version, named.release) == ("a", runs["a"].manifest["release"])
    named = reuse.resolve(plan, reuse_from=runs["a"].release_dir)  # a release folder
    assert named.release == runs["a"].manifest["release"]
    assert reuse.resolve(plan, no_reuse=True) is None
    assert reuse.resolve(_Plan(str(runs["root"] / "nothing-here"), plan.vector_identity())) is None
    with pytest.raises(ConfigError, match="neither a version folder"):
        reuse.resolve(plan, reuse_from=str(runs["root"] / "nothing-here"))


def test_resolve_refuses_a_named_mismatch_and_skips_latest(runs, caplog):
    output = runs["output"]
    manifest = _manifest(os.path.join(output, pub.resolve(output).path))
    plan = _Plan(output, _identity(manifest, max_image_pixels=1000))
    with pytest.raises(ConfigError, match="options.max_image_pixels: previous 40000000, this run 1000"):
        reuse.resolve(plan, reuse_from=os.path.join(output, "a"))
    caplog.set_level(logging.INFO, logger="pipelines.reuse")
    assert reuse.resolve(plan) is None
    assert "options.max_image_pixels" in caplog.text and "every item is encoded" in caplog.text


def test_a_damaged_previous_version_is_never_half_used(runs, tiny_encoders, tmp_path, caplog, capsys):
    # LATEST damaged: ignored with one log line, a full encode. --reuse-from damaged: refused (exit 2),
    # since the run was asked for that source; silently encoding everything instead could cost hours.
    copy, release = _damaged_copy(runs, tmp_path)
    plan = _Plan(copy, _identity(_manifest(release)))
    caplog.set_level(logging.INFO, logger="pipelines.reuse")
    assert reuse.resolve(plan) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "does not verify" in lines[0] and "content differs from the manifest" in lines[0]
    rc = cli.main(["index", *_args(runs["catalog_b"], tmp_path / "fresh", tiny_encoders, "--version", "x",
                                   "--reuse-from", release)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot reuse its vectors: it does not verify" in err, err
    assert not os.path.exists(tmp_path / "fresh" / layout.LATEST_FILE)
    assert not os.path.exists(tmp_path / "fresh" / "x")


def test_reuse_flags_contradict(runs, tiny_encoders, capsys):
    rc = cli.main(["index", *_args(runs["catalog_b"], runs["output"], tiny_encoders, "--no-reuse",
                                   "--reuse-from", runs["output"])])
    assert rc == 2 and "contradict" in capsys.readouterr().err


def test_image_version_column_types(tmp_path):
    import datetime

    schema = cat.CATALOG_SCHEMA.append(pa.field(cat.IMAGE_VERSION, pa.timestamp("s", tz="UTC")))
    assert cat.check_catalog_schema(schema, "f.parquet")[-1] == cat.IMAGE_VERSION
    column = pa.chunked_array([pa.array([datetime.datetime(2026, 11, 28, 7, 23), None], pa.timestamp("s", tz="UTC"))])
    values = cat.image_version_values(column)
    assert values[1] is None and values[0].startswith("2026-11-28") and values == cat.image_version_values(column)
    assert cat.image_version_values(pa.chunked_array([pa.array([7, None])])) == ["7", None]
    with pytest.raises(CatalogSchemaError, match="image_version.*expected a string, integer or timestamp"):
        cat.check_catalog_schema(cat.CATALOG_SCHEMA.append(pa.field(cat.IMAGE_VERSION, pa.float64())), "f.parquet")

"""End-to-end runs of `catalog-index index` on the DirectRunner: accounting, publication, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex
from apache_beam.io.filesystems import FileSystems

from catalog_index import cli
from schemas.errors import ConfigError
from embedding import fusion as fus
from pipelines import files
from pipelines import index_pipeline
from pipelines import publication as pub
from schemas import layout
from schemas import manifest as mf


def index_args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


def read_manifest(version_dir):
    with open(os.path.join(version_dir, mf.MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)


def latest(output):
    """The version LATEST names (the pointer is JSON: schemas/layout.py)."""
    with open(os.path.join(output, mf.LATEST_FILE), "rb") as f:
        return layout.Pointer.loads(f.read()).version


def release_dir(output, version):
    """The live release folder of a version, through its CURRENT pointer."""
    return os.path.join(str(output), pub.resolve(str(output), version).path)


def tree(path):
    """{relative path: bytes} of every file below path (lock files aside)."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture(scope="module")
def published(sample_catalog, tiny_encoders, tmp_path_factory):
    """One CLI run over the sample catalog with every kind of bad row, 3 shards."""
    output = tmp_path_factory.mktemp("out")
    rc = cli.main(["index", *index_args(sample_catalog["catalog_glob"], output, tiny_encoders),
                   "--shards", "3", "--version", "v1", "--batch-size", "16"])
    assert rc == 0
    return str(output), release_dir(output, "v1")


def test_accounting_is_exact(published, sample_catalog):
    output, version_dir = published
    counts = read_manifest(version_dir)["counts"]
    expected = sample_catalog["expected"]
    assert counts["read"] == sample_catalog["rows"]
    assert counts["indexed"] == expected["indexed"]
    assert counts["rejected_by_reason"] == expected["rejected"]
    assert counts["degraded_by_reason"] == expected["degraded"]
    assert counts["read"] == counts["indexed"] + counts["rejected"]

    manifest = read_manifest(version_dir)
    rejected = pa.concat_tables([pq.read_table(os.path.join(version_dir, p)) for p in manifest["tables"]["rejected"]])
    assert rejected.num_rows == counts["rejected"]
    by_reason = {}
    for r in rejected.to_pylist():
        by_reason.setdefault(r["reason"], []).append(r["item_id"])
        assert r["source"] in sample_catalog["files"] and r["row"] >= 0 and r["message"]
    assert {reason: sorted(ids, key=str) for reason, ids in by_reason.items()} == {
        reason: sorted(sample_catalog["bad_ids"][reason], key=str) for reason in expected["rejected"]}
    degraded = pa.concat_tables([pq.read_table(os.path.join(version_dir, p)) for p in manifest["tables"]["degraded"]])
    assert sorted(zip(degraded.column("reason").to_pylist(), degraded.column("item_id").to_pylist())) == sorted(
        (reason, item_id) for reason in expected["degraded"] for item_id in sample_catalog["bad_ids"][reason])


def test_published_layout_and_latest(published):
    output, version_dir = published
    assert latest(output) == "v1"
    # The output root holds LATEST, the version folder (CURRENT + one release) and nothing else:
    # no staging leftovers, no lease (given back), no temp files.
    assert sorted(tree(output)) == sorted(["LATEST", "v1/CURRENT"] + [
        os.path.relpath(os.path.join(version_dir, p), output) for p in tree(version_dir)])
    manifest = read_manifest(version_dir)
    mf.validate_manifest(manifest)
    assert (manifest["dimension"], manifest["metric"], len(manifest["shards"])) == (256, "angular", 3)
    assert manifest["encoders"]["image"]["image_size"] == [32, 32]
    assert os.path.basename(version_dir) == manifest["release"] and manifest["version"] == "v1"
    for shard in manifest["shards"]:
        path = os.path.join(version_dir, shard["path"])
        assert files.checksum(path) == (shard["size"], shard["sha256"])
    listed = {s["path"] for s in manifest["shards"]} | {s["id_map"] for s in manifest["shards"]}
    listed |= {p for paths in manifest["tables"].values() for p in paths}
    shipped = {p for p in manifest["files"] if p.startswith(manifest["query_encoder"]["path"] + "/")}
    assert "query_encoder/saved_model.pb" in shipped  # the release's query encoder (embedding/query_encoder.py)
    listed |= shipped
    # Every file is listed with its size and sha256, checked here independently of the publisher.
    assert set(manifest["files"]) == listed
    content = tree(version_dir)
    for rel, entry in manifest["files"].items():
        assert (entry["size"], entry["sha256"]) == (len(content[rel]), __import__("hashlib").sha256(content[rel]).hexdigest())
    assert set(content) == listed | {mf.MANIFEST_FILE}
    pointer = pub.resolve(output)
    assert pointer.manifest_sha256 == __import__("hashlib").sha256(content[mf.MANIFEST_FILE]).hexdigest()


def test_every_indexed_item_is_its_own_nearest_neighbour(published):
    _, version_dir = published
    manifest = read_manifest(version_dir)
    seen = set()
    for shard in manifest["shards"]:
        ids = pq.read_table(os.path.join(version_dir, shard["id_map"])).to_pydict()
        assert ids["annoy_id"] == list(range(shard["count"]))
        table = pq.read_table(os.path.join(version_dir, shard["embeddings"])).to_pylist()
        index = AnnoyIndex(manifest["dimension"], "angular")
        index.load(os.path.join(version_dir, shard["path"]))
        assert index.get_n_items() == shard["count"]
        for r in table:
            assert ids["item_id"][r["annoy_id"]] == r["item_id"] and r["shard"] == shard["index"]
            assert np.linalg.norm(r["embedding"]) == pytest.approx(1.0, abs=1e-5)
            found = index.get_nns_by_vector(r["embedding"], 1, search_k=-1)
            assert found == [r["annoy_id"]], r["item_id"]
            assert index.get_item_vector(r["annoy_id"]) == pytest.approx(r["embedding"], abs=1e-6)
        seen.update(ids["item_id"])
    assert len(seen) == manifest["counts"]["indexed"]


def test_embeddings_table_has_modalities_as_documented(published, sample_catalog):
    _, version_dir = published
    manifest = read_manifest(version_dir)
    rows = {r["item_id"]: r for p in manifest["tables"]["embeddings"]
            for r in pq.read_table(os.path.join(version_dir, p)).to_pylist()}
    bad = sample_catalog["bad_ids"]
    for item_id in bad["no_image"]:
        assert rows[item_id]["image_embedding"] is None and len(rows[item_id]["text_embedding"]) == 64
    for item_id in bad["image_no_title"]:
        assert len(rows[item_id]["image_embedding"]) == 48
    for reason in ("image_decode_failed", "image_fetch_failed", "image_too_large"):
        for item_id in bad[reason]:
            assert rows[item_id]["image_embedding"] is None  # degraded: indexed from text alone
    for item_id in bad["fine_edge"]:  # 1x1, grayscale, RGBA, CMYK, Chinese and Greek titles
        assert rows[item_id]["image_embedding"] is not None and rows[item_id]["text_embedding"] is not None


def test_identical_input_gives_identical_files(published, sample_catalog, tiny_encoders, tmp_path):
    _, version_dir = published
    # Same input and options, another runner mode: batches must not depend on bundle timing.
    result = index_pipeline.run(index_args(sample_catalog["catalog_glob"], tmp_path, tiny_encoders,
                                           "--shards", "3", "--version", "v1", "--batch-size", "16",
                                           "--direct_num_workers", "2", "--direct_running_mode", "multi_threading"))
    a, b = read_manifest(version_dir), result.manifest
    assert [(s["sha256"], s["count"]) for s in a["shards"]] == [(s["sha256"], s["count"]) for s in b["shards"]]
    old, new = tree(version_dir), tree(result.release_dir)
    for shard in a["shards"]:
        assert old[shard["path"]] == new[shard["path"]]
        assert old[shard["id_map"]] == new[shard["id_map"]]
        assert pq.read_table(os.path.join(version_dir, shard["embeddings"])).equals(
            pq.read_table(os.path.join(result.release_dir, shard["embeddings"])))


def test_too_many_rejections_fail_before_publication(published, sample_catalog, tiny_encoders, tmp_path):
    output, version_dir = published
    before = tree(output)
    with pytest.raises(Exception, match="over --max-rejected-fraction"):
        index_pipeline.run(index_args(sample_catalog["catalog_glob"], output, tiny_encoders,
                                      "--version", "v2", "--max-rejected-fraction", "0.01"))
    assert latest(output) == "v1"
    # The failed run removed its own release folder and took no pointer with it.
    assert tree(output) == before


def test_a_rerun_finishes_and_other_content_needs_force(published, sample_catalog, tiny_encoders, capsys):
    output, version_dir = published
    before = tree(output)
    rc = cli.main(["index", *index_args(sample_catalog["catalog_glob"], output, tiny_encoders,
                                        "--shards", "3", "--version", "v1", "--batch-size", "16")])
    out = capsys.readouterr().out
    assert rc == 0 and "already published with identical inputs" in out and version_dir in out
    assert tree(output) == before  # nothing rebuilt, nothing added
    rc = cli.main(["index", *index_args(sample_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already published" in err and "--force" in err and len(err.splitlines()) == 1


def test_force_publishes_a_new_release_and_latest_follows_snapshots(sample_catalog, tiny_encoders, tmp_path):
    args = index_args(sample_catalog["catalog_glob"], tmp_path, tiny_encoders)
    index_pipeline.run(args + ["--version", "2026-11-02", "--shards", "2", "--snapshot-time", "2026-11-02"])
    old = release_dir(tmp_path, "2026-11-02")
    index_pipeline.run(args + ["--version", "2026-11-01", "--shards", "1", "--snapshot-time", "2026-11-01"])
    assert latest(tmp_path) == "2026-11-02"  # an older snapshot does not move LATEST back
    result = index_pipeline.run(args + ["--version", "2026-11-02", "--shards", "1", "--force",
                                        "--snapshot-time", "2026-11-02"])
    assert len(result.manifest["shards"]) == 1
    new = release_dir(tmp_path, "2026-11-02")
    assert new == result.release_dir != old
    assert sorted(os.listdir(os.path.join(new, "shards"))) == [
        "shard-00000-of-00001.ann", "shard-00000-of-00001.ids.parquet"]
    # The replaced release is untouched (a reader may still have it open) until gc removes it.
    assert len(os.listdir(os.path.join(old, "shards"))) == 4
    pub.verify_release(old)
    assert latest(tmp_path) == "2026-11-02" and pub.resolve(str(tmp_path)).release == result.manifest["release"]
    # A version named like "smoke-test" with a later snapshot moves LATEST; names are not compared.
    index_pipeline.run(args + ["--version", "smoke-test", "--snapshot-time", "2026-11-03"])
    assert latest(tmp_path) == "smoke-test"


def test_fusion_savedmodel_sets_the_dimension(sample_catalog, tiny_encoders, tmp_path):
    spec = fus.FusionSpec(fus.PROJECTION, 64, 48, 32, text_weight=2.0, seed=4)
    path = fus.export_projection_fusion(spec, str(tmp_path / "fusion"))
    result = index_pipeline.run(index_args(sample_catalog["catalog_glob"], tmp_path / "out", tiny_encoders,
                                           "--fusion-model", path, "--version", "f"))
    manifest = result.manifest
    assert (manifest["dimension"], manifest["fusion"]["kind"]) == (32, "saved_model")
    table = pq.read_table(os.path.join(result.release_dir, manifest["shards"][0]["embeddings"])).to_pylist()
    # The pipeline used the SavedModel: its vectors equal the numpy projection with the same spec.
    r = next(r for r in table if r["image_embedding"] is not None and r["text_embedding"] is not None)
    expected = fus.ProjectionFusion(spec)(np.array([r["text_embedding"]]), np.ones(1),
                                          np.array([r["image_embedding"]]), np.ones(1))[0]
    np.testing.assert_allclose(r["embedding"], expected, atol=1e-5)
    with pytest.raises(ConfigError, match="returns 32-d vectors but --dimension is 256"):
        index_pipeline.run(index_args(sample_catalog["catalog_glob"], tmp_path / "out", tiny_encoders,
                                      "--fusion-model", path, "--dimension", "256"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, d: a.__setitem__(1, str(d / "none" / "*.parquet")), "matches no file"),
        (lambda a, d: a.__setitem__(5, str(d)), "cannot load text encoder"),
        (lambda a, d: a.__setitem__(7, a[5]), "image encoder .* failed on a probe input"),
        (lambda a, d: a.extend(["--shards", "0"]), "--shards must be at least 1"),
        (lambda a, d: a.extend(["--max-rejected-fraction", "2"]), "within \\[0, 1\\]"),
        (lambda a, d: a.extend(["--version", "../x"]), "--version"),
    ],
)
def test_config_errors_fail_fast_with_one_line(change, message, sample_catalog, tiny_encoders, tmp_path, capsys):
    args = index_args(sample_catalog["catalog_glob"], tmp_path / "out", tiny_encoders)
    change(args, tmp_path)
    rc = cli.main(["index", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("catalog-index index: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_unusable_catalog_schema_fails_naming_file_and_column(tiny_encoders, tmp_path, capsys):
    pq.write_table(pa.table({"item_id": ["a"], "title": ["ok"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "title": ["x"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"item_id": ["c"], "title": [3]}), tmp_path / "c.parquet")
    rc = cli.main(["index", *index_args(str(tmp_path / "b.parquet"), tmp_path / "out", tiny_encoders)])
    assert rc == 2 and "b.parquet: required column 'item_id' is missing" in capsys.readouterr().err
    rc = cli.main(["index", *index_args(str(tmp_path / "[ac].parquet"), tmp_path / "out", tiny_encoders)])
    assert rc == 2 and "c.parquet: column 'title' has type int64" in capsys.readouterr().err


def test_console_script_end_to_end(sample_catalog, tiny_encoders, tmp_path):
    # The installed entry point, in its own process, as a user runs it.
    exe = os.path.join(os.path.dirname(sys.executable), "catalog-index")
    args = index_args(sample_catalog["catalog_glob"], tmp_path / "out", tiny_encoders, "--version", "cli")
    done = subprocess.run([exe, "index", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"published {tmp_path / 'out' / 'cli'}/r" in done.stdout and "items/s" in done.stdout
    assert "LATEST names it" in done.stdout
    assert "progress (this worker)" in done.stderr  # progress lines while it runs
    # TensorFlow's native start-up lines stay out of the terminal (oneDNN, cuInit, absl) ...
    native = __import__("re").compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ |absl::InitializeLog|cuInit", __import__("re").M)
    assert not native.search(done.stderr), done.stderr[:2000]
    again = subprocess.run([exe, "index", *args, "--trees", "3", "--verbose"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 2 and again.stderr.strip().endswith("to publish a replacement")
    assert native.search(again.stderr) and "Traceback" in again.stderr  # ... unless --verbose


def test_runs_on_an_object_store_through_filesystems(sample_catalog, tiny_encoders, fake_gcs_root):
    # Catalog and output both on the fake object store; images stay local paths.
    for src in sample_catalog["files"]:
        with open(src, "rb") as f:
            files.write_bytes(f"fakegs://bucket/catalog/{os.path.basename(src)}", f.read())
    result = index_pipeline.run(index_args("fakegs://bucket/catalog/*.parquet", "fakegs://bucket/index",
                                           tiny_encoders, "--shards", "2", "--version", "g"))
    assert result.manifest["counts"]["indexed"] == sample_catalog["expected"]["indexed"]
    pointer = layout.Pointer.loads(files.read_bytes("fakegs://bucket/index/LATEST"))
    assert (pointer.version, pointer.release) == ("g", result.manifest["release"])
    base = "fakegs://bucket/index/" + pointer.path
    stored = files.list_files(base)
    assert base + "/manifest.json" in stored
    assert sorted(files.list_files("fakegs://bucket/index")) == sorted(
        stored + ["fakegs://bucket/index/LATEST", "fakegs://bucket/index/g/CURRENT"])
    shard = result.manifest["shards"][1]
    assert files.checksum(f"{base}/{shard['path']}") == (shard["size"], shard["sha256"])
    assert FileSystems.exists(f"{base}/{shard['id_map']}")
    assert pub.verify("fakegs://bucket/index").manifest == result.manifest

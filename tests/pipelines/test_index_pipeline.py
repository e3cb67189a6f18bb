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
from catalog_index.errors import ConfigError
from embedding import fusion as fus
from pipelines import files
from pipelines import index_pipeline
from schemas import manifest as mf
from tests import fake_gcs


def index_args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


def read_manifest(version_dir):
    with open(os.path.join(version_dir, mf.MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)


def latest(output):
    with open(os.path.join(output, mf.LATEST_FILE)) as f:
        return f.read().strip()


def tree(path):
    """{relative path: bytes} of every file below path."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
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
    return str(output), os.path.join(str(output), "v1")


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
    assert not os.path.exists(os.path.join(output, "_staging"))
    manifest = read_manifest(version_dir)
    mf.validate_manifest(manifest)
    assert (manifest["dimension"], manifest["metric"], len(manifest["shards"])) == (256, "angular", 3)
    assert manifest["encoders"]["image"]["image_size"] == [32, 32]
    for shard in manifest["shards"]:
        path = os.path.join(version_dir, shard["path"])
        assert files.checksum(path) == (shard["size"], shard["sha256"])
    listed = {s["path"] for s in manifest["shards"]} | {s["id_map"] for s in manifest["shards"]}
    listed |= {p for paths in manifest["tables"].values() for p in paths}
    assert set(tree(version_dir)) == listed | {mf.MANIFEST_FILE}


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
    old, new = tree(version_dir), tree(result.plan.version_dir)
    for shard in a["shards"]:
        assert old[shard["path"]] == new[shard["path"]]
        assert old[shard["id_map"]] == new[shard["id_map"]]
        assert pq.read_table(os.path.join(version_dir, shard["embeddings"])).equals(
            pq.read_table(os.path.join(result.plan.version_dir, shard["embeddings"])))


def test_too_many_rejections_fail_before_publication(published, sample_catalog, tiny_encoders, tmp_path):
    output, version_dir = published
    before = tree(output)
    with pytest.raises(Exception, match="over --max-rejected-fraction"):
        index_pipeline.run(index_args(sample_catalog["catalog_glob"], output, tiny_encoders,
                                      "--version", "v2", "--max-rejected-fraction", "0.01"))
    assert latest(output) == "v1"
    assert not os.path.exists(os.path.join(output, "v2"))
    after = tree(output)
    assert {k: v for k, v in after.items() if not k.startswith("_staging")} == before


def test_republishing_needs_force(published, sample_catalog, tiny_encoders, tmp_path, capsys):
    output, _ = published
    rc = cli.main(["index", *index_args(sample_catalog["catalog_glob"], output, tiny_encoders, "--version", "v1")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already published" in err and "--force" in err and len(err.splitlines()) == 1


def test_force_replaces_a_version_and_latest_only_moves_forward(sample_catalog, tiny_encoders, tmp_path):
    args = index_args(sample_catalog["catalog_glob"], tmp_path, tiny_encoders)
    index_pipeline.run(args + ["--version", "2026-11-02", "--shards", "2"])
    index_pipeline.run(args + ["--version", "2026-11-01", "--shards", "1"])
    assert latest(tmp_path) == "2026-11-02"  # an older version does not move LATEST back
    result = index_pipeline.run(args + ["--version", "2026-11-02", "--shards", "1", "--force"])
    assert len(result.manifest["shards"]) == 1
    # The 2-shard files of the replaced version are gone, not mixed with the new ones.
    assert sorted(os.listdir(tmp_path / "2026-11-02" / "shards")) == [
        "shard-00000-of-00001.ann", "shard-00000-of-00001.ids.parquet"]
    assert latest(tmp_path) == "2026-11-02"


def test_fusion_savedmodel_sets_the_dimension(sample_catalog, tiny_encoders, tmp_path):
    spec = fus.FusionSpec(fus.PROJECTION, 64, 48, 32, text_weight=2.0, seed=4)
    path = fus.export_projection_fusion(spec, str(tmp_path / "fusion"))
    result = index_pipeline.run(index_args(sample_catalog["catalog_glob"], tmp_path / "out", tiny_encoders,
                                           "--fusion-model", path, "--version", "f"))
    manifest = result.manifest
    assert (manifest["dimension"], manifest["fusion"]["kind"]) == (32, "saved_model")
    table = pq.read_table(os.path.join(result.plan.version_dir, manifest["shards"][0]["embeddings"])).to_pylist()
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
    assert f"published {tmp_path / 'out' / 'cli'}" in done.stdout and "items/s" in done.stdout
    assert "progress (this worker)" in done.stderr  # progress lines while it runs
    again = subprocess.run([exe, "index", *args], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and again.stderr.strip().endswith("pass --force to replace it")


@pytest.fixture
def fake_gcs_root(tmp_path):
    fake_gcs.FakeGcsFileSystem.root = str(tmp_path / "bucket-root")
    os.makedirs(fake_gcs.FakeGcsFileSystem.root)
    yield fake_gcs.FakeGcsFileSystem.root
    fake_gcs.FakeGcsFileSystem.root = None


def test_runs_on_an_object_store_through_filesystems(sample_catalog, tiny_encoders, fake_gcs_root):
    # Catalog and output both on the fake object store; images stay local paths.
    for src in sample_catalog["files"]:
        with open(src, "rb") as f:
            files.write_bytes(f"fakegs://bucket/catalog/{os.path.basename(src)}", f.read())
    result = index_pipeline.run(index_args("fakegs://bucket/catalog/*.parquet", "fakegs://bucket/index",
                                           tiny_encoders, "--shards", "2", "--version", "g"))
    assert result.manifest["counts"]["indexed"] == sample_catalog["expected"]["indexed"]
    assert files.read_bytes("fakegs://bucket/index/LATEST") == b"g\n"
    stored = files.list_files("fakegs://bucket/index/g")
    assert "fakegs://bucket/index/g/manifest.json" in stored
    assert not files.list_files("fakegs://bucket/index/_staging")
    shard = result.manifest["shards"][1]
    assert files.checksum(f"fakegs://bucket/index/g/{shard['path']}") == (shard["size"], shard["sha256"])
    assert FileSystems.exists("fakegs://bucket/index/g/" + shard["id_map"])

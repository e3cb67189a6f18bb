"""Every published release ships its query encoder, checked against the pipeline's own vectors."""

import dataclasses
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_index import cli
from catalog_index import sample
from embedding import query_encoder as qe
from pipelines import index_pipeline
from pipelines import publication as pub
from pipelines import transforms as tr
from schemas import manifest as mf


def args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], "--shards", "2", "--batch-size", "16", *extra]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return sample.generate_catalog(str(tmp_path_factory.mktemp("qe-catalog")), n_items=120, seed=5, bad_rows=False)


@pytest.fixture(scope="module")
def published(catalog, tiny_encoders, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("qe-out"))
    result = index_pipeline.run(args(catalog["catalog_glob"], output, tiny_encoders, "--version", "q1"))
    return output, result


def test_release_lists_its_query_encoder_with_parity(published):
    output, result = published
    manifest = result.manifest
    mf.validate_manifest(manifest)
    entry = manifest["query_encoder"]
    assert entry["path"] == qe.DIRECTORY
    shipped = {p for p in manifest["files"] if p.startswith(qe.DIRECTORY + "/")}
    assert {qe.DIRECTORY + "/saved_model.pb", qe.DIRECTORY + "/variables/variables.index"} <= shipped
    on_disk = {os.path.relpath(os.path.join(root, n), result.release_dir).replace(os.sep, "/")
               for root, _, names in os.walk(os.path.join(result.release_dir, qe.DIRECTORY)) for n in names}
    assert on_disk == shipped
    parity = entry["parity"]
    assert parity["threshold"] == qe.PARITY_THRESHOLD
    for name in qe.SIGNATURES:
        assert 0 < parity[name]["items"] <= tr.QUERY_SAMPLE_SIZE, parity
        assert parity[name]["min_cosine"] >= qe.PARITY_THRESHOLD, parity
    assert parity["text"]["items"] >= parity["text_and_image"]["items"]
    print("parity", {name: (parity[name]["items"], parity[name]["min_cosine"]) for name in qe.SIGNATURES})


def test_shipped_encoder_finds_indexed_items_by_their_inputs(published, catalog):
    # A reader's view: load the shipped model and encode an indexed item's title; its stored
    # fused vector (text-only items: the fusion of the text alone) is what comes back.
    _, result = published
    manifest = result.manifest
    encoder = qe.QueryEncoder(os.path.join(result.release_dir, manifest["query_encoder"]["path"]))
    assert encoder.dim == manifest["dimension"]
    assert list(encoder.image_size) == manifest["encoders"]["image"]["image_size"]
    table = pa.concat_tables([pq.read_table(os.path.join(result.release_dir, p))
                              for p in manifest["tables"]["embeddings"]])
    rows = {r["item_id"]: r for r in table.to_pylist()}
    catalog_rows = pa.concat_tables([pq.read_table(f) for f in catalog["files"]]).to_pylist()
    text_only = [r for r in catalog_rows if r["item_id"] in set(catalog["bad_ids"]["no_image"])
                 and r["item_id"] in rows][:5]
    assert text_only
    texts = [tr.item_text(tr.CatalogRow(r["item_id"], r["title"], r.get("description"), None, "", 0))
             for r in text_only]
    got = encoder.encode_text(texts)
    want = np.stack([rows[r["item_id"]]["embedding"] for r in text_only])
    np.testing.assert_allclose((got * want).sum(axis=1), 1.0, atol=1e-4)


def test_verify_covers_the_query_encoder(published, tmp_path):
    output, result = published
    assert cli.main(["verify", "--index", output]) == 0
    copy = str(tmp_path / "copy")
    shutil.copytree(output, copy)
    release = os.path.join(copy, pub.resolve(copy).path)
    assert cli.main(["verify", "--index", copy]) == 0
    damaged = os.path.join(release, qe.DIRECTORY, "variables", "variables.index")
    with open(damaged, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(Exception, match="variables.index: content differs"):
        pub.verify_release(release)
    assert cli.main(["verify", "--index", copy]) != 0
    os.remove(damaged)
    with pytest.raises(Exception, match="variables.index: missing"):
        pub.verify_release(release)


def test_a_query_encoder_that_differs_from_the_pipeline_is_refused(catalog, tiny_encoders, tmp_path, monkeypatch):
    # An encoder exported with another fusion seed computes other vectors: no release, no pointer.
    export = qe.export_query_encoder

    def off_by_one_seed(text, image, fusion, *rest):
        return export(text, image, dataclasses.replace(fusion, seed=fusion.seed + 1), *rest)

    monkeypatch.setattr(qe, "export_query_encoder", off_by_one_seed)
    output = tmp_path / "out"
    with pytest.raises(Exception, match=r"query encoder does not reproduce the pipeline's vectors: worst cosine"):
        index_pipeline.run(args(catalog["catalog_glob"], output, tiny_encoders, "--version", "q2"))
    assert not os.path.exists(output / mf.LATEST_FILE)
    assert not os.path.exists(output / "q2") or os.listdir(output / "q2") == []  # the failed run cleaned up

"""Published versions to search: built once per module with the pipeline and the tiny encoders."""

import os
import shutil

import pytest


def publish(catalog_glob, output, encoders, version, snapshot, *extra):
    from pipelines import index_pipeline

    return index_pipeline.run(["--catalog", catalog_glob, "--output", str(output), "--text-encoder", encoders[0],
                               "--image-encoder", encoders[1], "--version", version, "--snapshot-time", snapshot,
                               "--shards", "2", *extra])


@pytest.fixture(scope="session")
def small_catalogs(tmp_path_factory):
    """Two different 40-item catalogs (v1 and v2 of the same shop), no bad rows."""
    from catalog_index import sample

    root = tmp_path_factory.mktemp("search-catalogs")
    return (sample.generate_catalog(str(root / "one"), n_items=40, seed=11, bad_rows=False),
            sample.generate_catalog(str(root / "two"), n_items=40, seed=12, bad_rows=False))


@pytest.fixture(scope="session")
def published_v1(small_catalogs, tiny_encoders, tmp_path_factory):
    """An output root with v1 (snapshot 2026-11-01) published; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("search-v1") / "out"
    publish(small_catalogs[0]["catalog_glob"], out, tiny_encoders, "v1", "2026-11-01")
    return str(out)


@pytest.fixture(scope="session")
def published_v2(small_catalogs, tiny_encoders, published_v1, tmp_path_factory):
    """A copy of published_v1's root with v2 (snapshot 2026-11-02) published on top."""
    out = tmp_path_factory.mktemp("search-v2") / "out"
    shutil.copytree(published_v1, out)
    publish(small_catalogs[1]["catalog_glob"], out, tiny_encoders, "v2", "2026-11-02")
    return str(out)


@pytest.fixture
def v1_root(published_v1, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(published_v1, out)
    return str(out)


def flip_byte(path, offset=None):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def shard_file(root, version=None):
    """Path of shard 0's Annoy file in the release that LATEST (or version's CURRENT) names."""
    import json

    pointer = json.load(open(os.path.join(root, version, "CURRENT") if version else os.path.join(root, "LATEST")))
    base = os.path.join(root, pointer["version"], pointer["release"])
    manifest = json.load(open(os.path.join(base, "manifest.json")))
    return os.path.join(base, manifest["shards"][0]["path"])

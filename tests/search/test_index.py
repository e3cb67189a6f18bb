"""open_index on real published versions: verification first, self-hits, query vectors equal the pipeline's."""

import io
import logging
import os
import shutil
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedding.images import ImageDecodeError, ImageTooLargeError
from schemas.errors import VerificationError
from search import Hit, QueryError, Watcher, exact_search, open_index
from tests.search.conftest import flip_byte, publish, shard_file


def embeddings_table(searcher):
    parts = [pq.read_table(os.path.join(searcher.release_dir, p)) for p in searcher.manifest["tables"]["embeddings"]]
    rows = [r for part in parts for r in part.to_pylist()]
    return {r["item_id"]: r for r in rows}


def test_open_finds_every_item_by_its_own_vector(published_v1):
    with open_index(published_v1) as s:
        assert (s.version, s.default_search_k) == ("v1", s.manifest.get("validation", {}).get("search_k", -1))
        assert s.loaded_at.endswith("Z") and s.release.startswith("r")
        table = embeddings_table(s)
        ids = sorted(table)
        assert len(ids) == s.manifest["counts"]["indexed"] == len(s.shards)
        matrix = np.array([table[i]["embedding"] for i in ids], np.float32)
        hits = s.search(vectors=matrix, k=5, search_k=-1)
        exact = exact_search(matrix, ids, matrix, 5)
        for item_id, found, want in zip(ids, hits, exact):
            assert found[0].item_id == item_id and found[0].score == pytest.approx(1.0, abs=1e-5)
            assert isinstance(found[0], Hit) and found[0].title == table[item_id]["title"]
            assert found[0].shard == table[item_id]["shard"]
            assert [h.score for h in found] == pytest.approx([sc for _, sc in want], abs=1e-5)


def test_text_query_equals_the_pipelines_vector_of_a_text_only_item(published_v1, small_catalogs):
    catalog = small_catalogs[0]
    rows = {r["item_id"]: r for f in catalog["files"] for r in pq.read_table(f).to_pylist()}
    with open_index(published_v1) as s:
        table = embeddings_table(s)
        text_only = [i for i in catalog["bad_ids"]["no_image"] if i in table]
        assert text_only
        texts = ["\n".join(p.strip() for p in (rows[i]["title"], rows[i]["description"]) if p and p.strip())
                 for i in text_only]
        got = s.embed(texts=texts)
        want = np.array([table[i]["embedding"] for i in text_only], np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # the other path too: the manifest's encoders and fusion (or the query_encoder, whichever s did not use)
        other = dict(s.manifest)
        if other.pop("query_encoder", None) is None:
            pytest.skip("this pipeline ships no query_encoder: only the encoders' path was checked")
        from search.embedder import QueryEmbedder

        both = QueryEmbedder(s.release_dir, other)
        assert s.embedder()._query_model is not None and both._query_model is None
        ready = [t.strip() for t in texts]
        np.testing.assert_allclose(both.vectors(ready, [None] * len(ready)), want, atol=1e-5)
        hits = s.search(texts=texts[:1], k=3)
        assert hits[0][0].item_id == text_only[0] and hits[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_image_query_equals_the_pipelines_vector_of_an_image_only_item(published_v1, small_catalogs):
    catalog = small_catalogs[0]
    rows = {r["item_id"]: r for f in catalog["files"] for r in pq.read_table(f).to_pylist()}
    with open_index(published_v1) as s:
        table = embeddings_table(s)
        image_only = [i for i in catalog["bad_ids"]["image_no_title"] if i in table][:2]
        assert image_only
        images = [open(rows[i]["image_uri"], "rb").read() for i in image_only]
        got = s.embed(images=images)
        np.testing.assert_allclose(got, np.array([table[i]["embedding"] for i in image_only]), atol=1e-5)
        # both modalities of a full item: its stored vector
        full = next(i for i, r in table.items() if r["text_embedding"] is not None and r["image_embedding"] is not None
                    and i not in catalog["bad_ids"].get("fine_edge", []))
        text = "\n".join(p.strip() for p in (rows[full]["title"], rows[full]["description"]) if p and p.strip())
        both = s.embed(texts=[text], images=[open(rows[full]["image_uri"], "rb").read()])
        np.testing.assert_allclose(both[0], table[full]["embedding"], atol=1e-5)


def test_bad_queries_are_reported_one_by_one(published_v1):
    with open_index(published_v1) as s:
        vectors, errors = s.embed_each(texts=["red shoe", "   ", None, "blue"], images=[None, None, None, b"junk"])
        assert errors[0] is None and "empty text" in str(errors[1]) and "no text and no image" in str(errors[2])
        assert isinstance(errors[1], QueryError) and isinstance(errors[3], ImageDecodeError)
        assert "not a readable" in str(errors[3])
        assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5) and not vectors[1:].any()
        with pytest.raises(QueryError, match="query 1"):
            s.embed(texts=["ok", ""])
        # an image over the index's pixel limit keeps its kind (a service maps it to 413, not 422)
        s.embedder().max_pixels = 100
        buf = io.BytesIO()
        Image.new("RGB", (11, 10)).save(buf, "PNG")
        with pytest.raises(ImageTooLargeError, match="query 0: image is 11x10 = 110 pixels"):
            s.embed(images=[buf.getvalue()])


def test_a_damaged_shard_is_named_before_anything_loads(v1_root):
    path = shard_file(v1_root)
    flip_byte(path)
    with pytest.raises(VerificationError, match=os.path.basename(path)):
        open_index(v1_root)
    with pytest.raises(VerificationError, match="missing"):
        open_index(v1_root, version="nope")


def test_a_gs_root_is_copied_to_the_cache_and_verified_there(v1_root, tmp_path, monkeypatch):
    import search.release as si

    class FakeGfile:  # gs://bucket/... is v1_root on disk
        @staticmethod
        def _path(p):
            return p.replace("gs://bucket", v1_root)

        @classmethod
        def exists(cls, p):
            return os.path.exists(cls._path(p))

        @classmethod
        def GFile(cls, p, mode):
            return open(cls._path(p), mode)

        @classmethod
        def copy(cls, src, dst, overwrite=False):
            shutil.copyfile(cls._path(src), dst)

    monkeypatch.setattr(si, "_remote_fs", lambda: FakeGfile)
    cache = tmp_path / "cache"
    with open_index("gs://bucket", cache_dir=str(cache)) as s:
        assert s.release_dir == str(cache / s.version / s.release)
        assert len(s.shards) == s.manifest["counts"]["indexed"]
    flip_byte(os.path.join(s.release_dir, s.manifest["shards"][1]["path"]))  # a damaged cached copy is re-fetched
    with open_index("gs://bucket", cache_dir=str(cache)) as again:
        assert again.release == s.release
    flip_byte(shard_file(v1_root))  # damaged in the store: named by its gs:// path, no copy left behind
    shutil.rmtree(cache)
    with pytest.raises(VerificationError, match=r"gs://bucket/v1/r.*\.ann"):
        open_index("gs://bucket", cache_dir=str(cache))
    assert not os.listdir(cache / "v1")


def test_watcher_swaps_under_load_and_refuses_a_damaged_release(published_v1, published_v2, tmp_path, caplog,
                                                                small_catalogs, tiny_encoders):
    root = str(tmp_path / "out")
    shutil.copytree(published_v1, root)
    queries = np.random.default_rng(5).standard_normal((6, 256)).astype(np.float32)
    expected = {}
    for name, src in (("v1", published_v1), ("v2", published_v2)):
        with open_index(src) as s:
            expected[name] = [[tuple(h) for h in hits] for hits in s.search(vectors=queries, k=5)]
    assert expected["v1"] != expected["v2"]

    watcher = Watcher(root, poll_seconds=3600, grace_seconds=0.05)
    assert watcher.current().version == "v1" and not watcher.check_now()
    old = watcher.current()
    seen, failures, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                for q in range(len(queries)):
                    got = [tuple(h) for h in watcher.current().search(vectors=queries[q:q + 1], k=5)[0]] \
                        if q % 2 else [tuple(h) for h in watcher.search(vectors=queries[q:q + 1], k=5)[0]]
                    seen.append(("v1" if got == expected["v1"][q] else "v2" if got == expected["v2"][q] else "?"))
            except Exception as e:  # noqa: BLE001 - every failure is the test's business
                failures.append(repr(e))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # v2 appears: copy its version folder and LATEST into the live root, as a publisher would
        shutil.copytree(os.path.join(published_v2, "v2"), os.path.join(root, "v2"))
        shutil.copyfile(os.path.join(published_v2, "LATEST"), os.path.join(root, "LATEST"))
        assert watcher.check_now()
        assert watcher.current().version == "v2"
        while sum(s == "v2" for s in seen) < 20:
            pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and "?" not in seen and "v1" in seen
    watcher.stop()
    for t in watcher._retiring:
        t.join()
    assert old.closed

    # a damaged newer release: refused with one log line, v2 keeps serving
    bad = tmp_path / "bad"
    shutil.copytree(published_v2, bad)
    publish(small_catalogs[0]["catalog_glob"], bad, tiny_encoders, "v3", "2026-11-03")
    flip_byte(shard_file(str(bad)))
    shutil.copytree(bad / "v3", os.path.join(root, "v3"))
    shutil.copyfile(bad / "LATEST", os.path.join(root, "LATEST"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="search.watcher"):
        assert not watcher.check_now()
        assert not watcher.check_now()  # the same bad release is not re-verified nor logged again
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and ".ann" in refusals[0].getMessage() and "v3" in refusals[0].getMessage()
    assert watcher.current().version == "v2"
    assert [tuple(h) for h in watcher.search(vectors=queries[:1], k=5)[0]] == expected["v2"][0]
    watcher.close()
    assert watcher.current().closed


def test_a_replaced_searcher_stays_open_while_it_is_held(published_v1, published_v2, tmp_path):
    import time

    root = str(tmp_path / "out")
    shutil.copytree(published_v1, root)
    queries = np.random.default_rng(6).standard_normal((2, 256)).astype(np.float32)
    watcher = Watcher(root, poll_seconds=3600, grace_seconds=0.01)
    try:
        with watcher.acquire() as held:
            before = held.search(vectors=queries, k=3)
            shutil.copytree(os.path.join(published_v2, "v2"), os.path.join(root, "v2"))
            shutil.copyfile(os.path.join(published_v2, "LATEST"), os.path.join(root, "LATEST"))
            assert watcher.check_now() and watcher.current().version == "v2"
            time.sleep(0.3)  # well past the grace period: only the reference keeps it open
            assert not held.closed and held.in_flight == 1
            assert held.search(vectors=queries, k=3) == before  # still v1, still answering
        for t in watcher._retiring:
            t.join(timeout=10)
        assert held.closed and held.version == "v1"
        with pytest.raises(RuntimeError, match="closed"):
            held.search(vectors=queries, k=3)
    finally:
        watcher.close()

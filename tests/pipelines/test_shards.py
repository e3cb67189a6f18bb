import collections

import numpy as np
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex

from embedding.fusion import l2_normalize
from pipelines import shards as shd


def items(n, dim, seed=0, prefix="item"):
    rng = np.random.default_rng(seed)
    vecs = l2_normalize(rng.normal(size=(n, dim)))
    return [shd.IndexedItem(f"{prefix}-{i:04d}", f"title {i}", vecs[i][:4], None, vecs[i]) for i in range(n)]


def test_stable_shard_is_pinned():
    # Pinned values (sha256-based): a change here would move every published item to another shard.
    assert [shd.stable_shard(x, 16) for x in ("a", "item-000001", "有机绿茶", "b", "c")] == [10, 10, 11, 10, 2]
    assert shd.stable_shard("a", 4) == 2
    assert all(shd.stable_shard(f"x{i}", 1) == 0 for i in range(50))


def test_stable_shard_spreads_items_evenly():
    counts = collections.Counter(shd.stable_shard(f"item-{i}", 8) for i in range(8000))
    assert sorted(counts) == list(range(8))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_write_shard_tiny_exact_case(tmp_path):
    vecs = [np.array(v, np.float32) for v in ([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0])]
    its = [shd.IndexedItem(i, None, None, None, v) for i, v in zip(["c", "a", "b"], vecs)]
    info = shd.write_shard(its, 0, 1, 3, trees=3, seed=1, version_dir=str(tmp_path))
    assert (info.count, info.path) == (3, "shards/shard-00000-of-00001.ann")
    ids = pq.read_table(tmp_path / info.id_map).to_pydict()
    assert ids == {"annoy_id": [0, 1, 2], "item_id": ["a", "b", "c"]}  # sorted by item_id
    index = AnnoyIndex(3, "angular")
    index.load(str(tmp_path / info.path))
    # "c" = [1,0,0] is nearest to "b" = [0.9,0.1,0]; annoy ids: a=0, b=1, c=2.
    assert index.get_nns_by_item(2, 2) == [2, 1]
    assert index.get_nns_by_item(0, 1) == [0]
    table = pq.read_table(tmp_path / info.embeddings).to_pylist()
    assert [r["item_id"] for r in table] == ["a", "b", "c"]
    assert table[0]["embedding"] == pytest.approx([0, 1, 0])
    assert table[0]["image_embedding"] is None and table[0]["shard"] == 0 and table[2]["annoy_id"] == 2


def test_write_shard_is_byte_identical_for_identical_input(tmp_path):
    its = items(300, 16)
    a = shd.write_shard(its, 0, 1, 16, trees=5, seed=3, version_dir=str(tmp_path / "a"))
    b = shd.write_shard(list(reversed(its)), 0, 1, 16, trees=5, seed=3, version_dir=str(tmp_path / "b"))
    assert (a.sha256, a.size) == (b.sha256, b.size)
    assert (tmp_path / "a" / a.path).read_bytes() == (tmp_path / "b" / b.path).read_bytes()


def test_empty_shard_is_written(tmp_path):
    info = shd.write_shard([], 2, 4, 8, trees=2, seed=0, version_dir=str(tmp_path))
    assert info.count == 0 and info.path == "shards/shard-00002-of-00004.ann"
    index = AnnoyIndex(8, "angular")
    index.load(str(tmp_path / info.path))
    assert index.get_n_items() == 0
    assert pq.read_table(tmp_path / info.id_map).num_rows == 0


def test_every_item_is_its_own_neighbour_and_recall_vs_brute_force(tmp_path):
    its = items(2000, 32, seed=5)
    info = shd.write_shard(its, 0, 1, 32, trees=10, seed=0, version_dir=str(tmp_path))
    index = AnnoyIndex(32, "angular")
    index.load(str(tmp_path / info.path))
    ordered = sorted(its, key=lambda it: it.item_id)
    vecs = np.stack([it.embedding for it in ordered])
    assert all(index.get_nns_by_item(i, 1) == [i] for i in range(len(ordered)))
    rng = np.random.default_rng(9)
    queries = l2_normalize(rng.normal(size=(100, 32)))
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    found = [index.get_nns_by_vector(q, 10, search_k=10 * 10 * 20) for q in queries]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall

"""ShardSet against hand-computed cosines, one unsharded index and the brute-force answer."""

import math
import subprocess
import sys
import os

import numpy as np
import pytest
from annoy import AnnoyIndex

from search.ann import ShardSet, exact_search

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(path, vectors, trees=10, seed=0):
    index = AnnoyIndex(len(vectors[0]) if len(vectors) else 3, "angular")
    index.set_seed(seed)
    index.on_disk_build(str(path))
    for i, v in enumerate(vectors):
        index.add_item(i, list(map(float, v)))
    index.build(trees, n_jobs=1)
    index.unload()
    return str(path)


def shard(tmp_path, name, vectors, dim=3):
    path = tmp_path / f"{name}.ann"
    index = AnnoyIndex(dim, "angular")
    index.set_seed(0)
    index.on_disk_build(str(path))
    for i, v in enumerate(vectors):
        index.add_item(i, list(map(float, v)))
    index.build(10, n_jobs=1)
    index.unload()
    return str(path)


def test_tiny_exact_cosines_merged_over_shards_with_an_empty_one(tmp_path):
    # shard 0: a=(1,0,0), b=(1,1,0); shard 1: empty; shard 2: c=(0,0,2), d=(-1,0,0)
    paths = [shard(tmp_path, "s0", [(1, 0, 0), (1, 1, 0)]), shard(tmp_path, "s1", []),
             shard(tmp_path, "s2", [(0, 0, 2), (-1, 0, 0)])]
    with ShardSet(paths, 3, [["a", "b"], [], ["c", "d"]], titles=[["A", "B"], [], [None, "D"]], threads=3) as s:
        assert len(s) == 4 and s.num_shards == 3
        (hits,) = s.search(np.array([[3.0, 0.0, 0.0]]), k=4)  # not normalised on purpose
        assert [h[0] for h in hits] == ["a", "b", "c", "d"]
        assert [h[2] for h in hits] == [0, 0, 2, 2]
        want = [1.0, 1 / math.sqrt(2), 0.0, -1.0]
        assert [h[1] for h in hits] == pytest.approx(want, abs=1e-5)
        # query (1,0,1)/sqrt2: a 0.7071, b 0.5, c 0.7071, d -0.7071; the tie a/c goes by item_id
        q = s.search(np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), k=3)
        assert [h[0] for h in q[0]] == ["a", "c", "b"]
        assert [h[1] for h in q[0]] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.5], abs=1e-5)
        assert [h[0] for h in q[1]][:1] == ["b"] and q[1][0][1] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
        assert s.title("b") == "B" and s.title("c") is None
        assert s.search(np.zeros((1, 3)), k=2) == [[]]  # a zero query has no neighbours
        with pytest.raises(ValueError):
            s.search(np.ones((1, 4)), k=2)
        with pytest.raises(ValueError):
            s.search(np.array([[np.nan, 0, 0]]), k=2)
    with pytest.raises(RuntimeError):
        s.search(np.ones((1, 3)), k=1)


def test_id_map_must_match_the_shard(tmp_path):
    path = shard(tmp_path, "s0", [(1, 0, 0), (0, 1, 0)])
    with pytest.raises(ValueError, match="id map"):
        ShardSet([path], 3, [["only-one"]])


def test_exact_search_ties_by_item_id():
    m = np.array([[0, 1, 0], [1, 0, 0], [2, 0, 0], [0, 0, 1]], np.float32)
    out = exact_search(m, ["z", "y", "x", "w"], np.array([[1, 0, 0], [0, 0, 0]]), k=3)
    assert [i for i, _ in out[0]] == ["x", "y", "w"]
    assert [s for _, s in out[0]] == pytest.approx([1.0, 1.0, 0.0])
    assert [i for i, _ in out[1]] == ["w", "x", "y"]  # a zero query scores 0 everywhere: id order


def test_sharded_equals_unsharded_and_exact(tmp_path):
    rng = np.random.default_rng(42)
    n, dim, num_shards, k = 120, 16, 3, 10
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    ids = [f"item-{i:04d}" for i in range(n)]
    owner = [int(i) % num_shards for i in rng.integers(0, 1 << 30, n)]
    paths, id_maps = [], []
    for s in range(num_shards):
        members = sorted(i for i in range(n) if owner[i] == s)
        paths.append(build(tmp_path / f"s{s}.ann", vectors[members]))
        id_maps.append([ids[i] for i in members])
    whole = build(tmp_path / "all.ann", vectors)
    queries = rng.standard_normal((25, dim)).astype(np.float32)
    with ShardSet(paths, dim, id_maps) as sharded, ShardSet([whole], dim, [ids], threads=1) as single:
        a = sharded.search(queries, k)
        b = single.search(queries, k)
    exact = exact_search(vectors, ids, queries, k)
    for got, one, want in zip(a, b, exact):
        assert [h[0] for h in got] == [h[0] for h in one] == [i for i, _ in want]  # recall 1.0
        assert [h[1] for h in got] == pytest.approx([s for _, s in want], abs=1e-5)
        assert [h[1] for h in got] == pytest.approx([h[1] for h in one], abs=1e-6)
        assert all(owner[int(h[0][5:])] == h[2] for h in got)


def test_import_search_does_not_import_beam():
    code = ("import sys, search; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam');"
            " print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_exact_search_equals_sorting_every_row():
    """exact_search sorts only the rows that can be in the top k (partition first); the answer must be
    that of sorting every row by (score descending, item_id), ties and NaN scores included."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        n, dim = int(rng.integers(1, 50)), int(rng.integers(1, 4))
        m = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)  # small integers: many equal scores
        if trial % 4 == 0:
            m[rng.integers(0, n)] = np.nan
        ids = [f"i{x:03d}" for x in rng.permutation(n)]
        queries = rng.integers(-2, 3, size=(5, dim)).astype(np.float32)
        k = int(rng.integers(1, n + 3))
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        unit = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)
        qn = np.linalg.norm(queries, axis=1, keepdims=True)
        scores = np.divide(queries, qn, out=np.zeros_like(queries), where=qn > 0) @ unit.T
        want = [[ids[i] for i in np.lexsort((np.asarray(ids, object), -row))[:k]] for row in scores]
        got = exact_search(m, ids, queries, k)
        assert [[i for i, _ in row] for row in got] == want


def test_exact_search_scores_queries_a_chunk_at_a_time(monkeypatch):
    """The score table is bounded (the recall gate's 10,000 queries x 1M items would be 37 GiB): with a
    budget of a few rows, the queries go in chunks and the answer is the same."""
    from search import ann

    rng = np.random.default_rng(3)
    m = rng.normal(size=(300, 8)).astype(np.float32)
    ids = [f"i{x:03d}" for x in range(300)]
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    whole = exact_search(m, ids, queries, 7)
    chunks = []
    real = ann._top_k

    def spy(scores, *args):
        chunks.append(len(scores))
        return real(scores, *args)

    monkeypatch.setattr(ann, "SCORE_BYTES", 4 * 300 * 5)  # five queries' scores at a time
    monkeypatch.setattr(ann, "_top_k", spy)
    chunked = exact_search(m, ids, queries, 7)
    assert chunks == [5, 5, 5, 5, 3]
    assert [[i for i, _ in row] for row in chunked] == [[i for i, _ in row] for row in whole]
    np.testing.assert_allclose([[s for _, s in row] for row in chunked], [[s for _, s in row] for row in whole],
                               atol=1e-6)

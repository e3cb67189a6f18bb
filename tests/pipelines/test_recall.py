"""The recall gate at publication: sample, ladder, the manifest's validation, refusal."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex

from pipelines import index_pipeline
from pipelines import recall
from schemas.errors import PublicationError


@pytest.mark.parametrize("n, expected", [(0, 0), (50, 50), (100, 100), (5_000, 100), (200_000, 2_000),
                                         (2_000_000, 10_000)])
def test_sample_size(n, expected):
    assert recall.sample_size(n) == expected


def test_ladder_doubles_from_annoys_default():
    assert recall.ladder(10, 10, 4) == [100, 200, 400, 800]


def index_args(catalog, output, encoders, *extra):
    return ["--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    from catalog_index import sample

    return sample.generate_catalog(str(tmp_path_factory.mktemp("recall")), n_items=150, seed=5, bad_rows=False)


def test_published_validation_matches_an_independent_measurement(catalog, tiny_encoders, tmp_path):
    result = index_pipeline.run(index_args(catalog["catalog_glob"], tmp_path, tiny_encoders, "--shards", "3",
                                           "--version", "r"))
    v = result.manifest["validation"]
    assert v["sample_size"] == 100 and v["min_recall"] == 0.95
    assert v["search_k"] in recall.ladder(result.manifest["trees"]) and v["recall_at_10"] >= 0.95
    # Recompute recall@10 at the recorded search_k with plain Annoy and numpy, independently of search/.
    m, base = result.manifest, result.release_dir
    ids, vecs, indexes, maps = [], [], [], []
    for s in m["shards"]:
        t = pq.read_table(os.path.join(base, s["embeddings"])).to_pydict()
        ids += t["item_id"]
        vecs += t["embedding"]
        ix = AnnoyIndex(m["dimension"], "angular")
        ix.load(os.path.join(base, s["path"]))
        indexes.append(ix)
        maps.append(pq.read_table(os.path.join(base, s["id_map"])).column("item_id").to_pylist())
    matrix = np.array(vecs, np.float32)
    sample = sorted(range(len(ids)), key=lambda i: recall._order(ids[i]))[:v["sample_size"]]
    hits = []
    for i in sample:
        exact = {ids[j] for j in np.argsort(-(matrix @ matrix[i]), kind="stable")[:10]}
        found = []
        for ix, mp in zip(indexes, maps):
            got, dist = ix.get_nns_by_vector(matrix[i], 10, search_k=v["search_k"], include_distances=True)
            found += [(d, mp[g]) for g, d in zip(got, dist)]
        top = {item for _, item in sorted(found)[:10]}
        hits.append(len(top & exact) / 10)
    assert float(np.mean(hits)) == pytest.approx(v["recall_at_10_by_query"]["item"], abs=0.011)
    # Text and photo searches are measured too (the fusion of a text or an image alone), and the
    # recorded recall is the worst of the three kinds.
    assert set(v["recall_at_10_by_query"]) == {"item", "text_only", "image_only"}
    assert v["recall_at_10"] == min(v["recall_at_10_by_query"].values())


def _random_release(tmp_path, n=2000, dim=32, trees=1, seed=0):
    """A release folder with one shard of seeded random unit vectors (more than Annoy's leaf size)."""
    from pipelines import shards as shd

    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = [shd.IndexedItem(f"i{i:05d}", None, None, None, v) for i, v in enumerate(vecs)]
    info = shd.write_shard(items, 0, 1, dim, trees, seed, str(tmp_path))
    return {"shards": [info.to_json()], "dimension": dim, "trees": trees}


def test_the_ladder_climbs_until_the_recall_is_reached(tmp_path):
    manifest = _random_release(tmp_path)
    v = recall.measure(str(tmp_path), manifest, 0.95)
    assert v["sample_size"] == 100 and v["recall_at_10"] >= 0.95 and v["search_k"] > recall.ladder(1)[0]
    assert v["search_k"] in recall.ladder(1)
    # One step lower does not reach it: the smallest search_k on the ladder was chosen.
    lower = recall.measure(str(tmp_path), manifest, 0.0)
    assert lower["search_k"] == recall.ladder(1)[0] and lower["recall_at_10"] < 0.95


def test_an_index_that_cannot_reach_the_recall_is_refused(tmp_path, monkeypatch):
    manifest = _random_release(tmp_path)
    monkeypatch.setattr(recall, "LADDER_STEPS", 2)
    with pytest.raises(PublicationError, match=r"does not reach --min-recall 0.99 recall@10 on 100 sampled items "
                                               r"at any search_k up to 20 \(search_k 10: item 0\.\d+; search_k 20: item 0\.\d+\)"):
        recall.measure(str(tmp_path), manifest, 0.99)


def test_min_recall_is_checked_up_front(catalog, tiny_encoders, tmp_path):
    from schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="--min-recall must be within"):
        index_pipeline.run(index_args(catalog["catalog_glob"], tmp_path, tiny_encoders, "--min-recall", "2"))


def _fused_release(path, n=3000, text_dim=16, image_dim=24, dim=32, trees=2, shards=2, seed=3):
    """A seeded release with text, image and fused vectors in two shards, written with pyarrow and Annoy
    directly (not through pipelines/shards.py, so that the golden figures below depend on this file only).
    A fifth of the items have text only, a fifth an image only; the first 40 items repeat items 40-79
    exactly (ties in exact search and in Annoy). Two trees: the ladder climbs several steps."""
    import pyarrow as pa

    from embedding import fusion as fus
    from schemas.layout import METRIC

    rng = np.random.default_rng(seed)
    spec = {"kind": "projection", "text_dim": text_dim, "image_dim": image_dim, "dim": dim,
            "text_weight": 1.0, "image_weight": 1.0, "seed": seed}
    text = rng.normal(size=(n, text_dim)).astype(np.float32)
    image = rng.normal(size=(n, image_dim)).astype(np.float32)
    text[:40], image[:40] = text[40:80], image[40:80]
    kind = rng.integers(0, 5, n)  # 0: text only, 1: image only, else both
    has_text, has_image = kind != 1, kind != 0
    has_text[:80], has_image[:80] = True, True
    fuse = fus.make_fusion(fus.FusionSpec.from_json(spec))
    fused = np.asarray(fuse(text, has_text.astype(np.float32), image, has_image.astype(np.float32)), np.float32)
    ids = [f"item-{i:05d}" for i in range(n)]
    os.makedirs(os.path.join(path, "shards"), exist_ok=True)
    os.makedirs(os.path.join(path, "embeddings"), exist_ok=True)
    entries = []
    for s in range(shards):
        rows = [i for i in range(n) if i % shards == s]
        name = f"{s:05d}-of-{shards:05d}"
        index = AnnoyIndex(dim, METRIC)
        index.set_seed(seed)
        for a, i in enumerate(rows):
            index.add_item(a, fused[i].tolist())
        index.build(trees, n_jobs=1)
        index.save(os.path.join(path, f"shards/shard-{name}.ann"))
        index.unload()
        pq.write_table(pa.table({"item_id": [ids[i] for i in rows]}),
                       os.path.join(path, f"shards/shard-{name}.ids.parquet"))

        def column(vectors, present):
            return pa.array([vectors[i].tolist() if present[i] else None for i in rows], pa.list_(pa.float32()))

        # Two row groups: the gate reads chunked columns.
        pq.write_table(pa.table({"item_id": [ids[i] for i in rows], "title": [f"t{i}" for i in rows],
                                 "text_embedding": column(text, has_text),
                                 "image_embedding": column(image, has_image),
                                 "embedding": column(fused, np.ones(n, bool))}),
                       os.path.join(path, f"embeddings/part-{name}.parquet"), row_group_size=len(rows) // 2 + 1)
        entries.append({"count": len(rows), "path": f"shards/shard-{name}.ann",
                        "id_map": f"shards/shard-{name}.ids.parquet", "embeddings": f"embeddings/part-{name}.parquet"})
    return {"shards": entries, "dimension": dim, "trees": trees, "fusion": spec}


# Golden figures: computed once with the previous implementation of recall.measure (commit 8eb2313, which
# searched every sampled query of every kind at every step of the ladder and converted vectors through
# to_pylist) on _fused_release, before the gate was made faster. The faster gate must give exactly these.
GOLDEN = {
    0.95: {"sample_size": 100, "recall_at_10": 0.9532, "self_hit_at_1": 0.99, "search_k": 1280, "min_recall": 0.95,
           "recall_at_10_by_query": {"item": 0.969, "text_only": 0.984, "image_only": 0.9532}},
    0.99: {"sample_size": 100, "recall_at_10": 1.0, "self_hit_at_1": 0.99, "search_k": 2560, "min_recall": 0.99,
           "recall_at_10_by_query": {"item": 1.0, "text_only": 1.0, "image_only": 1.0}},
    0.0: {"sample_size": 100, "recall_at_10": 0.2208, "self_hit_at_1": 0.99, "search_k": 20, "min_recall": 0.0,
          "recall_at_10_by_query": {"item": 0.265, "text_only": 0.2667, "image_only": 0.2208}},
}
GOLDEN_REFUSAL = (
    "the index does not reach --min-recall 0.99 recall@10 on 100 sampled items at any search_k up to 80 "
    "(search_k 20: item 0.265, text_only 0.267, image_only 0.221; search_k 40: item 0.345, text_only 0.377, "
    "image_only 0.295; search_k 80: item 0.457, text_only 0.519, image_only 0.401); nothing was published "
    "(LATEST was not touched). Build more trees (--trees) or lower --min-recall")


@pytest.fixture(scope="module")
def fused_release(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused-release")
    return str(path), _fused_release(str(path))


@pytest.mark.parametrize("min_recall", sorted(GOLDEN))
@pytest.mark.parametrize("threads", [1, 3])
def test_measure_gives_the_golden_figures(fused_release, min_recall, threads):
    path, manifest = fused_release
    v = recall.measure(path, manifest, min_recall, threads=threads)
    assert v == GOLDEN[min_recall]
    assert list(v["recall_at_10_by_query"]) == ["item", "text_only", "image_only"]


def test_the_refusal_gives_the_golden_figures(fused_release, monkeypatch):
    path, manifest = fused_release
    monkeypatch.setattr(recall, "LADDER_STEPS", 3)
    with pytest.raises(PublicationError) as refused:
        recall.measure(path, manifest, 0.99)
    assert str(refused.value) == GOLDEN_REFUSAL


def _plain_climb(path, manifest, steps):
    """Every sampled query of every kind searched at every step: [(search_k, figures by kind, self-hit@1)],
    computed as the gate computed them before it skipped searches (the reference for the climb)."""
    from search.ann import ShardSet, exact_search

    ids, matrix, text, image = [], [], ([], []), ([], [])
    for s in manifest["shards"]:
        t = pq.read_table(os.path.join(path, s["embeddings"])).to_pydict()
        for name, (rows, vecs) in (("text_embedding", text), ("image_embedding", image)):
            rows += [len(ids) + r for r, v in enumerate(t[name]) if v is not None]
            vecs += [v for v in t[name] if v is not None]
        ids += t["item_id"]
        matrix += t["embedding"]
    matrix = np.array(matrix, np.float32)
    chosen = sorted(range(len(ids)), key=lambda i: recall._order(ids[i]))[:recall.sample_size(len(ids))]
    sets = recall.query_sets(manifest, matrix[chosen], (text[0], np.array(text[1], np.float32)),
                             (image[0], np.array(image[1], np.float32)), chosen)
    truth = {kind: exact_search(matrix, ids, q, 10) for kind, q in sets.items()}
    maps = [pq.read_table(os.path.join(path, s["id_map"])).column("item_id").to_pylist() for s in manifest["shards"]]
    out = []
    with ShardSet([os.path.join(path, s["path"]) for s in manifest["shards"]], manifest["dimension"], maps) as index:
        for search_k in steps:
            by_kind, self_hit = {}, None
            for kind, q in sets.items():
                found = index.search(q, 10, search_k)
                by_kind[kind] = float(np.mean([len({h[0] for h in got} & {t[0] for t in want}) / 10
                                               for got, want in zip(found, truth[kind])]))
                if kind == "item":
                    self_hit = float(np.mean([bool(got) and got[0][0] == ids[i] for got, i in zip(found, chosen)]))
            out.append((search_k, by_kind, self_hit))
    return out


def test_the_climb_equals_searching_everything_at_every_step(fused_release, monkeypatch):
    """Whatever it skips, the gate chooses the step and gives the figures that searching every query at
    every step gives: here with min_recall at each step's lowest figure, so that each step is chosen once."""
    path, manifest = fused_release
    steps = recall.ladder(manifest["trees"])[:9]
    plain = _plain_climb(path, manifest, steps)
    searched = []
    real = recall.ShardByShard.search

    def counting(self, vectors, k, search_k=-1):
        searched.append(len(vectors))
        return real(self, vectors, k, search_k)

    monkeypatch.setattr(recall.ShardByShard, "search", counting)
    for search_k, by_kind, self_hit in plain:
        threshold = min(by_kind.values())
        first = next(i for i, (_, figures, _) in enumerate(plain) if min(figures.values()) >= threshold)
        _, want, want_hit = plain[first]
        del searched[:]
        v = recall.measure(path, manifest, threshold, threads=2)
        assert v["search_k"] == steps[first]
        assert v["recall_at_10_by_query"] == {kind: round(r, 4) for kind, r in want.items()}
        assert v["recall_at_10"] == round(min(want.values()), 4) and v["self_hit_at_1"] == round(want_hit, 4)
        assert sum(searched) <= 3 * 100 * (first + 1)  # never more searches than the plain climb
    assert sum(searched) < 3 * 100 * (first + 1)  # and at the last step fewer: queries at 1.0 were skipped


def test_column_vectors_reads_chunks_nulls_and_slices():
    import pyarrow as pa

    t = pa.list_(pa.float32())
    column = pa.chunked_array([pa.array([[1, 2], None, [3, float("nan")]], t),
                               pa.array([[0, 0], [5, 6], [7, 8]], t).slice(1), pa.array([], t)])
    rows, vecs = recall._column_vectors(column, 2)
    assert rows == [0, 2, 3, 4]
    np.testing.assert_array_equal(vecs, np.array([[1, 2], [3, np.nan], [5, 6], [7, 8]], np.float32))
    assert vecs.dtype == np.float32
    assert recall._column_vectors(pa.array([], t), 3)[1].shape == (0, 3)
    with pytest.raises(ValueError, match=r"\[3\] values where 2"):
        recall._column_vectors(pa.array([[1, 2], [1, 2, 3]], t), 2)


def _release_arrays(path, manifest):
    ids, matrix = [], []
    for s in manifest["shards"]:
        t = pq.read_table(os.path.join(path, s["embeddings"]), columns=["item_id", "embedding"]).to_pydict()
        ids += t["item_id"]
        matrix += t["embedding"]
    return ids, np.array(matrix, np.float32)


@pytest.mark.parametrize("read_rows,block_rows", [(7, 7), (5, 13), (1024, 1000), (1024, 1 << 16)])
def test_fused_blocks_are_the_fused_column_in_order(fused_release, monkeypatch, read_rows, block_rows):
    # Reads of 5 rows filling blocks of 13 cross reads, row groups and parts; each block is copied
    # before the next (the generator reuses its memory).
    path, manifest = fused_release
    monkeypatch.setattr(recall, "READ_ROWS", read_rows)
    monkeypatch.setattr(recall, "BLOCK_ROWS", block_rows)
    ids, matrix = _release_arrays(path, manifest)
    parts = [os.path.join(path, s["embeddings"]) for s in manifest["shards"]]
    got = [(start, block.copy()) for start, block in recall._fused_blocks(parts, manifest["dimension"])]
    assert [start for start, _ in got] == list(range(0, len(ids), block_rows))
    assert all(len(b) == block_rows for _, b in got[:-1]) and 0 < len(got[-1][1]) <= block_rows
    assert np.array_equal(np.concatenate([b for _, b in got]), matrix)


@pytest.mark.parametrize("read_rows,block_rows", [(7, 7), (5, 13), (1024, 1000), (1024, 1 << 16)])
def test_exact_search_by_blocks_equals_exact_search_over_everything(fused_release, monkeypatch, read_rows,
                                                                    block_rows):
    # Blocks of 7 rows cross row groups and parts; the first 40 items repeat items 40-79 (exact ties).
    from search.ann import exact_search

    path, manifest = fused_release
    monkeypatch.setattr(recall, "READ_ROWS", read_rows)
    monkeypatch.setattr(recall, "BLOCK_ROWS", block_rows)
    ids, matrix = _release_arrays(path, manifest)
    rng = np.random.default_rng(5)
    sets = {"item": matrix[:60], "random": rng.normal(size=(30, manifest["dimension"])).astype(np.float32)}
    parts = [os.path.join(path, s["embeddings"]) for s in manifest["shards"]]
    got = recall._exact(parts, ids, sets, 10, manifest["dimension"])
    # A dot product's last bit depends on the matrix shape BLAS sees, so scores match within float32
    # rounding and only near-ties (within 1e-6) may be ordered or cut differently.
    eps = 1e-6
    for kind, q in sets.items():
        want = exact_search(matrix, ids, q, 10)
        assert len(got[kind]) == len(want) == len(q)
        for g, w in zip(got[kind], want):
            assert len(g) == len(w) == 10
            ref, tenth = dict(w), w[-1][1]
            assert {i for i, sc in w if sc > tenth + eps} <= {i for i, _ in g}  # all but near-ties of the 10th
            for i, sc in g:
                assert abs(sc - ref[i]) <= eps if i in ref else sc <= tenth + eps
            assert [sc for _, sc in g] == sorted((sc for _, sc in g), reverse=True)
    top = got["item"][0]
    assert [i for i, _ in top[:2]] == ["item-00000", "item-00040"] and top[0][1] == top[1][1]  # an exact tie: by id


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("search_k", [20, 160, -1])
def test_shard_by_shard_answers_as_shardset_with_one_shard_mapped(fused_release, monkeypatch, threads, search_k):
    from search.ann import ShardSet

    path, manifest = fused_release
    ids, matrix = _release_arrays(path, manifest)
    maps = [pq.read_table(os.path.join(path, s["id_map"])).column("item_id").to_pylist() for s in manifest["shards"]]
    paths = [os.path.join(path, s["path"]) for s in manifest["shards"]]
    queries = np.concatenate([matrix[:80], np.zeros((1, manifest["dimension"]), np.float32)])
    with ShardSet(paths, manifest["dimension"], maps) as every:
        want = every.search(queries, 10, search_k)
    mapped, most = [0], [0]
    real_init, real_close = ShardSet.__init__, ShardSet.close

    def opening(self, *a, **kw):
        real_init(self, *a, **kw)
        mapped[0] += len(self.shard_paths)
        most[0] = max(most[0], mapped[0])

    def closing(self):
        if not self._closed:
            mapped[0] -= len(self.shard_paths)
        real_close(self)

    monkeypatch.setattr(ShardSet, "__init__", opening)
    monkeypatch.setattr(ShardSet, "close", closing)
    index = recall.ShardByShard(paths, manifest["dimension"], maps, threads=threads)
    try:
        got = index.search(queries, 10, search_k)
    finally:
        index.close()
    assert [[(h[0], h[1]) for h in hits] for hits in got] == [[(h[0], h[1]) for h in hits] for hits in want]
    assert got[-1] == [] and len(got[0]) == 10
    assert most[0] == 1 and mapped[0] == 0


def test_measure_gives_the_golden_figures_reading_small_blocks(fused_release, monkeypatch):
    path, manifest = fused_release
    monkeypatch.setattr(recall, "READ_ROWS", 5)
    monkeypatch.setattr(recall, "BLOCK_ROWS", 33)
    assert recall.measure(path, manifest, 0.95, threads=2) == GOLDEN[0.95]

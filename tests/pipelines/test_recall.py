"""The recall gate at publication: sample, ladder, the manifest's validation, refusal."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from annoy import AnnoyIndex

from pipelines import index_pipeline
from pipelines import recall
from pipelines import publication as pub
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

"""`catalog-index index` with no encoder flags: the built-in pretrained encoders, offline."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from annoy import AnnoyIndex
from PIL import Image

from pipelines import index_pipeline

PRODUCTS = [
    ("red-apples", "Fresh red apples, 1 kg", (200, 20, 30)),
    ("green-apples", "Crisp green apples, 1 kg", (40, 180, 40)),
    ("orange-juice", "Orange juice, 1 litre carton", (250, 150, 10)),
    ("apple-juice", "Apple juice, 1 litre bottle", (230, 200, 60)),
    ("motor-oil", "Synthetic motor oil 5W-30, 4 litres", (20, 20, 20)),
    ("car-wax", "Car wax polish for paint", (90, 90, 120)),
    ("running-shoes", "Lightweight running shoes for men", (30, 60, 200)),
    ("hiking-boots", "Waterproof leather hiking boots", (120, 70, 30)),
]


def test_defaults_are_the_builtin_encoders(tmp_path, builtin_cache):
    rows = []
    for item_id, title, colour in PRODUCTS:
        path = tmp_path / f"{item_id}.jpg"
        Image.new("RGB", (64, 48), colour).save(path)
        rows.append({"item_id": item_id, "title": title, "description": None, "image_uri": str(path)})
    rows.append({"item_id": "text-only", "title": "bottle of apple juice", "description": None, "image_uri": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")

    result = index_pipeline.run(["--catalog", str(tmp_path / "c.parquet"), "--output", str(tmp_path / "out"),
                                 "--model-cache", builtin_cache, "--version", "b"])
    m = result.manifest
    assert m["encoders"]["text"]["handle"] == "builtin:minilm-l6-v2"
    assert m["encoders"]["image"]["handle"] == "builtin:efficientnet-lite0"
    assert (m["encoders"]["text"]["output_dim"], m["encoders"]["image"]["output_dim"]) == (384, 1280)
    assert m["encoders"]["image"]["image_size"] == [224, 224]
    assert m["counts"]["indexed"] == len(rows) and m["dimension"] == 256

    table = pq.read_table(os.path.join(result.release_dir, m["shards"][0]["embeddings"])).to_pylist()
    vecs = {r["item_id"]: np.array(r["text_embedding"]) for r in table}
    # MiniLM ranks the text-only query's neighbours by meaning.
    sims = {k: float(v @ vecs["text-only"]) for k, v in vecs.items() if k != "text-only"}
    assert max(sims, key=sims.get) == "apple-juice"
    assert sims["orange-juice"] > sims["motor-oil"] and sims["red-apples"] > sims["hiking-boots"]
    index = AnnoyIndex(256, "angular")
    index.load(os.path.join(result.release_dir, m["shards"][0]["path"]))
    ids = pq.read_table(os.path.join(result.release_dir, m["shards"][0]["id_map"])).column("item_id").to_pylist()
    nearest = [ids[i] for i in index.get_nns_by_item(ids.index("text-only"), 2)]
    assert nearest == ["text-only", "apple-juice"]
    assert m["encoders"]["text"]["chosen_by"]["rule"] == "auto"
    assert "English-dominant" in m["encoders"]["text"]["chosen_by"]["reason"]

    # The release's query encoder holds the built-in MiniLM (tensorflow-text ops in its graph): a fresh
    # `catalog-index query` process must load it and find the item by meaning.
    import json
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "catalog-index")
    done = subprocess.run([exe, "query", "--index", str(tmp_path / "out"), "--text", "a bottle of apple juice",
                           "--k", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = [r["item_id"] for r in json.loads(done.stdout.strip().splitlines()[-1])["results"]]
    assert set(found) == {"text-only", "apple-juice"}


def _write_catalog(tmp_path, titles):
    rows = [{"item_id": item_id, "title": title, "description": None, "image_uri": None}
            for item_id, title in titles]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    return str(tmp_path / "c.parquet")


CHINESE = [("apples", "新鲜红苹果"), ("bananas", "香蕉"), ("milk", "全脂牛奶"), ("tomatoes", "番茄"),
           ("eggs", "鸡蛋"), ("rice", "白米"), ("juice", "橙汁"), ("tea", "绿茶"), ("oil", "机油"), ("shoes", "跑鞋")]


def test_auto_picks_the_multilingual_encoder_for_a_chinese_catalog(tmp_path, builtin_cache, tiny_encoders):
    catalog = _write_catalog(tmp_path, CHINESE)
    result = index_pipeline.run(["--catalog", catalog, "--output", str(tmp_path / "out"), "--model-cache",
                                 builtin_cache, "--image-encoder", tiny_encoders[1], "--version", "zh"])
    text = result.manifest["encoders"]["text"]
    assert text["handle"] == "builtin:use-multilingual-v3" and text["output_dim"] == 512
    assert text["chosen_by"]["rule"] == "auto" and text["chosen_by"]["shares"] == {"zh": 1.0}
    assert text["chosen_by"]["sampled"] == len(CHINESE)
    assert "use-multilingual-v3 (auto: 100% of the texts are not English" in result.summary()


def test_a_chinese_query_finds_english_items_when_queries_are_declared(tmp_path, builtin_cache, tiny_encoders):
    """--languages en,zh on an English catalog: the version is built with the multilingual encoder, and a
    Chinese query encoded with the encoder and fusion the manifest names finds its English twin."""
    from embedding import encoders as enc
    from embedding import fusion as fus

    english = [("apples", "fresh red apples"), ("bananas", "bananas"), ("milk", "whole milk"),
               ("tomatoes", "tomatoes"), ("eggs", "chicken eggs"), ("rice", "white rice"),
               ("juice", "orange juice"), ("tea", "green tea"), ("oil", "motor oil"), ("shoes", "running shoes")]
    catalog = _write_catalog(tmp_path, english)
    result = index_pipeline.run(["--catalog", catalog, "--output", str(tmp_path / "out"), "--model-cache",
                                 builtin_cache, "--image-encoder", tiny_encoders[1], "--version", "q",
                                 "--languages", "en,zh"])
    m = result.manifest
    assert m["encoders"]["text"]["handle"] == "builtin:use-multilingual-v3"
    assert m["encoders"]["text"]["chosen_by"]["languages"] == ["en", "zh"]
    encoder = enc.Encoder(m["encoders"]["text"]["handle"], enc.TEXT, model_cache=builtin_cache)
    fusion = fus.make_fusion(fus.FusionSpec(**m["fusion"]))
    index = AnnoyIndex(m["dimension"], "angular")
    shard = m["shards"][0]
    index.load(os.path.join(result.release_dir, shard["path"]))
    ids = pq.read_table(os.path.join(result.release_dir, shard["id_map"])).column("item_id").to_pylist()
    queries = dict(CHINESE)
    text = encoder.encode([queries[item_id] for item_id, _ in english])
    n = len(english)
    vectors = fusion(text, np.ones(n, np.float32), np.zeros((n, m["fusion"]["image_dim"]), np.float32),
                     np.zeros(n, np.float32))
    found = [ids[index.get_nns_by_vector(v, 1, search_k=-1)[0]] for v in vectors]
    assert found == [item_id for item_id, _ in english]


def test_an_explicit_encoder_that_misses_the_catalog_language_warns_once(tmp_path, builtin_cache, tiny_encoders,
                                                                          caplog):
    import logging

    catalog = _write_catalog(tmp_path, CHINESE)
    with caplog.at_level(logging.INFO):
        result = index_pipeline.run(["--catalog", catalog, "--output", str(tmp_path / "out"), "--model-cache",
                                     builtin_cache, "--image-encoder", tiny_encoders[1], "--version", "x",
                                     "--text-encoder", "builtin:minilm-l6-v2"])
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "pipelines.options"]
    assert warnings == ["text encoder builtin:minilm-l6-v2 does not cover zh (100% of the texts); "
                        "consider --text-encoder builtin:use-multilingual-v3 (or auto)"]
    text = result.manifest["encoders"]["text"]
    assert text["handle"] == "builtin:minilm-l6-v2" and text["chosen_by"]["rule"] == "explicit"

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

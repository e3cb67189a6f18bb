"""The index pipeline on real photos: the shared Grocery Store dataset (skipped when absent)."""

import collections
import csv
import os

import pyarrow as pa
import pyarrow.parquet as pq
from annoy import AnnoyIndex

from pipelines import index_pipeline

PER_CLASS = 2


def grocery_catalog(dataset, path):
    """Two train photos per fine class: title = product name, description = its description file."""
    classes = {}
    with open(os.path.join(dataset, "classes.csv"), newline="") as f:
        for row in csv.DictReader(f):
            desc_path = os.path.join(dataset, row["Product Description Path (str)"].lstrip("/"))
            with open(desc_path, encoding="utf-8", errors="replace") as d:
                classes[row["Class ID (int)"]] = (row["Class Name (str)"].replace("-", " "), d.read().strip())
    taken = collections.Counter()
    rows = []
    with open(os.path.join(dataset, "train.txt")) as f:
        for line in f:
            photo, fine, _ = [x.strip() for x in line.split(",")]
            if taken[fine] < PER_CLASS:
                taken[fine] += 1
                title, description = classes[fine]
                rows.append({"item_id": photo, "title": title, "description": description,
                             "image_uri": os.path.join(dataset, photo)})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def test_real_photos_index_and_find_themselves(grocery_dir, tiny_encoders, tmp_path):
    rows = grocery_catalog(grocery_dir, str(tmp_path / "grocery.parquet"))
    assert len(rows) == 81 * PER_CLASS
    result = index_pipeline.run(["--catalog", str(tmp_path / "grocery.parquet"), "--output", str(tmp_path / "out"),
                                 "--text-encoder", tiny_encoders[0], "--image-encoder", tiny_encoders[1],
                                 "--shards", "2", "--version", "grocery"])
    counts = result.manifest["counts"]
    assert (counts["read"], counts["indexed"], counts["rejected"], counts["degraded"]) == (len(rows), len(rows), 0, 0)
    for shard in result.manifest["shards"]:
        base = result.release_dir
        table = pq.read_table(os.path.join(base, shard["embeddings"])).to_pylist()
        assert all(r["image_embedding"] is not None for r in table)  # every real JPEG decoded
        index = AnnoyIndex(result.manifest["dimension"], "angular")
        index.load(os.path.join(base, shard["path"]))
        # Two photos of a product share title and description, so a photo's nearest
        # neighbour may be its twin at the same distance; itself must be in the top 2.
        for r in table:
            assert r["annoy_id"] in index.get_nns_by_vector(r["embedding"], 2, search_k=-1), r["item_id"]

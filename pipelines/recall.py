"""The recall gate: before LATEST moves, measure the sharded index against exact search and pick search_k.

A sample of the items (1 %, at most MAX_SAMPLE, at least MIN_SAMPLE when the catalog has
that many; chosen by a stable hash of item_id, so reruns measure the same items) is searched
by its own fused vector through the sharded Annoy index and exactly over the embeddings
table. ``search_k`` climbs a doubling ladder from Annoy's own default (trees x k) until
recall@10 reaches ``--min-recall``; the smallest such value goes into the manifest
(``validation``) and readers use it by default. If the ladder's end does not reach it,
the release is refused.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from pipelines import files
from schemas.errors import PublicationError

_log = logging.getLogger(__name__)

K = 10
SAMPLE_FRACTION = 0.01
MIN_SAMPLE = 100
MAX_SAMPLE = 10_000
LADDER_STEPS = 12  # trees x k x 2^0 .. 2^11


def sample_size(n_items: int) -> int:
    return min(n_items, max(MIN_SAMPLE, min(MAX_SAMPLE, int(n_items * SAMPLE_FRACTION))))


def _order(item_id: str) -> bytes:
    return hashlib.sha256(item_id.encode("utf-8")).digest()


def ladder(trees: int, k: int = K, steps: Optional[int] = None) -> list:
    return [trees * k * (2 ** i) for i in range(LADDER_STEPS if steps is None else steps)]


def _local_copy(release_dir: str, rel_paths, tmp: str) -> dict:
    """{rel: local path}: the files as they are, or copies when the release is not on a local disk."""
    out = {}
    for rel in rel_paths:
        path = files.join(release_dir, rel)
        if os.path.exists(path):
            out[rel] = path
            continue
        local = os.path.join(tmp, rel.replace("/", "__"))
        with open(local, "wb") as f:
            f.write(files.read_bytes(path))
        out[rel] = local
    return out


def measure(release_dir: str, manifest: dict, min_recall: float, k: int = K) -> dict:
    """Returns the manifest's ``validation`` or raises PublicationError with the figures."""
    import pyarrow.parquet as pq

    from search.ann import ShardSet, exact_search

    shards = manifest["shards"]
    n_items = sum(s["count"] for s in shards)
    tmp = tempfile.mkdtemp(prefix="catalog-index-recall-")
    try:
        rels = [s["path"] for s in shards] + [s["id_map"] for s in shards] + [s["embeddings"] for s in shards]
        local = _local_copy(release_dir, rels, tmp)
        id_maps = [pq.read_table(local[s["id_map"]], columns=["item_id"]).column("item_id").to_pylist()
                   for s in shards]
        ids, vectors = [], []
        for s in shards:
            table = pq.read_table(local[s["embeddings"]], columns=["item_id", "embedding"])
            ids.extend(table.column("item_id").to_pylist())
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors.append(np.asarray(flat, np.float32).reshape(table.num_rows, manifest["dimension"]))
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, manifest["dimension"]), np.float32)
        m = sample_size(n_items)
        chosen = sorted(range(len(ids)), key=lambda i: _order(ids[i]))[:m]
        queries = matrix[chosen]
        depth = min(k, n_items)
        truth = exact_search(matrix, ids, queries, depth)
        index = ShardSet([local[s["path"]] for s in shards], manifest["dimension"], id_maps)
        try:
            tried = []
            for search_k in ladder(manifest["trees"], k):
                found = index.search(queries, depth, search_k)
                recall = float(np.mean([len({h[0] for h in got} & {t[0] for t in want}) / depth
                                        for got, want in zip(found, truth)])) if m else 1.0
                self_hit = float(np.mean([bool(got) and got[0][0] == ids[i]
                                          for got, i in zip(found, chosen)])) if m else 1.0
                tried.append((search_k, recall))
                _log.info("recall gate: search_k %d -> recall@%d %.4f, self-hit@1 %.4f (%d sampled items)",
                          search_k, k, recall, self_hit, m)
                if recall >= min_recall:
                    return {"sample_size": m, "recall_at_10": round(recall, 4), "self_hit_at_1": round(self_hit, 4),
                            "search_k": search_k, "min_recall": min_recall}
        finally:
            index.close()
        figures = ", ".join(f"search_k {sk}: {r:.3f}" for sk, r in tried)
        raise PublicationError(
            f"the index does not reach --min-recall {min_recall} recall@{k} on {m} sampled items at any search_k "
            f"up to {tried[-1][0]} ({figures}); nothing was published (LATEST was not touched). Build more "
            f"trees (--trees) or lower --min-recall")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_min_recall(value: Optional[float]) -> None:
    from schemas.errors import ConfigError

    if value is None or not 0.0 <= value <= 1.0:
        raise ConfigError(f"--min-recall must be within [0, 1], got {value}")

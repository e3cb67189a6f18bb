"""The recall gate: before LATEST moves, measure the sharded index against exact search and pick search_k.

A sample of the items (1 %, at most MAX_SAMPLE, at least MIN_SAMPLE when the catalog has
that many; chosen by a stable hash of item_id, so reruns measure the same items) is searched
through the sharded Annoy index and exactly over the embeddings table, three ways: by its own
fused vector, and by the fusion of its text alone and of its image alone (what text and photo
searches send). ``search_k`` climbs a doubling ladder from Annoy's own default (trees x k) until
recall@10 reaches ``--min-recall`` for every kind of query; the smallest such value goes into the manifest
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


def _column_vectors(table, name, dim):
    """A list column of vectors -> (rows that have one, float32 [n, dim])."""
    values = table.column(name).to_pylist()
    rows = [r for r, v in enumerate(values) if v is not None]
    return rows, np.asarray([values[r] for r in rows], np.float32).reshape(len(rows), dim)


def query_sets(manifest: dict, ids: list, matrix: np.ndarray, text: tuple, image: tuple, chosen: list) -> dict:
    """The sampled items as three kinds of query: their fused vectors (the item itself), and the fusion
    of their text alone and of their image alone, which is what a text or photo search sends. Real
    queries sit much farther from their nearest item than an item from itself, and need a larger
    search_k: measured on Grocery, self-queries chose a search_k that lost 9-22 points of P@1."""
    from embedding import fusion as fus

    spec = fus.FusionSpec.from_json(manifest["fusion"])
    fuse = fus.make_fusion(spec.query_spec())  # queries go through the query tower when there is one
    sets = {"item": matrix[chosen]}
    for kind, (rows, vecs), width, other in (("text", text, spec.text_dim, spec.image_dim),
                                             ("image", image, spec.image_dim, spec.text_dim)):
        where = {r: i for i, r in enumerate(rows)}
        picked = [where[c] for c in chosen if c in where]
        if not picked:
            continue
        n = len(picked)
        present, absent = vecs[picked], np.zeros((n, other), np.float32)
        ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
        fused = (fuse(present, ones, absent, zeros) if kind == "text" else fuse(absent, zeros, present, ones))
        sets[f"{kind}_only"] = np.asarray(fused, np.float32)
    return sets


def measure(release_dir: str, manifest: dict, min_recall: float, k: int = K) -> dict:
    """Returns the manifest's ``validation`` or raises PublicationError with the figures.

    recall@10 is measured for each kind of query (query_sets); the chosen search_k is the smallest
    on the ladder at which every kind reaches ``min_recall``; ``recall_at_10`` is the lowest of them.
    """
    import pyarrow.parquet as pq

    from search.ann import ShardSet, exact_search

    shards = manifest["shards"]
    dim = manifest["dimension"]
    n_items = sum(s["count"] for s in shards)
    tmp = tempfile.mkdtemp(prefix="catalog-index-recall-")
    try:
        rels = [s["path"] for s in shards] + [s["id_map"] for s in shards] + [s["embeddings"] for s in shards]
        local = _local_copy(release_dir, rels, tmp)
        id_maps = [pq.read_table(local[s["id_map"]], columns=["item_id"]).column("item_id").to_pylist()
                   for s in shards]
        ids, fused, text_rows, text_vecs, image_rows, image_vecs = [], [], [], [], [], []
        for s in shards:
            table = pq.read_table(local[s["embeddings"]])
            offset = len(ids)
            ids.extend(table.column("item_id").to_pylist())
            fused.append(_column_vectors(table, "embedding", dim)[1])
            if "fusion" in manifest:
                for name, width, rows_out, vecs_out in (
                        ("text_embedding", manifest["fusion"]["text_dim"], text_rows, text_vecs),
                        ("image_embedding", manifest["fusion"]["image_dim"], image_rows, image_vecs)):
                    rows, vecs = _column_vectors(table, name, width)
                    rows_out.extend(offset + r for r in rows)
                    vecs_out.append(vecs)
        matrix = np.concatenate(fused) if fused else np.zeros((0, dim), np.float32)
        m = sample_size(n_items)
        chosen = sorted(range(len(ids)), key=lambda i: _order(ids[i]))[:m]
        if "fusion" in manifest:
            sets = query_sets(manifest, ids, matrix,
                              (text_rows, np.concatenate(text_vecs) if text_vecs else np.zeros((0, 1), np.float32)),
                              (image_rows, np.concatenate(image_vecs) if image_vecs else np.zeros((0, 1), np.float32)),
                              chosen)
        else:
            sets = {"item": matrix[chosen]}
        depth = min(k, n_items)
        truth = {kind: exact_search(matrix, ids, q, depth) for kind, q in sets.items()}
        index = ShardSet([local[s["path"]] for s in shards], dim, id_maps)
        try:
            tried = []
            for search_k in ladder(manifest["trees"], k):
                by_kind = {}
                for kind, q in sets.items():
                    found = index.search(q, depth, search_k)
                    by_kind[kind] = float(np.mean([len({h[0] for h in got} & {t[0] for t in want}) / depth
                                                   for got, want in zip(found, truth[kind])])) if len(q) else 1.0
                    if kind == "item":
                        self_hit = float(np.mean([bool(got) and got[0][0] == ids[i]
                                                  for got, i in zip(found, chosen)])) if m else 1.0
                recall = min(by_kind.values())
                tried.append((search_k, by_kind))
                _log.info("recall gate: search_k %d -> recall@%d %s (%d sampled items)", search_k, k,
                          ", ".join(f"{kind} {r:.4f}" for kind, r in by_kind.items()), m)
                if recall >= min_recall:
                    return {"sample_size": m, "recall_at_10": round(recall, 4), "self_hit_at_1": round(self_hit, 4),
                            "search_k": search_k, "min_recall": min_recall,
                            "recall_at_10_by_query": {kind: round(r, 4) for kind, r in by_kind.items()}}
        finally:
            index.close()
        figures = "; ".join(f"search_k {sk}: " + ", ".join(f"{kind} {r:.3f}" for kind, r in rs.items())
                            for sk, rs in tried)
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

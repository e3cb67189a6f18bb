"""Sharded Annoy search and the brute-force reference, without Beam.

``ShardSet`` opens the shards of one release (memory-mapped, read-only) and
answers a batch of queries by fanning out over the shards in a thread pool
(Annoy releases the GIL while it searches) and merging each query's per-shard
top k into one list, best first. Scores are cosine similarities: every shard
is built with Annoy's angular metric (schemas.layout.METRIC) on L2-normalised
vectors, whose distance d is sqrt(2 - 2 cos), so cos = 1 - d*d/2.

``exact_search`` is the brute-force answer the recall gate and the tests
compare with.
"""

import concurrent.futures
import os
import threading
from typing import Optional

import numpy as np
from annoy import AnnoyIndex

from schemas.layout import METRIC

Result = tuple  # (item_id, score, shard)


def _normalize_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(vectors, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query vectors must have shape [n, {dim}], got {tuple(np.shape(vectors))}")
    if not np.all(np.isfinite(q)):
        raise ValueError("query vectors must be finite")
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return np.divide(q, norm, out=np.zeros_like(q), where=norm > 0)


def _merge(per_shard: list, k: int) -> list:
    """One query's candidates from every shard -> top k by score, ties by item_id."""
    merged = [hit for hits in per_shard for hit in hits]
    merged.sort(key=lambda hit: (-hit[1], hit[0]))
    return merged[:k]


class ShardSet:
    """The Annoy shards of one release, searched together.

    ``shard_paths[i]`` is a local Annoy file, ``id_maps[i][annoy_id]`` its
    item ids, ``titles[i][annoy_id]`` (optional) their titles. Empty shards
    are allowed. Thread-safe for concurrent ``search`` calls; ``close`` must
    not race with them (the caller counts its readers: search.watcher.Watcher).
    """

    def __init__(self, shard_paths: list, dim: int, id_maps: list, titles: Optional[list] = None,
                 threads: Optional[int] = None):
        if len(id_maps) != len(shard_paths):
            raise ValueError(f"{len(shard_paths)} shards but {len(id_maps)} id maps")
        if titles is not None and len(titles) != len(shard_paths):
            raise ValueError(f"{len(shard_paths)} shards but {len(titles)} title lists")
        self.dim = int(dim)
        self.shard_paths = list(shard_paths)
        self.id_maps = [list(ids) for ids in id_maps]
        self.titles = [list(t) for t in titles] if titles is not None else None
        self._indexes = []
        try:
            for i, path in enumerate(self.shard_paths):
                index = AnnoyIndex(self.dim, METRIC)
                index.load(path)  # mmap; prefault off: pages come in as queries touch them
                self._indexes.append(index)
                if index.get_n_items() != len(self.id_maps[i]):
                    raise ValueError(f"{path}: Annoy holds {index.get_n_items()} items, "
                                     f"its id map {len(self.id_maps[i])}")
                if self.titles is not None and len(self.titles[i]) != len(self.id_maps[i]):
                    raise ValueError(f"{path}: {len(self.titles[i])} titles for {len(self.id_maps[i])} items")
        except BaseException:
            self._unload()
            raise
        self._title = {}
        if self.titles is not None:
            for ids, names in zip(self.id_maps, self.titles):
                self._title.update(zip(ids, names))
        workers = threads or min(max(1, len(self._indexes)), os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="shardset")
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return sum(len(ids) for ids in self.id_maps)

    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    def title(self, item_id: str) -> Optional[str]:
        """An item's title, when titles were given (None otherwise)."""
        return self._title.get(item_id)

    def _search_shard(self, shard: int, queries: np.ndarray, k: int, search_k: int) -> list:
        index, ids = self._indexes[shard], self.id_maps[shard]
        # search_k < 0: every leaf of every tree (n_items * n_trees candidates), so exact over the
        # shard; Annoy's own -1 (k * n_trees) misses neighbours even at 60 items.
        budget = search_k if search_k >= 0 else max(1, len(ids) * index.get_n_trees())
        out = []
        for q, live in zip(queries, np.any(queries != 0, axis=1)):
            if not live or not ids:
                out.append([])
                continue
            found, dists = index.get_nns_by_vector(q.tolist(), k, search_k=budget, include_distances=True)
            out.append([(ids[a], float(1.0 - d * d / 2.0), shard) for a, d in zip(found, dists)])
        return out

    def search(self, vectors: np.ndarray, k: int, search_k: int = -1) -> list:
        """Top ``k`` (item_id, cosine, shard) per query row, best first (ties by item_id).

        Rows are L2-normalised first; an all-zero row gets no results.
        ``search_k`` is Annoy's, per shard: how many candidates to inspect (speed against
        recall). -1 (any negative) inspects every item of every tree: exact, and O(n * trees)
        per query, so a service should pass the search_k the release was validated with.
        """
        if self._closed:
            raise RuntimeError("ShardSet is closed")
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if int(search_k) == 0:
            raise ValueError("search_k must be positive, or -1 for exact")
        queries = _normalize_queries(vectors, self.dim)
        if len(queries) == 0:
            return []
        futures = [self._pool.submit(self._search_shard, s, queries, int(k), int(search_k))
                   for s in range(len(self._indexes))]
        per_shard = [f.result() for f in futures]
        return [_merge([hits[q] for hits in per_shard], int(k)) for q in range(len(queries))]

    def _unload(self):
        for index in self._indexes:
            try:
                index.unload()
            except Exception:  # pragma: no cover - unload of a loaded index does not fail
                pass
        self._indexes = []

    def close(self) -> None:
        """Unmaps the shards; searching afterwards raises RuntimeError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._unload()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


SCORE_BYTES = 16 << 20  # queries are scored in chunks of at most this many bytes of scores (the gate: issue 9)


def exact_search(matrix: np.ndarray, ids: list, vectors: np.ndarray, k: int) -> list:
    """Brute-force cosine top ``k`` of each query over the rows of ``matrix``, best first, ties by item_id.

    Rows and queries are L2-normalised first (all-zero ones score 0).
    Returns one list of (item_id, cosine) per query. Queries are scored a chunk at a time (SCORE_BYTES):
    the recall gate's 10,000 queries against 1M items would otherwise need a 37 GiB score table.
    """
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2 or m.shape[0] != len(ids):
        raise ValueError(f"matrix must be [{len(ids)}, dim], got {m.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    norm = np.linalg.norm(m, axis=1, keepdims=True)
    m = np.divide(m, norm, out=np.zeros_like(m), where=norm > 0)
    q = _normalize_queries(vectors, m.shape[1])
    order_ids = np.asarray(ids, dtype=object)
    k = int(k)
    out = []
    step = max(1, SCORE_BYTES // (4 * max(1, m.shape[0])))
    for start in range(0, len(q), step):
        out.extend(_top_k(q[start:start + step] @ m.T, ids, order_ids, k))
    return out


def _top_k(scores: np.ndarray, ids: list, order_ids: np.ndarray, k: int) -> list:
    out = []
    for row in scores:
        # Sort by score descending, then item_id ascending (lexsort: last key first). Only the rows
        # that can be in the top k are sorted: those scoring at least the k-th best score, ties with
        # it included, so the order is that of sorting every row. Sorting all n rows by item_id per
        # query (object comparisons) made the recall gate's exact search O(n log n) per query.
        neg = -row
        candidates = None
        if k < len(neg):
            kth = np.partition(neg, k - 1)[k - 1]  # NaN sorts last in both partition and lexsort
            if not np.isnan(kth):
                candidates = np.flatnonzero(neg <= kth)
        if candidates is None:
            order = np.lexsort((order_ids, neg))[:k]
        else:
            order = candidates[np.lexsort((order_ids[candidates], neg[candidates]))[:k]]
        out.append([(ids[i], float(row[i])) for i in order])
    return out

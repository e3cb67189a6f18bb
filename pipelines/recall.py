"""The recall gate: before LATEST moves, measure the sharded index against exact search and pick search_k.

A sample of the items (1 %, at most MAX_SAMPLE, at least MIN_SAMPLE when the catalog has
that many; chosen by a stable hash of item_id, so reruns measure the same items) is searched
through the sharded Annoy index and exactly over the embeddings table, three ways: by its own
fused vector, and by the fusion of its text alone and of its image alone (what text and photo
searches send). ``search_k`` climbs a doubling ladder from Annoy's own default (trees x k) until
recall@10 reaches ``--min-recall`` for every kind of query; the smallest such value goes into the manifest
(``validation``) and readers use it by default. If the ladder's end does not reach it,
the release is refused.

The gate runs at the end of every run, incremental ones too (issue 9), so it does only the work its
answer needs: vectors come from Arrow buffers (the text and image ones only for the sampled rows),
and the climb skips searches that cannot change the outcome (``_Ladder``), with searches spread over
the CPUs. Its answer is exactly that of searching every sampled query of every kind at every step.
Its memory does not grow with the release beyond ids (issue 9): the embeddings are read READ_ROWS
rows at a time and scored BLOCK_ROWS rows at a time (exact search merges the blocks' top k), and one
shard's Annoy file is mapped at a time (``ShardByShard``).
"""

import concurrent.futures
import hashlib
import heapq
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


def _column_vectors(column, dim):
    """A list<float> column (Array or ChunkedArray) -> (rows that have a vector, float32 [n, dim]).

    Read from Arrow's flat value buffer, chunk by chunk: no Python float per value. ``to_pylist``
    made one per value (~190M for 100k items of 384-, 1,280- and 256-d vectors), the largest part of
    the gate's time. The values are the same float32 numbers either way (an inner null is NaN in both).
    """
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    rows, parts, base = [], [], 0
    for arr in chunks:
        present = np.asarray(arr.is_valid(), bool)
        lengths = np.asarray(arr.value_lengths().fill_null(0), np.int64)
        if np.any(lengths[present] != dim):
            raise ValueError(f"vectors of {sorted(set(lengths[present].tolist()) - {dim})} values "
                             f"where {dim} were expected")
        parts.append(np.asarray(arr.flatten(), np.float32).reshape(-1, dim))  # flatten(): offsets, nulls skipped
        rows.extend((base + np.flatnonzero(present)).tolist())
        base += len(arr)
    if len(parts) == 1:  # a record batch's column: Arrow's buffer itself, read-only, no copy (issue 9)
        return rows, parts[0]
    return rows, (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))


def query_sets(manifest: dict, items: np.ndarray, text: tuple, image: tuple, chosen: list) -> dict:
    """The sampled items as three kinds of query: their fused vectors (the item itself), and the fusion
    of their text alone and of their image alone, which is what a text or photo search sends. Real
    queries sit much farther from their nearest item than an item from itself, and need a larger
    search_k: measured on Grocery, self-queries chose a search_k that lost 9-22 points of P@1.

    ``items``: the fused vectors of the ``chosen`` rows, in that order; ``text``/``image``: (rows, vectors)
    of the rows that have such a vector (at least the chosen ones)."""
    from embedding import fusion as fus

    spec = fus.FusionSpec.from_json(manifest["fusion"])
    fuse = fus.make_fusion(spec.query_spec())  # queries go through the query tower when there is one
    sets = {"item": np.asarray(items, np.float32).reshape(len(chosen), -1)}
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


def _workers() -> int:
    """The CPUs this process may use: the climb runs that many Annoy searches at once."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Ladder:
    """Climbs the search_k ladder for every kind of query, searching only what can change the outcome.

    The result is the one a plain climb gives (every query of every kind searched at every step until
    the first step where every kind reaches ``min_recall``): the same step, the same figures. Two
    things make it cheaper, neither of which assumes anything about Annoy for correctness:

    * A query whose recall@k was 1.0 at the last step it was searched is not searched again until the
      figures are final: its recall is counted as 1.0, the most it can be, so each kind's mean is an
      upper bound of its true recall at this step. (Annoy's candidates for one query at a larger
      search_k are a superset of those at a smaller one, so such a query nearly always stays at 1.0;
      ties between equal vectors can make it drop, which the final search below sees.)
    * Kinds are searched lowest bound first, and a step ends as soon as one kind's upper bound falls
      below ``min_recall``: that step cannot be the chosen one, whatever the other kinds give.

    Only when every kind's upper bound reaches ``min_recall`` are the skipped queries searched at
    that step too; the figures are then the true ones, and the step is chosen if they reach it. A
    refusal fills in every (query, step) not searched, so its message has every figure, as before.
    """

    def __init__(self, index, sets: dict, truth: dict, sampled_ids: list, depth: int, steps: list):
        """``sets``/``truth``: query_sets and their exact top ``depth``; ``sampled_ids``: the item id of
        each "item" query (for self-hit@1)."""
        self.index, self.sets, self.depth, self.steps = index, sets, depth, steps
        self.sampled_ids = sampled_ids
        self.truth = {kind: [{t[0] for t in want} for want in truth[kind]] for kind in sets}
        # recall[kind][step, query]: NaN where not searched (yet).
        self.recall = {kind: np.full((len(steps), len(q)), np.nan) for kind, q in sets.items()}
        self.self_hit = np.zeros((len(steps), len(sets["item"])), bool)
        self.perfect = {kind: np.zeros(len(q), bool) for kind, q in sets.items()}
        self.searched = 0

    def _search(self, queries: np.ndarray, search_k: int) -> list:
        """index.search (which spreads the queries over its threads); results in query order."""
        self.searched += len(queries)
        return self.index.search(queries, self.depth, search_k)

    def _measure(self, kind: str, step: int, which: np.ndarray) -> None:
        """Searches the queries ``which`` (a boolean mask) of one kind at one step; records their recall."""
        rows = np.flatnonzero(which)
        if not len(rows):
            return
        found = self._search(self.sets[kind][rows], self.steps[step])
        truth = self.truth[kind]
        self.recall[kind][step, rows] = [len({h[0] for h in got} & truth[r]) / self.depth
                                         for got, r in zip(found, rows)]
        if kind == "item":
            self.self_hit[step, rows] = [bool(got) and got[0][0] == self.sampled_ids[r] for got, r in zip(found, rows)]
        self.perfect[kind][rows] = self.recall[kind][step, rows] == 1.0

    def figure(self, kind: str, step: int) -> float:
        """The kind's recall@k at a step, as a plain climb computes it (every query searched there)."""
        values = self.recall[kind][step]
        missing = np.isnan(values)
        if missing.any():
            self._measure(kind, step, missing)
        return float(np.mean(values)) if len(values) else 1.0

    def bound(self, kind: str, step: int) -> float:
        """An upper bound of the kind's recall at a step: queries at 1.0 when last searched count as 1.0."""
        values = np.where(np.isnan(self.recall[kind][step]), 1.0, self.recall[kind][step])
        return float(np.mean(values)) if len(values) else 1.0

    def climb(self, min_recall: float, k: int):
        """(the chosen step, its figures by kind, its self-hit@1), or None when no step reaches min_recall."""
        m = len(self.sampled_ids)
        bounds = {kind: 0.0 for kind in self.sets}
        for step, search_k in enumerate(self.steps):
            reached, seen = True, []
            for kind in sorted(self.sets, key=lambda kd: bounds[kd]):  # stable: ties in the sets' order
                self._measure(kind, step, ~self.perfect[kind])
                bounds[kind] = self.bound(kind, step)
                seen.append(kind)
                if bounds[kind] < min_recall:
                    reached = False
                    break
            _log.info("recall gate: search_k %d -> recall@%d at most %s%s (%d sampled items, %d searches so far)",
                      search_k, k, ", ".join(f"{kind} {bounds[kind]:.4f}" for kind in seen),
                      "" if reached else "; short of --min-recall, other kinds not searched", m, self.searched)
            if not reached:
                continue
            by_kind = {kind: self.figure(kind, step) for kind in self.sets}
            _log.info("recall gate: search_k %d -> recall@%d %s (every sampled query searched)", search_k, k,
                      ", ".join(f"{kind} {r:.4f}" for kind, r in by_kind.items()))
            if min(by_kind.values()) >= min_recall:
                self_hit = float(np.mean(self.self_hit[step])) if m else 1.0
                return step, by_kind, self_hit
            bounds = by_kind
        return None


# The gate reads the embeddings READ_ROWS rows at a time (decoding list<float> from Parquet holds several
# copies of what it decodes: ~55 MiB for one 6,250-row part at 256 + 64 + 48 floats, which stayed in RSS)
# and scores BLOCK_ROWS fused rows at a time, copied into one reused block: 16,384 rows at 256-d are
# 16 MiB, twice with exact_search's normalised copy, the same at 20k items as at 1M (issue 9: a part or
# a 65,536-row block at a time made the gate's peak grow with the catalog). Smaller blocks cost more
# Python per query (exact_search's top k per block).
READ_ROWS = 1024
BLOCK_ROWS = 1 << 14


def _batches(paths: list, columns: list):
    """(first row, RecordBatch) over the embeddings parts in order, at most READ_ROWS rows each."""
    import pyarrow.parquet as pq

    base = 0
    for path in paths:
        with pq.ParquetFile(path) as part:
            # One thread: Arrow's decode threads each kept their own malloc arena's freed memory (at 100k,
            # built-in sizes, the standalone gate's maxrss 426 -> 352 MiB); the reads are small anyway.
            for batch in part.iter_batches(batch_size=READ_ROWS, columns=columns, use_threads=False):
                yield base, batch
                base += batch.num_rows


def _fused_blocks(paths: list, dim: int):
    """(first row, float32 [rows, dim]) of the fused column over all parts, BLOCK_ROWS rows a block (the
    last may be shorter). The block's memory is reused: it is valid until the next one is asked for."""
    block = np.empty((BLOCK_ROWS, dim), np.float32)
    start = filled = 0
    for _, batch in _batches(paths, ["embedding"]):
        rows, vecs = _column_vectors(batch.column("embedding"), dim)
        if len(rows) != batch.num_rows:
            raise ValueError("the embeddings table has rows without a fused vector")
        at = 0
        while at < len(vecs):
            n = min(BLOCK_ROWS - filled, len(vecs) - at)
            block[filled:filled + n] = vecs[at:at + n]
            filled, at = filled + n, at + n
            if filled == BLOCK_ROWS:
                yield start, block
                start, filled = start + filled, 0
    if filled:
        yield start, block[:filled]


def _sampled_vectors(parts: list, names: list, picked: list, manifest: dict, dim: int) -> tuple:
    """({row: fused vector} of the picked rows, {"text_embedding"/"image_embedding": (rows, vectors)} of
    those of them that have one), read READ_ROWS rows at a time."""
    import pyarrow as pa

    items, modal = {}, {name: ([], []) for name in names[1:]}
    at = 0
    for base, batch in _batches(parts, names):
        end = base + batch.num_rows
        start = at
        while at < len(picked) and picked[at] < end:
            at += 1
        mine = [r - base for r in picked[start:at]]
        if not mine:
            continue
        take = pa.array(mine, pa.int64())
        rows, vecs = _column_vectors(batch.column("embedding").take(take), dim)
        if len(rows) != len(mine):
            raise ValueError("the embeddings table has rows without a fused vector")
        items.update((base + r, v) for r, v in zip(mine, vecs))
        for name in names[1:]:
            width = manifest["fusion"]["text_dim" if name == "text_embedding" else "image_dim"]
            rows, vecs = _column_vectors(batch.column(name).take(take), width)
            modal[name][0].extend(base + mine[r] for r in rows)
            modal[name][1].append(vecs)
    for name, (rows, vecs) in modal.items():
        modal[name] = (rows, np.concatenate(vecs) if vecs else np.zeros((0, 1), np.float32))
    return items, modal


def _exact(parts: list, ids: list, sets: dict, depth: int, dim: int) -> dict:
    """exact_search of every query set over all rows, a block of rows at a time: each block's top
    ``depth`` per query, merged by (score, item_id) as exact_search orders them (the top ``depth`` of the
    whole is among the blocks' tops). Scores are the same dot products of the same normalised rows."""
    from search.ann import exact_search

    best = {kind: [[] for _ in range(len(q))] for kind, q in sets.items()}
    for base, block in _fused_blocks(parts, dim):
        block_ids = ids[base:base + len(block)]
        for kind, q in sets.items():
            found = exact_search(block, block_ids, q, depth)
            best[kind] = [sorted(a + b, key=lambda hit: (-hit[1], hit[0]))[:depth]
                          for a, b in zip(best[kind], found)]
    return best


class ShardByShard:
    """ShardSet's answers with one shard's Annoy file mapped at a time (issue 9: mapping every shard put
    the whole index in the gate's RSS). ``search`` takes every query against shard 0, then shard 1, ...,
    each shard's queries split over ``threads``, and merges each query's hits as ShardSet does
    (search.ann._merge: by cosine, ties by item_id), so the answer is ShardSet's."""

    def __init__(self, paths: list, dim: int, id_maps: list, threads: int = 1):
        if len(paths) != len(id_maps):
            raise ValueError(f"{len(paths)} shards but {len(id_maps)} id maps")
        self.paths, self.dim, self.id_maps = list(paths), int(dim), list(id_maps)
        self.threads = max(1, int(threads))
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def search(self, vectors: np.ndarray, k: int, search_k: int = -1) -> list:
        from search.ann import ShardSet, _merge

        per_query = [[] for _ in range(len(vectors))]
        for path, ids in zip(self.paths, self.id_maps):
            with ShardSet([path], self.dim, [ids], threads=1) as one:
                if self.pool is None or len(vectors) < 2 * self.threads:
                    found = one.search(vectors, k, search_k)
                else:  # 4 pieces per thread even out slow queries
                    pieces = np.array_split(vectors, min(len(vectors), 4 * self.threads))
                    found = [hits for part in self.pool.map(lambda piece: one.search(piece, k, search_k), pieces)
                             for hits in part]
            for hits, got in zip(per_query, found):
                hits.append(got)
        return [_merge(hits, int(k)) for hits in per_query]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def measure(release_dir: str, manifest: dict, min_recall: float, k: int = K, threads: Optional[int] = None) -> dict:
    """Returns the manifest's ``validation`` or raises PublicationError with the figures.

    recall@10 is measured for each kind of query (query_sets); the chosen search_k is the smallest
    on the ladder at which every kind reaches ``min_recall``; ``recall_at_10`` is the lowest of them.
    ``threads``: how many searches run at once (default: one per CPU); the result does not depend on it.

    Cost (issue 9: the gate runs at the end of every run, incremental ones too): vectors come from
    Arrow buffers, a block at a time, the text and image vectors only of the sampled rows, one shard
    mapped at a time, and the ladder skips searches that cannot change the outcome (_Ladder). The
    result is exactly that of searching every sampled query of every kind at every step
    (tests/pipelines/test_recall.py pins it).
    """
    import pyarrow.parquet as pq

    shards = manifest["shards"]
    dim = manifest["dimension"]
    n_items = sum(s["count"] for s in shards)
    threads = _workers() if threads is None else max(1, int(threads))
    tmp = tempfile.mkdtemp(prefix="catalog-index-recall-")
    try:
        rels = [s["path"] for s in shards] + [s["id_map"] for s in shards] + [s["embeddings"] for s in shards]
        local = _local_copy(release_dir, rels, tmp)
        id_maps = [pq.read_table(local[s["id_map"]], columns=["item_id"]).column("item_id").to_pylist()
                   for s in shards]
        parts = [local[s["embeddings"]] for s in shards]
        # The ids first, to choose the sample; then the sampled rows' vectors, a few rows at a time
        # (only the columns the gate uses), so that no more than a block of the release's vectors is
        # in memory at once (issue 9: the gate held every fused vector twice, and every Annoy file).
        ids = []
        for path in parts:
            ids.extend(pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist())
        # The id maps list the parts' ids in the same order (write_shard writes both from the same rows):
        # one list of strings, not two, when they agree, as they do unless a file was tampered with.
        at = 0
        for i, shard_ids in enumerate(id_maps):
            if ids[at:at + len(shard_ids)] == shard_ids:
                id_maps[i] = ids[at:at + len(shard_ids)]
            at += len(shard_ids)
        m = sample_size(n_items)
        # heapq.nsmallest == sorted(...)[:m] without a key per item held at once
        chosen = heapq.nsmallest(m, range(len(ids)), key=lambda i: _order(ids[i]))
        names = ["embedding"] + (["text_embedding", "image_embedding"] if "fusion" in manifest else [])
        items, modal = _sampled_vectors(parts, names, sorted(chosen), manifest, dim)
        items = np.stack([items[r] for r in chosen]) if chosen else np.zeros((0, dim), np.float32)
        if "fusion" in manifest:
            sets = query_sets(manifest, items, modal["text_embedding"], modal["image_embedding"], chosen)
        else:
            sets = {"item": items}
        depth = min(k, n_items)
        truth = _exact(parts, ids, sets, depth, dim)
        steps = ladder(manifest["trees"], k)
        # One shard mapped at a time, its searches spread over ``threads`` (so that a release of one shard
        # uses every CPU too); the climb itself calls it with every query of a step at once.
        index = ShardByShard([local[s["path"]] for s in shards], dim, id_maps, threads=threads)
        climb = _Ladder(index, sets, truth, [ids[i] for i in chosen], depth, steps)
        try:
            done = climb.climb(min_recall, k)
            if done is not None:
                step, by_kind, self_hit = done
                return {"sample_size": m, "recall_at_10": round(min(by_kind.values()), 4),
                        "self_hit_at_1": round(self_hit, 4), "search_k": steps[step], "min_recall": min_recall,
                        "recall_at_10_by_query": {kind: round(r, 4) for kind, r in by_kind.items()}}
            # Refused: every figure of every step, as a plain climb has them (searches what was skipped).
            tried = [(search_k, {kind: climb.figure(kind, step) for kind in sets})
                     for step, search_k in enumerate(steps)]
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

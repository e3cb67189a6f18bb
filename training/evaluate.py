"""Held-out evaluation of a fusion: does the clicked item come up for the query the shopper made?

Each held-out click is one query (its text vector, its photo vector, or both)
and one relevant item, ranked against the whole catalog by exact cosine (no
ANN: the model is measured, not the index). A fusion is a pair of callables
with the fusion interface ``(text, text_mask, image, image_mask) -> [b, dim]``:
one for items, one for queries. The baseline is the index's own fusion used for
both (what search does today: a query is embedded as an item with only that
modality); a trained candidate brings its own query tower.

Figures per query kind (``text``: the query has a text and no photo, ``photo``:
a photo and no text, ``text_and_photo``: both) and over all: recall@k for
k in 10, 50, 100 (the clicked item is in the top k), MRR (1 / the clicked item's
rank over the whole catalog, ties counted against it), and the recall@k curve
for k = 1..100 that the report plots. Clicks are weighted equally: the
evaluation asks how often a shopper's choice is found, whatever the event.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np

from embedding.fusion import l2_normalize

RECALL_AT = (10, 50, 100)
CURVE_MAX_K = 100
KINDS = ("text", "photo", "text_and_photo")
# The figure --promote-if-better compares: recall@10 over every held-out query, text and photo together.
PRIMARY_METRIC = "recall_at_10"


class Vectors(NamedTuple):
    """Per-row modality vectors with presence masks (items or queries)."""

    text: np.ndarray  # float32 [n, text_dim], zeros where absent
    text_mask: np.ndarray  # float32 [n]
    image: np.ndarray  # float32 [n, image_dim]
    image_mask: np.ndarray  # float32 [n]

    def __len__(self):
        return len(self.text_mask)

    def rows(self, index) -> "Vectors":
        return Vectors(self.text[index], self.text_mask[index], self.image[index], self.image_mask[index])


Fusion = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def embed(fusion: Fusion, vectors: Vectors, batch_size: int = 4096) -> np.ndarray:
    """The fusion's L2-normalised output for every row, in batches."""
    out = []
    for start in range(0, len(vectors), batch_size):
        part = vectors.rows(slice(start, start + batch_size))
        out.append(np.asarray(fusion(part.text, part.text_mask, part.image, part.image_mask), np.float32))
    if not out:
        return np.zeros((0, 0), np.float32)
    return l2_normalize(np.concatenate(out))


def query_kinds(queries: Vectors) -> np.ndarray:
    """Each query's kind (see KINDS); "" for a query with neither (never produced by preprocessing)."""
    text, photo = queries.text_mask > 0, queries.image_mask > 0
    return np.where(text & photo, "text_and_photo", np.where(text, "text", np.where(photo, "photo", "")))


def ranks(query_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
          block: int = 1024) -> np.ndarray:
    """1-based rank of item ``targets[i]`` for query i over all items (ties ranked against the target)."""
    out = np.empty(len(targets), np.int64)
    for start in range(0, len(targets), block):
        q = query_vectors[start:start + block]
        scores = q @ item_vectors.T
        t = targets[start:start + block]
        target_scores = scores[np.arange(len(t)), t]
        # >= counts the target itself once: rank 1 when nothing scores higher or equal but itself.
        out[start:start + block] = (scores >= target_scores[:, None]).sum(axis=1)
    return out


def figures(rank: np.ndarray) -> dict:
    """recall@k, MRR and the recall@k curve of a set of ranks."""
    n = int(len(rank))
    if n == 0:
        return {"queries": 0}
    out = {"queries": n}
    for k in RECALL_AT:
        out[f"recall_at_{k}"] = float(np.mean(rank <= k))
    out["mrr"] = float(np.mean(1.0 / rank))
    out["recall_curve"] = [float(np.mean(rank <= k)) for k in range(1, CURVE_MAX_K + 1)]
    return out


def evaluate(item_fusion: Fusion, query_fusion: Fusion, items: Vectors, queries: Vectors,
             targets: np.ndarray) -> dict:
    """Figures of one model: ``targets[i]`` is the row in ``items`` of query i's clicked item."""
    item_vectors = embed(item_fusion, items)
    query_vectors = embed(query_fusion, queries)
    rank = ranks(query_vectors, item_vectors, np.asarray(targets, np.int64))
    kinds = query_kinds(queries)
    out = {"all": figures(rank)}
    for kind in KINDS:
        mask = kinds == kind
        if mask.any():
            out[kind] = figures(rank[mask])
    return out


def compare(candidate: dict, baseline: dict, metric: str = PRIMARY_METRIC) -> dict:
    """Whether the candidate beats the baseline on ``metric`` over all held-out queries."""
    c = candidate["all"].get(metric)
    b = baseline["all"].get(metric)
    better = c is not None and b is not None and c > b
    return {"metric": metric, "candidate": c, "baseline": b, "candidate_is_better": bool(better)}


def mean_attention(weights: np.ndarray, items: Vectors) -> dict:
    """Mean modality weights of the item tower, over items that have both modalities (the others are
    0/1 by construction) and the counts by what items have."""
    both = (items.text_mask > 0) & (items.image_mask > 0)
    out = {"items_with_both": int(both.sum()), "items_text_only": int(((items.text_mask > 0) & ~both).sum()),
           "items_image_only": int(((items.image_mask > 0) & ~both).sum())}
    if both.any():
        w = np.asarray(weights, np.float32)[both]
        out["text_weight_mean"] = float(w[:, 0].mean())
        out["image_weight_mean"] = float(w[:, 1].mean())
        out["text_weight_histogram"] = np.histogram(w[:, 0], bins=10, range=(0.0, 1.0))[0].astype(int).tolist()
    return out


def optional_float(value) -> Optional[float]:
    return None if value is None else float(value)

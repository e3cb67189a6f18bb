"""Evaluation figures on tiny cases worked by hand."""

import numpy as np
import pytest

from embedding.fusion import FusionSpec, ProjectionFusion
from training import evaluate as ev


def test_ranks_count_ties_against_the_target():
    items = np.array([[1, 0], [0, 1], [1, 0]], np.float32)  # items 0 and 2 tie for query [1, 0]
    queries = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    # query 0 -> target 2: scores 1, 0, 1 -> two items score >= 1 -> rank 2
    # query 1 -> target 1: scores 0, 1, 0 -> rank 1
    # query 2 -> target 0: scores .6, .8, .6 -> .8 and both .6 are >= .6 -> rank 3
    assert ev.ranks(queries, items, np.array([2, 1, 0])).tolist() == [2, 1, 3]


def test_figures_worked_by_hand():
    got = ev.figures(np.array([1, 2, 11, 60, 200]))
    assert got["queries"] == 5
    assert got["recall_at_10"] == pytest.approx(2 / 5)
    assert got["recall_at_50"] == pytest.approx(3 / 5)
    assert got["recall_at_100"] == pytest.approx(4 / 5)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 60 + 1 / 200) / 5)
    assert got["recall_curve"][0] == pytest.approx(1 / 5) and got["recall_curve"][1] == pytest.approx(2 / 5)
    assert len(got["recall_curve"]) == ev.CURVE_MAX_K and got["recall_curve"][-1] == pytest.approx(4 / 5)


def test_evaluate_splits_by_query_kind_and_the_baseline_equals_the_index_fusion():
    rng = np.random.default_rng(0)
    spec = FusionSpec("projection", 4, 3, 5, seed=1)
    fusion = ProjectionFusion(spec)
    m = 30
    items = ev.Vectors(rng.standard_normal((m, 4)).astype(np.float32), np.ones(m, np.float32),
                       rng.standard_normal((m, 3)).astype(np.float32), np.ones(m, np.float32))
    targets = np.array([0, 1, 2, 3])
    # queries: item 0's text, item 1's image, item 2's text + image, item 3's text
    queries = ev.Vectors(
        np.stack([items.text[0], np.zeros(4), items.text[2], items.text[3]]).astype(np.float32),
        np.array([1, 0, 1, 1], np.float32),
        np.stack([np.zeros(3), items.image[1], items.image[2], np.zeros(3)]).astype(np.float32),
        np.array([0, 1, 1, 0], np.float32))
    got = ev.evaluate(fusion, fusion, items, queries, targets)
    assert got["all"]["queries"] == 4 and got["text"]["queries"] == 2
    assert got["photo"]["queries"] == 1 and got["text_and_photo"]["queries"] == 1
    # a query with both modalities is the item's own fused vector: rank 1 exactly
    assert got["text_and_photo"]["mrr"] == 1.0
    # independent check of one rank: cosine of item 1's image-only vector with every item, by numpy
    def fuse(t, tm, i, im):
        tt = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12) * tm[:, None]
        ii = i / np.maximum(np.linalg.norm(i, axis=1, keepdims=True), 1e-12) * im[:, None]
        v = np.concatenate([tt, ii], axis=1) @ fusion.matrix
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    all_items = fuse(items.text, items.text_mask, items.image, items.image_mask)
    q = fuse(np.zeros((1, 4)), np.zeros(1), items.image[1:2], np.ones(1))[0]
    scores = all_items @ q
    rank = 1 + int((scores > scores[1] + 1e-5).sum())  # random vectors: no near-ties to worry about
    assert rank > 1 and got["photo"]["mrr"] == pytest.approx(1.0 / rank)


def test_compare_and_attention_summary():
    cand = {"all": {"recall_at_10": 0.5}}
    base = {"all": {"recall_at_10": 0.4}}
    assert ev.compare(cand, base)["candidate_is_better"] is True
    assert ev.compare(base, cand)["candidate_is_better"] is False
    assert ev.compare(base, base)["candidate_is_better"] is False  # a tie does not promote
    items = ev.Vectors(np.zeros((3, 2)), np.array([1, 1, 0], np.float32), np.zeros((3, 2)),
                       np.array([1, 0, 1], np.float32))
    out = ev.mean_attention(np.array([[0.7, 0.3], [1, 0], [0, 1]]), items)
    assert out["items_with_both"] == 1 and out["items_text_only"] == 1 and out["items_image_only"] == 1
    assert out["text_weight_mean"] == pytest.approx(0.7) and out["image_weight_mean"] == pytest.approx(0.3)

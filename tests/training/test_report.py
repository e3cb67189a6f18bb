"""report.html: self-contained, escaped, shows what evaluation.json and training.json hold."""

from training import report


def _figures(r10):
    return {"queries": 4, "recall_at_10": r10, "recall_at_50": 0.9, "recall_at_100": 1.0, "mrr": 0.25,
            "recall_curve": [r10] * 100}


def test_the_page_shows_both_models_escapes_text_and_needs_no_network():
    evaluation = {"candidate": {"all": _figures(0.75), "text": _figures(0.5)},
                  "baseline": {"all": _figures(0.25)},
                  "attention": {"items_with_both": 3, "items_text_only": 1, "items_image_only": 0,
                                "text_weight_mean": 0.6, "image_weight_mean": 0.4,
                                "text_weight_histogram": [0, 0, 0, 1, 0, 0, 2, 0, 0, 0]},
                  "decision": {"metric": "recall_at_10", "candidate": 0.75, "baseline": 0.25,
                               "candidate_is_better": True}}
    training = {"version": "m1<script>", "index": {"version": "v1"},
                "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
                "data": {"read": 10, "kept": 8, "rejected_by_reason": {"x": 2}}}
    page = report.render(evaluation, training)
    assert "<script>" not in page and "m1&lt;script&gt;" in page
    assert page.count("<svg") == 4  # recall curves for all and text, attention histogram, loss
    assert "0.7500" in page and "0.2500" in page and "better" in page
    assert "<td>read</td><td>10</td>" in page and "rejected_by_reason" not in page
    assert "src=" not in page and "href=" not in page  # nothing to fetch


def test_a_run_without_epochs_or_curves_still_renders():
    page = report.render({"candidate": {"all": {"queries": 0}}, "baseline": {"all": {"queries": 0}}}, {})
    assert "no epochs" in page and "<table>" in page

"""``report.html`` of a training run: one self-contained page (inline SVG, no script, no network).

Shows the held-out figures of the candidate and the baseline by query kind,
their recall@k curves, the item tower's modality weights, the loss per epoch
and the data counts, from the same dicts that go to ``evaluation.json`` and
``training.json``.
"""

import html
from typing import Optional, Sequence

_COLORS = {"candidate": "#1f77b4", "baseline": "#d62728"}
_W, _H, _PAD = 420, 260, 40


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return _esc(value)


def _polyline(points, x_range, y_range, color) -> str:
    (x0, x1), (y0, y1) = x_range, y_range
    sx = (_W - 2 * _PAD) / ((x1 - x0) or 1)
    sy = (_H - 2 * _PAD) / ((y1 - y0) or 1)
    coords = " ".join(f"{_PAD + (x - x0) * sx:.1f},{_H - _PAD - (y - y0) * sy:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'


def line_chart(title: str, series: dict, x_label: str, y_label: str,
               y_range: Optional[tuple] = None) -> str:
    """An SVG line chart of ``series`` {name: [(x, y), ...]}."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f"<p>{_esc(title)}: no data</p>"
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_range = (min(xs), max(xs))
    y_range = y_range or (min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
             f'aria-label="{_esc(title)}">',
             f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13">{_esc(title)}</text>',
             f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>',
             f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>',
             f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle" font-size="11">{_esc(x_label)}</text>',
             f'<text x="12" y="{_H / 2}" font-size="11" transform="rotate(-90 12 {_H / 2})" '
             f'text-anchor="middle">{_esc(y_label)}</text>']
    for value, y in ((y_range[0], _H - _PAD), (y_range[1], _PAD)):
        parts.append(f'<text x="{_PAD - 4}" y="{y + 4}" text-anchor="end" font-size="10">{value:.3g}</text>')
    for value, x in ((x_range[0], _PAD), (x_range[1], _W - _PAD)):
        parts.append(f'<text x="{x}" y="{_H - _PAD + 14}" text-anchor="middle" font-size="10">{value:.3g}</text>')
    for i, (name, values) in enumerate(series.items()):
        color = _COLORS.get(name, ["#2ca02c", "#9467bd", "#8c564b"][i % 3])
        if values:
            parts.append(_polyline(values, x_range, y_range, color))
        parts.append(f'<text x="{_W - _PAD}" y="{_PAD + 14 * i}" text-anchor="end" font-size="11" '
                     f'fill="{color}">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float]) -> str:
    """An SVG bar chart (a histogram of weights)."""
    top = max(values) if values and max(values) > 0 else 1
    width = (_W - 2 * _PAD) / max(len(values), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
             f'aria-label="{_esc(title)}">',
             f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13">{_esc(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        h = (_H - 2 * _PAD) * value / top
        x = _PAD + i * width
        parts.append(f'<rect x="{x + 1:.1f}" y="{_H - _PAD - h:.1f}" width="{width - 2:.1f}" height="{h:.1f}" '
                     f'fill="#1f77b4"><title>{_esc(label)}: {value}</title></rect>')
        parts.append(f'<text x="{x + width / 2:.1f}" y="{_H - _PAD + 12}" text-anchor="middle" '
                     f'font-size="9">{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(evaluation: dict, training: dict) -> str:
    """The page, from evaluation.json's and training.json's contents."""
    models = {name: evaluation.get(name) or {} for name in ("candidate", "baseline")}
    rows = []
    for kind in ("all", "text", "photo", "text_and_photo"):
        for name, figures in models.items():
            f = figures.get(kind)
            if f and f.get("queries"):
                rows.append([kind, name, f["queries"], f["recall_at_10"], f["recall_at_50"], f["recall_at_100"],
                             f["mrr"]])
    curves = []
    for kind in ("all", "text", "photo"):
        series = {name: list(enumerate(figures[kind]["recall_curve"], start=1))
                  for name, figures in models.items() if figures.get(kind, {}).get("recall_curve")}
        if series:
            curves.append(line_chart(f"recall@k, {kind} queries", series, "k", "recall", (0.0, 1.0)))
    history = training.get("history") or []
    loss = line_chart("training loss per epoch", {"loss": [(h["epoch"], h["loss"]) for h in history]},
                      "epoch", "loss") if history else "<p>no epochs</p>"
    attention = evaluation.get("attention") or {}
    hist = attention.get("text_weight_histogram")
    attention_html = _table(["items with both", "text only", "image only", "mean text weight", "mean image weight"],
                            [[attention.get("items_with_both"), attention.get("items_text_only"),
                              attention.get("items_image_only"), attention.get("text_weight_mean", "-"),
                              attention.get("image_weight_mean", "-")]])
    if hist:
        attention_html += bar_chart("item tower: text weight over items with both modalities",
                                    [f"{i / 10:.1f}" for i in range(len(hist))], hist)
    decision = evaluation.get("decision") or {}
    counts = training.get("data") or {}
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>catalog-index training {_esc(training.get('version', ''))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}svg{margin:.5em}"
        "</style></head><body>",
        f"<h1>Training {_esc(training.get('version', ''))}</h1>",
        f"<p>Index {_esc(training.get('index', {}).get('version', ''))}; primary metric "
        f"{_esc(decision.get('metric', ''))}: candidate {_fmt(decision.get('candidate'))} vs baseline "
        f"{_fmt(decision.get('baseline'))} &rarr; "
        f"{'better' if decision.get('candidate_is_better') else 'not better'}.</p>",
        "<h2>Held-out clicks</h2>",
        _table(["queries", "model", "n", "recall@10", "recall@50", "recall@100", "MRR"], rows),
        "".join(curves),
        "<h2>Modality attention (item tower)</h2>", attention_html,
        "<h2>Training</h2>", loss,
        _table(["what", "count"], [[k, v] for k, v in counts.items() if not isinstance(v, (dict, list))]),
        "</body></html>",
    ])

"""Answering a batch of queries (the ``catalog-index query`` command's engine), without Beam.

Queries are dicts with an ``id`` and ``text`` and/or ``image`` (a path, or raw
bytes under ``image_bytes``). They are embedded and searched in batches; each
yields one JSON-ready dict, in input order: ``{"id", "results": [{"item_id",
"score", "shard", "title"}, ...]}`` best first, or ``{"id", "error"}`` when that
query cannot be answered (empty text, missing or undecodable image); the others
go on.
"""

import json
from typing import Iterable, Iterator, Optional

from search.index import Searcher

DEFAULT_BATCH = 64


def _image_bytes(query: dict) -> Optional[bytes]:
    if query.get("image_bytes") is not None:
        return query["image_bytes"]
    path = query.get("image")
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise ValueError(f"image must be a path, not {path!r}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read image {path!r}: {e.strerror or type(e).__name__}") from None


def answer(searcher: Searcher, queries: Iterable[dict], k: int = 10, search_k: Optional[int] = None,
           batch_size: int = DEFAULT_BATCH) -> Iterator[dict]:
    """One result dict per query, in input order; embeds and searches ``batch_size`` queries at a time."""
    batch = []
    for query in queries:
        batch.append(query)
        if len(batch) >= batch_size:
            yield from _answer_batch(searcher, batch, k, search_k)
            batch = []
    if batch:
        yield from _answer_batch(searcher, batch, k, search_k)


def _answer_batch(searcher, batch, k, search_k):
    out = [{"id": q.get("id")} for q in batch]
    texts, images, live = [], [], []
    for i, query in enumerate(batch):
        if query.get("error"):
            out[i]["error"] = query["error"]
            continue
        text = query.get("text")
        try:
            if text is not None and not isinstance(text, str):
                raise ValueError(f"text must be a string, not {type(text).__name__}")
            if text is None and query.get("image") is None and query.get("image_bytes") is None:
                raise ValueError("a query needs \"text\" and/or \"image\"")
            image = _image_bytes(query)
        except ValueError as e:
            out[i]["error"] = str(e)
            continue
        texts.append(text)
        images.append(image)
        live.append(i)
    if live:
        vectors, errors = searcher.embed_each(texts, images)
        good = [j for j, e in enumerate(errors) if e is None]
        for j, error in enumerate(errors):
            if error is not None:
                out[live[j]]["error"] = str(error)
        if good:
            found = searcher.search(vectors=vectors[good], k=k, search_k=search_k)
            for j, hits in zip(good, found):
                out[live[j]]["results"] = [{"item_id": h.item_id, "score": round(h.score, 6), "shard": h.shard,
                                            "title": h.title} for h in hits]
    return out


def read_jsonl(path: str) -> Iterator[dict]:
    """Queries from a JSON-lines file; a line that is not a JSON object becomes an error entry (id: its line number)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                query = json.loads(line)
            except ValueError as e:
                yield {"id": number, "error": f"line {number} is not JSON ({e.msg})"}
                continue
            if not isinstance(query, dict):
                yield {"id": number, "error": f"line {number} is not a JSON object"}
                continue
            query.pop("error", None)
            query.pop("image_bytes", None)
            query.setdefault("id", number)
            yield query

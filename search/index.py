"""Opening a published release for search: ``open_index`` and the thread-safe ``Searcher``.

``open_index(root)`` resolves ``LATEST`` (or ``<version>/CURRENT``), verifies
the release with schemas.verification.verify_release (manifest sha256, schema,
accounting, size and sha256 of every file, row counts, no unlisted file)
before loading anything (search.release), and returns a ``Searcher`` over its
shards; queries are embedded by search.embedder. Following LATEST while
serving is search.watcher.
"""

import datetime
import threading
from typing import NamedTuple, Optional

import numpy as np

from schemas import layout
from schemas.errors import DataError
from search.ann import ShardSet
from search.embedder import QueryEmbedder, QueryError, prepare_text
from search.release import Release, open_release, read_pointer


class Hit(NamedTuple):
    item_id: str
    score: float  # cosine similarity to the query
    shard: int
    title: Optional[str]


def _now() -> str:
    return layout.format_time(datetime.datetime.now(datetime.timezone.utc))


def open_index(root: str, version: Optional[str] = None, cache_dir: Optional[str] = None) -> "Searcher":
    """Verifies and opens the release LATEST (or ``version``'s CURRENT) names under ``root``.

    ``root`` is a local folder (read in place) or ``gs://...`` (copied to ``cache_dir/<version>/<release>/``
    first; default ~/.cache/catalog-index/releases). Raises VerificationError naming the bad file.
    """
    return Searcher.from_release(open_release(root, read_pointer(root, version), cache_dir))


class Searcher:
    """One verified release, open for search. Thread-safe; ``close`` waits for the searches in flight."""

    def __init__(self, pointer: layout.Pointer, release_dir: str, manifest: dict, shards: ShardSet):
        self.pointer = pointer
        self.version = manifest["version"]
        self.release = manifest["release"]
        self.manifest = manifest
        self.release_dir = release_dir
        self.loaded_at = _now()
        validation = manifest.get("validation") or {}
        self.default_search_k = int(validation["search_k"]) if validation.get("search_k") else -1
        self.shards = shards
        self._embedder = None
        self._embedder_lock = threading.Lock()
        self._state = threading.Condition()
        self._in_flight = 0
        self._closed = False

    @classmethod
    def from_release(cls, release: Release) -> "Searcher":
        return cls(release.pointer, release.release_dir, release.manifest, release.shards)

    def __repr__(self):
        return f"Searcher({self.version}/{self.release}, {len(self.shards)} items)"

    # ----------------------------------------------------------------- reference counting

    def acquire(self) -> None:
        with self._state:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._in_flight += 1

    def release_ref(self) -> None:
        with self._state:
            self._in_flight -= 1
            self._state.notify_all()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Waits until no search is in flight, then refuses new ones and unmaps the shards. Idempotent.

        Searches that start while it waits (a caller still holding this searcher) are let through.
        """
        with self._state:
            while self._in_flight:
                self._state.wait()
            if self._closed:
                return
            self._closed = True
        self.shards.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- queries

    def embedder(self) -> QueryEmbedder:
        """The release's query encoders (loaded on first use)."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = QueryEmbedder(self.release_dir, self.manifest)
            return self._embedder

    @staticmethod
    def _columns(texts, images) -> int:
        if texts is None and images is None:
            raise ValueError("give texts, images or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return len(texts) if texts is not None else len(images)

    def embed_each(self, texts: Optional[list] = None, images: Optional[list] = None):
        """(vectors [n, dim], errors): a query that cannot be embedded gets a zero row and its error (the
        exception: QueryError, or an embedding.images ImageError whose type says what was wrong)."""
        n = self._columns(texts, images)
        embedder = self.embedder()
        ready_texts, ready_pixels, errors = [None] * n, [None] * n, [None] * n
        for i in range(n):
            try:
                ready_texts[i] = prepare_text(texts[i]) if texts is not None else None
                if images is not None and images[i] is not None:
                    ready_pixels[i] = embedder.image_input(images[i])
                if ready_texts[i] is None and ready_pixels[i] is None:
                    raise QueryError("empty query: no text and no image" if texts is None or texts[i] is None
                                     else "empty text and no image")
            except DataError as e:
                errors[i] = e
                ready_texts[i] = ready_pixels[i] = None
        good = [i for i in range(n) if errors[i] is None]
        vectors = np.zeros((n, embedder.dim), np.float32)
        if good:
            vectors[good] = embedder.vectors([ready_texts[i] for i in good], [ready_pixels[i] for i in good])
        return vectors, errors

    def embed(self, texts: Optional[list] = None, images: Optional[list] = None) -> np.ndarray:
        """Query vectors [n, dim], as the pipeline embeds an item with only these modalities.

        ``texts``: strings (None where a query has none); ``images``: raw image file bytes (None where
        a query has none). Raises QueryError for the first query that cannot be embedded.
        """
        vectors, errors = self.embed_each(texts, images)
        for i, error in enumerate(errors):
            if error is not None:
                # The same kind of error (an image too large stays ImageTooLargeError), naming the query.
                raise type(error)(f"query {i}: {error}") from None
        return vectors

    def search(self, texts: Optional[list] = None, images: Optional[list] = None,
               vectors: Optional[np.ndarray] = None, k: int = 10, search_k: Optional[int] = None) -> list:
        """Top ``k`` hits per query, best first: embeds texts/images, or searches ``vectors`` as given."""
        if vectors is not None and (texts is not None or images is not None):
            raise ValueError("give vectors, or texts/images, not both")
        self.acquire()  # before embedding: a swap must not close this searcher under a slow batch
        try:
            if vectors is None:
                vectors = self.embed(texts, images)
            found = self.shards.search(vectors, k, self.default_search_k if search_k is None else search_k)
        finally:
            self.release_ref()
        return [[Hit(item_id, score, shard, self.shards.title(item_id)) for item_id, score, shard in hits]
                for hits in found]

"""Opening a published release for search, embedding queries, and following LATEST.

``open_index(root)`` resolves ``LATEST`` (or ``<version>/CURRENT``) with
schemas.layout.Pointer, verifies the release with
schemas.verification.verify_release (manifest sha256, schema, accounting, size
and sha256 of every file, row counts, no unlisted file) before loading
anything, and returns a ``Searcher`` over its shards. A ``gs://`` root is
first copied to a local cache (``cache_dir/<version>/<release>/``), which is
what gets verified and memory-mapped; a local root is read in place.

Queries are embedded exactly as the pipeline embeds an item that has only
that modality (or both): the release's ``query_encoder`` SavedModel when the
manifest names one, else the manifest's encoders and fusion.

``Watcher`` keeps a current Searcher and swaps to the release LATEST names
when it changes; a release that fails verification is refused (one log line)
and the old one keeps serving. An old Searcher is closed only once the queries
in flight on it are done.
"""

import datetime
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from typing import NamedTuple, Optional

import numpy as np
import pyarrow.parquet as pq

from embedding import encoders as enc
from embedding import fusion as fus
from embedding import images as img
from schemas import embeddings as emb
from schemas import layout
from schemas.errors import CatalogIndexError, DataError, VerificationError, brief
from schemas.verification import LocalStorage, verify_release
from search.ann import ShardSet

_log = logging.getLogger(__name__)

# The pipeline cuts an item's text at this many characters (pipelines/transforms.MAX_TEXT_CHARS).
MAX_TEXT_CHARS = 4096
DEFAULT_BATCH_SIZE = 32
# The signatures of a release's query_encoder SavedModel, by the modalities a query has.
QUERY_SIGNATURES = {(True, False): "text", (False, True): "image", (True, True): "text_and_image"}


class Hit(NamedTuple):
    item_id: str
    score: float  # cosine similarity to the query
    shard: int
    title: Optional[str]


class QueryError(DataError):
    """One query cannot be answered (no text and no image, an undecodable image...)."""

    reason = "bad_query"


def _now() -> str:
    return layout.format_time(datetime.datetime.now(datetime.timezone.utc))


def _is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def _local(root: str) -> str:
    return root[len("file://"):] if root.startswith("file://") else root


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if _is_remote(root) else os.path.join(root, *parts)


def _remote_fs():
    """The object-store reader: tensorflow.io.gfile (gs:// and every other TF filesystem)."""
    import tensorflow as tf

    return tf.io.gfile


def _read(path: str) -> Optional[bytes]:
    """The bytes of a small file (a pointer, a manifest), or None when it does not exist."""
    if _is_remote(path):
        fs = _remote_fs()
        if not fs.exists(path):
            return None
        with fs.GFile(path, "rb") as f:
            return f.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_pointer(root: str, version: Optional[str] = None) -> layout.Pointer:
    """The pointer LATEST (or ``<version>/CURRENT``) holds; VerificationError when absent or malformed."""
    path = _join(root, *layout.pointer_file(version).split("/"))
    data = _read(path)
    if data is None:
        what = f"version {version!r} is not published" if version else "nothing is published there"
        raise VerificationError(f"{path}: missing ({what})")
    return layout.Pointer.loads(data, where=path)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "catalog-index", "releases")


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts and "\\" not in rel


def _copy_release(remote_dir: str, dest: str) -> None:
    """Copies the manifest and every file it lists to ``dest`` (a temp folder renamed into place)."""
    import json

    fs = _remote_fs()
    raw = _read(_join(remote_dir, layout.MANIFEST_FILE))
    if raw is None:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: missing or unreadable")
    try:
        listed = json.loads(raw)["files"]
        names = sorted(listed)
    except (ValueError, KeyError, TypeError) as e:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: not a manifest ({brief(e)})") from None
    bad = [n for n in names if not isinstance(n, str) or not _safe_relpath(n)]
    if bad:
        raise VerificationError(f"{_join(remote_dir, layout.MANIFEST_FILE)}: lists an unsafe path {bad[0]!r}")
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, layout.MANIFEST_FILE), "wb") as f:
            f.write(raw)
        for rel in names:
            target = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                fs.copy(_join(remote_dir, rel), target, overwrite=True)
            except Exception as e:
                raise VerificationError(f"{_join(remote_dir, rel)}: cannot be copied ({brief(e)})") from None
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # another process put the same release there first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verified_local_release(root: str, pointer: layout.Pointer, cache_dir: Optional[str]):
    """(release folder on local disk, verified manifest); raises VerificationError naming the bad file."""
    if not _is_remote(root):
        release_dir = os.path.join(_local(root), pointer.version, pointer.release)
        return release_dir, verify_release(release_dir, pointer, storage=LocalStorage).manifest
    dest = os.path.join(cache_dir or _default_cache_dir(), pointer.version, pointer.release)
    remote_dir = _join(root, pointer.version, pointer.release)
    if os.path.isdir(dest):
        try:
            return dest, verify_release(dest, pointer, storage=LocalStorage).manifest
        except VerificationError as e:  # a damaged cached copy: fetch it again
            _log.warning("cached copy of %s fails verification (%s); copying it again", pointer.path, e)
            shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _copy_release(remote_dir, dest)
    try:
        return dest, verify_release(dest, pointer, storage=LocalStorage).manifest
    except VerificationError as e:
        shutil.rmtree(dest, ignore_errors=True)  # never leave an unverified copy to be trusted later
        # Name the object in the store, not only the cached copy.
        raise VerificationError(str(e).replace(dest, remote_dir)) from None


def _load_shards(release_dir: str, manifest: dict) -> ShardSet:
    shards = sorted(manifest["shards"], key=lambda s: s["index"])
    paths, id_maps, titles = [], [], []
    for shard in shards:
        id_path = os.path.join(release_dir, shard["id_map"])
        table = pq.read_table(id_path, columns=[emb.ANNOY_ID, emb.ITEM_ID])
        if table.column(emb.ANNOY_ID).to_pylist() != list(range(table.num_rows)):
            raise VerificationError(f"{id_path}: annoy ids are not 0..{table.num_rows - 1} in order")
        ids = table.column(emb.ITEM_ID).to_pylist()
        emb_path = os.path.join(release_dir, shard["embeddings"])
        part = pq.read_table(emb_path, columns=[emb.ITEM_ID, emb.TITLE, emb.ANNOY_ID])
        by_annoy = [None] * len(ids)
        for item_id, title, annoy_id in zip(part.column(emb.ITEM_ID).to_pylist(), part.column(emb.TITLE).to_pylist(),
                                            part.column(emb.ANNOY_ID).to_pylist()):
            if not 0 <= annoy_id < len(ids) or ids[annoy_id] != item_id:
                raise VerificationError(f"{emb_path}: item {item_id!r} at annoy id {annoy_id} disagrees with the id map")
            by_annoy[annoy_id] = title
        paths.append(os.path.join(release_dir, shard["path"]))
        id_maps.append(ids)
        titles.append(by_annoy)
    try:
        return ShardSet(paths, int(manifest["dimension"]), id_maps, titles)
    except (OSError, ValueError) as e:
        raise VerificationError(f"{release_dir}: shards cannot be loaded ({brief(e)})") from None


def _open(root: str, pointer: layout.Pointer, cache_dir: Optional[str]) -> "Searcher":
    release_dir, manifest = _verified_local_release(root, pointer, cache_dir)
    return Searcher(pointer, release_dir, manifest, _load_shards(release_dir, manifest))


def open_index(root: str, version: Optional[str] = None, cache_dir: Optional[str] = None) -> "Searcher":
    """Verifies and opens the release LATEST (or ``version``'s CURRENT) names under ``root``.

    ``root`` is a local folder (read in place) or ``gs://...`` (copied to ``cache_dir/<version>/<release>/``
    first; default ~/.cache/catalog-index/releases). Raises VerificationError naming the bad file.
    """
    return _open(root, read_pointer(root, version), cache_dir)


# --------------------------------------------------------------------------- query embedding


def _prepare_text(text) -> Optional[str]:
    if text is None:
        return None
    if not isinstance(text, str):
        raise QueryError(f"text must be a string, not {type(text).__name__}")
    text = text.strip()
    return text[:MAX_TEXT_CHARS] if text else None


class _Embedder:
    """Encoders and fusion of one release: query vectors as the pipeline makes item vectors."""

    def __init__(self, release_dir: str, manifest: dict):
        self.manifest = manifest
        options = manifest.get("options") or {}
        self.max_pixels = int(options.get("max_image_pixels") or img.DEFAULT_MAX_PIXELS)
        self.batch_size = int(options.get("batch_size") or DEFAULT_BATCH_SIZE)
        self.dim = int(manifest["dimension"])
        image_spec = enc.EncoderSpec.from_json(enc.IMAGE, manifest["encoders"][enc.IMAGE])
        self.image_size = tuple(image_spec.image_size or (enc.DEFAULT_IMAGE_SIZE, enc.DEFAULT_IMAGE_SIZE))
        self._query_model = None
        self._text = self._image = self._fusion = None
        self._lock = threading.Lock()
        query_encoder = manifest.get("query_encoder")
        if query_encoder:
            rel = query_encoder.get("path") if isinstance(query_encoder, dict) else query_encoder
            self._load_query_encoder(os.path.join(release_dir, rel))
        else:
            text_spec = enc.EncoderSpec.from_json(enc.TEXT, manifest["encoders"][enc.TEXT])
            cache = os.environ.get("CATALOG_INDEX_MODEL_CACHE") or None
            self._text = enc.Encoder(text_spec.handle, enc.TEXT, model_cache=cache)
            self._image = enc.Encoder(image_spec.handle, enc.IMAGE, image_spec.image_size, model_cache=cache)
            self.image_size = self._image.image_size
            self._fusion = fus.make_fusion(fus.FusionSpec.from_json(manifest["fusion"]))

    def _load_query_encoder(self, path: str):
        from embedding.query_encoder import load_saved_model

        try:
            model = load_saved_model(path)  # one loader: it registers tensorflow-text's ops when needed
            self._signatures = {name: model.signatures[name] for name in set(QUERY_SIGNATURES.values())}
        except Exception as e:
            raise VerificationError(f"{path}: not a query encoder with signatures text, image and "
                                    f"text_and_image ({brief(e)})") from None
        self._query_model = model
        _, kwargs = self._signatures["image"].structured_input_signature
        for spec in kwargs.values():  # the image size the query encoder was exported for
            if spec.shape.rank == 4 and spec.shape[1] is not None and spec.shape[2] is not None:
                self.image_size = (int(spec.shape[1]), int(spec.shape[2]))

    def image_input(self, data) -> np.ndarray:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise QueryError(f"image must be bytes, not {type(data).__name__}")
        decoded = img.decode_image(bytes(data), max_pixels=self.max_pixels, min_size=self.image_size)
        return img.to_model_input(decoded, self.image_size)

    def _batches(self, rows):
        for start in range(0, len(rows), self.batch_size):
            yield rows[start:start + self.batch_size]

    def _encode(self, encoder, values, dim_hint=None) -> np.ndarray:
        out = [encoder.encode(list(b) if encoder.kind == enc.TEXT else np.stack(b)) for b in self._batches(values)]
        return np.concatenate(out) if out else np.zeros((0, dim_hint or 1), np.float32)

    def _call_signature(self, name, texts, pixels) -> np.ndarray:
        import tensorflow as tf

        fn = self._signatures[name]
        _, kwargs = fn.structured_input_signature
        feed = {}
        for key, spec in kwargs.items():
            if spec.dtype == tf.string:
                feed[key] = tf.constant([t.encode("utf-8") for t in texts], tf.string)
            else:
                feed[key] = tf.constant(np.asarray(pixels, np.float32))
        out = fn(**feed)
        if isinstance(out, dict):
            out = out.get(fus.OUTPUT, next(iter(out.values())) if len(out) == 1 else None)
            if out is None:
                raise QueryError(f"query encoder signature {name!r} returns no {fus.OUTPUT!r}")
        return fus.l2_normalize(np.asarray(out, np.float32))

    def vectors(self, texts: list, pixels: list) -> np.ndarray:
        """Fused vectors of queries whose text (str or None) and pixels (array or None) are ready."""
        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if self._query_model is not None:
            groups = {}
            for i, (t, p) in enumerate(zip(texts, pixels)):
                groups.setdefault(QUERY_SIGNATURES[(t is not None, p is not None)], []).append(i)
            for name, rows in groups.items():
                for batch in self._batches(rows):
                    out[batch] = self._call_signature(name, [texts[i] for i in batch], [pixels[i] for i in batch])
            return out
        text_rows = [i for i in range(n) if texts[i] is not None]
        image_rows = [i for i in range(n) if pixels[i] is not None]
        spec = self._fusion.spec
        text = np.zeros((n, spec.text_dim), np.float32)
        image = np.zeros((n, spec.image_dim), np.float32)
        text_mask = np.zeros(n, np.float32)
        image_mask = np.zeros(n, np.float32)
        if text_rows:
            text[text_rows] = self._encode(self._text, [texts[i] for i in text_rows])
            text_mask[text_rows] = 1.0
        if image_rows:
            image[image_rows] = self._encode(self._image, [pixels[i] for i in image_rows])
            image_mask[image_rows] = 1.0
        return fus.l2_normalize(self._fusion(text, text_mask, image, image_mask))


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

    def embedder(self) -> _Embedder:
        """The release's query encoders (loaded on first use)."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = _Embedder(self.release_dir, self.manifest)
            return self._embedder

    @staticmethod
    def _columns(texts, images) -> int:
        if texts is None and images is None:
            raise ValueError("give texts, images or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        return len(texts) if texts is not None else len(images)

    def embed_each(self, texts: Optional[list] = None, images: Optional[list] = None):
        """(vectors [n, dim], errors): a query that cannot be embedded gets a zero row and its error message."""
        n = self._columns(texts, images)
        embedder = self.embedder()
        ready_texts, ready_pixels, errors = [None] * n, [None] * n, [None] * n
        for i in range(n):
            try:
                ready_texts[i] = _prepare_text(texts[i]) if texts is not None else None
                if images is not None and images[i] is not None:
                    ready_pixels[i] = embedder.image_input(images[i])
                if ready_texts[i] is None and ready_pixels[i] is None:
                    raise QueryError("empty query: no text and no image" if texts is None or texts[i] is None
                                     else "empty text and no image")
            except (DataError, ValueError) as e:
                errors[i] = str(e)
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
                raise QueryError(f"query {i}: {error}")
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


# --------------------------------------------------------------------------- following LATEST


class Watcher:
    """Keeps the release LATEST (or ``version``'s CURRENT) names open, swapping when it moves.

    ``current()`` is the searcher to use now; ``search(...)`` and ``with watcher.acquire() as s:``
    hold a reference so a swap never closes a searcher under a query. A replaced searcher is closed
    once its in-flight queries are done and ``grace_seconds`` have passed (covering a caller that
    took ``current()`` just before the swap and has not started its query yet).
    """

    def __init__(self, root: str, cache_dir: Optional[str] = None, poll_seconds: float = 30.0,
                 version: Optional[str] = None, *, grace_seconds: float = 5.0):
        self.root, self.cache_dir, self.poll_seconds, self.version = root, cache_dir, poll_seconds, version
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._current = open_index(root, version, cache_dir)
        self._refused = set()
        self._retiring = []
        self._stop = threading.Event()
        self._thread = None

    def current(self) -> Searcher:
        with self._lock:
            return self._current

    @contextmanager
    def acquire(self):
        """The current searcher, held (not closed by a swap) until the block ends."""
        with self._lock:
            searcher = self._current
            searcher.acquire()
        try:
            yield searcher
        finally:
            searcher.release_ref()

    def search(self, *args, **kwargs) -> list:
        with self.acquire() as searcher:
            return searcher.search(*args, **kwargs)

    def check_now(self) -> bool:
        """Swaps to the release the pointer names now, if it is another one; returns whether it swapped."""
        with self._check_lock:
            try:
                pointer = read_pointer(self.root, self.version)
            except CatalogIndexError as e:
                _log.warning("keeping %s/%s: %s", self._current.version, self._current.release, e)
                return False
            old = self.current()
            if (pointer.version, pointer.release) == (old.version, old.release):
                return False
            key = (pointer.version, pointer.release, pointer.manifest_sha256)
            if key in self._refused:
                return False
            try:
                new = _open(self.root, pointer, self.cache_dir)
            except CatalogIndexError as e:
                self._refused.add(key)
                _log.warning("refused %s (keeping %s/%s): %s", pointer.path, old.version, old.release, e)
                return False
            if old._embedder is not None:  # warm: the first query after the swap should not load models
                try:
                    new.embedder()
                except CatalogIndexError as e:
                    self._refused.add(key)
                    new.close()
                    _log.warning("refused %s (keeping %s/%s): %s", pointer.path, old.version, old.release, e)
                    return False
            with self._lock:
                self._current = new
            _log.info("now serving %s (was %s/%s)", pointer.path, old.version, old.release)
            self._retire(old)
            return True

    def _retire(self, old: Searcher) -> None:
        def close_later():
            self._stop.wait(self.grace_seconds)
            old.close()  # waits for the queries in flight on it

        thread = threading.Thread(target=close_later, name=f"retire-{old.release}", daemon=True)
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
        thread.start()

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check_now()
            except Exception:  # pragma: no cover - keep polling whatever one check does
                _log.exception("index check failed; keeping the current release")

    def start(self) -> "Watcher":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="index-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops polling (the current searcher stays open; ``close`` closes it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        for thread in self._retiring:
            thread.join()
        self.current().close()

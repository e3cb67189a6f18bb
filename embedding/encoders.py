"""Text and image encoders: TensorFlow SavedModels loaded by TF Hub handle or path.

Encoders follow TF Hub's common signatures so real Hub models work unchanged:
a text model maps a 1-D ``tf.string`` batch to ``[batch, dim]``; an image
feature-vector model maps float32 ``[batch, height, width, 3]`` in [0, 1] to
``[batch, dim]``. Models load through ``tensorflow_hub.load`` once per process
(``_load_model``); a handle is resolved to a folder in one place
(``resolve_handle``). No Beam here: the search library encodes queries with the
same ``Encoder``; the pipeline's RunInference handler is pipelines/inference.py.
"""

import dataclasses
import logging
import threading
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from schemas.errors import EncoderError, brief
from embedding import builtin
from embedding.fingerprints import fingerprint  # moved there (Beam-free); still encoders.fingerprint

TEXT = "text"
IMAGE = "image"
KINDS = (TEXT, IMAGE)

# Texts are batched by their token count rounded up to this (Encoder.fixed_batches): wider classes waste
# more padding, narrower ones leave more batches part-filled.
TOKEN_CLASS = 8

# Used when an image model's signature leaves height/width open (None).
DEFAULT_IMAGE_SIZE = 224

# Output keys tried, in order, when a model returns a dict (TF Hub conventions).
_OUTPUT_KEYS = ("default", "outputs", "embedding", "pooled_output", "feature_vector")


_log = logging.getLogger(__name__)


def _tf():
    # TensorFlow is imported lazily so that launching, validation errors and
    # pickling DoFns do not pay for it until a model is really needed.
    import tensorflow as tf

    return tf


def resolve_handle(handle: str, model_cache: Optional[str] = None) -> str:
    """Returns the local (or gs://) directory holding the SavedModel of a handle.

    ``builtin:NAME`` handles resolve to the model cache, building the model on first use.
    """
    if builtin.is_builtin(handle):
        return builtin.ensure_built(handle, model_cache)
    import tensorflow_hub as hub

    try:
        return hub.resolve(handle)
    except Exception as e:  # hub raises a mix of ValueError, OSError, HTTP errors
        raise EncoderError(f"cannot resolve model handle {handle!r}: {brief(e)}") from e


def _single_output(result, handle):
    if isinstance(result, dict):
        for key in _OUTPUT_KEYS:
            if key in result:
                return result[key]
        if len(result) == 1:
            return next(iter(result.values()))
        raise EncoderError(
            f"model {handle!r} returns several outputs {sorted(result)}; "
            f"expected one of {list(_OUTPUT_KEYS)}"
        )
    return result


def _static_image_size(model) -> Optional[tuple]:
    """Height and width fixed by the model's serving signature, when it fixes them."""
    specs = []
    signatures = getattr(model, "signatures", None) or {}
    if "serving_default" in signatures:
        args, kwargs = signatures["serving_default"].structured_input_signature
        specs.extend(list(args) + list(kwargs.values()))
    call = getattr(model, "__call__", None)
    for fn in getattr(call, "concrete_functions", None) or []:
        args, kwargs = fn.structured_input_signature
        specs.extend(list(args) + list(kwargs.values()))
    for spec in specs:
        shape = getattr(spec, "shape", None)
        if shape is not None and shape.rank == 4:
            h, w = shape[1], shape[2]
            if h is not None and w is not None:
                return int(h), int(w)
    return None


_models = {}
_models_lock = threading.Lock()


def _load_model(handle: str, kind: str, model_cache: Optional[str] = None):
    """hub.load, once per process and handle.

    The launcher loads each model to validate it; on the DirectRunner the
    pipeline then runs in the same process and reuses that copy instead of
    loading it again (seconds, and a second copy in memory, for a large model).
    """
    with _models_lock:
        if handle not in _models:
            import tensorflow_hub as hub

            try:
                path = resolve_handle(handle, model_cache)
                try:
                    _models[handle] = hub.load(path)
                except Exception as e:
                    # Loaded only when a model needs its ops: it costs ~120 MB per process.
                    if "Op type not registered" not in str(e) or not _register_text_ops():
                        raise
                    _models[handle] = hub.load(path)
            except Exception as e:
                raise EncoderError(
                    f"cannot load {kind} encoder {handle!r}: {brief(e)}. "
                    f"Pass a TF Hub handle or a SavedModel directory."
                ) from e
        return _models[handle]


def _register_text_ops() -> bool:
    """Imports tensorflow-text; returns whether it is installed.

    Text models with tokenisation in the graph (the built-in ones, and many TF
    Hub preprocessors) use its ops, which exist only once it is imported.
    """
    try:
        import tensorflow_text  # noqa: F401
    except ImportError:
        return False
    return True


def _forget_model(handle: str) -> None:
    # TensorFlow 2.21 leaves a restored function's lock held when its inputs do
    # not match the signature (polymorphic_function.py, Function._call), so the
    # model deadlocks on its next call. A model that failed a probe is dropped.
    with _models_lock:
        _models.pop(handle, None)


class Encoder:
    """A loaded encoder: maps a batch of strings or images to float32 vectors."""

    def __init__(self, handle: str, kind: str, image_size: Optional[Sequence[int]] = None,
                 model_cache: Optional[str] = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if builtin.is_builtin(handle) and builtin.lookup(handle).kind != kind:
            raise EncoderError(f"{handle} is a built-in {builtin.lookup(handle).kind} encoder, "
                               f"not a {kind} encoder")
        self.handle = handle
        self.kind = kind
        self._forcing = {}  # token count -> filler text of exactly that many tokens (or None)
        self._model = _load_model(handle, kind, model_cache)
        if callable(self._model):
            self._fn = self._model
        elif "serving_default" in getattr(self._model, "signatures", {}):
            sig = self._model.signatures["serving_default"]
            _, kwargs = sig.structured_input_signature
            if len(kwargs) != 1:
                raise EncoderError(f"{kind} encoder {handle!r}: serving signature must take one input")
            name = next(iter(kwargs))
            self._fn = lambda x: sig(**{name: x})
        else:
            raise EncoderError(f"{kind} encoder {handle!r} is neither callable nor has a serving signature")
        self.image_size = None
        if kind == IMAGE:
            static = _static_image_size(self._model)
            if image_size is not None and static is not None and tuple(image_size) != static:
                raise EncoderError(
                    f"image encoder {handle!r} takes {static[0]}x{static[1]} images, "
                    f"not {image_size[0]}x{image_size[1]}; drop --image-size or set it to {static[0]}"
                )
            self.image_size = tuple(image_size or static or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))

    def encode(self, batch) -> np.ndarray:
        """Encodes a batch (list of str, or float32 array [b, h, w, 3]) to float32 [b, dim]."""
        tf = _tf()
        if self.kind == TEXT:
            inputs = tf.constant([s.encode("utf-8") if isinstance(s, str) else s for s in batch], tf.string)
        else:
            inputs = tf.convert_to_tensor(np.asarray(batch, dtype=np.float32))
        out = _single_output(self._fn(inputs), self.handle)
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise EncoderError(
                f"{self.kind} encoder {self.handle!r} returned shape {out.shape} for a batch of {len(batch)}; "
                f"expected [batch, dim]"
            )
        return out

    def fixed_batches(self, inputs: Sequence[Any], batch_size: int) -> Iterable[tuple[list, Any]]:
        """``inputs`` cut into model batches that each input's vector depends on alone: (indices, batch).

        ``batch`` has exactly ``batch_size`` rows; its first ``len(indices)`` are ``inputs[i]`` for i in
        ``indices``, the rest filler whose vectors are dropped. A model's float arithmetic depends on the
        shapes it runs on (the matmul kernels block by the batch's rows; a text batch pads to its longest
        text), so an item encoded beside other items in one run and different ones in the next gets a
        vector differing in the last bits (measured with MiniLM: 80 of 96 contexts). Fixed shapes make the
        vector a function of the input: incremental runs then equal full runs bit for bit.

        Images: chunks in order, zero images as filler. Texts: where the model can count its tokens (a
        ``tokenize`` function returning ``input_mask``, as the built-in MiniLM has), texts are ordered by
        length class (tokens rounded up to ``TOKEN_CLASS``) and a batch never mixes classes; one filler
        text of exactly the class's length fixes the padded length and empty texts fill the rest. Elsewhere
        only the batch size is fixed (empty texts as filler), in the order given.
        """
        n = len(inputs)
        lengths = self.token_counts(inputs) if n else None  # None for images
        if lengths is None:  # chunks in order
            for start in range(0, n, batch_size):
                chunk = list(inputs[start:start + batch_size])
                filler = np.zeros(np.shape(chunk[0]), np.float32) if self.kind == IMAGE else ""
                yield list(range(start, start + len(chunk))), chunk + [filler] * (batch_size - len(chunk))
            return
        classes = {}
        for i, length in enumerate(lengths):
            classes.setdefault(-(-length // TOKEN_CLASS) * TOKEN_CLASS, []).append(i)
        for width in sorted(classes):
            forcing = self._text_of_length(width)
            room = batch_size if forcing is None else batch_size - 1
            members = classes[width]
            if forcing is None:  # the tokenizer makes no text of that length: classes are exact lengths
                by_length = {}
                for i in members:
                    by_length.setdefault(lengths[i], []).append(i)
                groups = [by_length[k] for k in sorted(by_length)]
            else:
                groups = [members]
            for group in groups:
                for start in range(0, len(group), room):
                    chunk = group[start:start + room]
                    batch = [inputs[i] for i in chunk] + ([] if forcing is None else [forcing])
                    yield chunk, batch + [""] * (batch_size - len(batch))

    def token_counts(self, texts: Sequence[str]) -> Optional[list]:
        """Tokens per text (special tokens included) where the model has a ``tokenize`` function with
        an ``input_mask`` output; None otherwise."""
        tokenize = getattr(self._model, "tokenize", None)
        if self.kind != TEXT or not callable(tokenize):
            return None
        tf = _tf()
        try:
            out = tokenize(tf.constant([s.encode("utf-8") if isinstance(s, str) else s for s in texts], tf.string))
            mask = out["input_mask"]
        except Exception:  # pylint: disable=broad-except  (a tokenize of another convention)
            return None
        return [int(x) for x in np.asarray(mask).sum(axis=1)]

    def _text_of_length(self, tokens: int) -> Optional[str]:
        """A text the model reads as exactly ``tokens`` tokens ("a a a ..."), or None if it has none."""
        cache = self._forcing
        if tokens not in cache:
            text = None
            for words in (tokens - 2, tokens - 1, tokens, tokens - 3, tokens - 4):  # BERT's [CLS] [SEP] first
                if words < 0:
                    continue
                candidate = " ".join(["a"] * words)
                if self.token_counts([candidate]) == [tokens]:
                    text = candidate
                    break
            cache[tokens] = text
        return cache[tokens]

    def probe(self) -> int:
        """Runs one dummy input through the model and returns its output size."""
        if self.kind == TEXT:
            sample = ["catalog-index probe"]
        else:
            sample = np.zeros((1, *self.image_size, 3), np.float32)
        try:
            return int(self.encode(sample).shape[1])
        except EncoderError:
            _forget_model(self.handle)
            raise
        except Exception as e:
            _forget_model(self.handle)
            raise EncoderError(
                f"{self.kind} encoder {self.handle!r} failed on a probe input: {brief(e)}. "
                + (
                    "Text encoders must take a 1-D tf.string batch."
                    if self.kind == TEXT
                    else "Image encoders must take float32 [batch, height, width, 3] in [0, 1]."
                )
            ) from e


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What the launcher learnt about an encoder; goes into the manifest."""

    kind: str
    handle: str
    output_dim: int
    fingerprint: str
    image_size: Optional[tuple] = None

    def to_json(self) -> dict:
        out = {"handle": self.handle, "output_dim": self.output_dim, "fingerprint": self.fingerprint}
        if self.image_size is not None:
            out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_json(cls, kind: str, data: dict) -> "EncoderSpec":
        """The manifest's ``encoders.<kind>`` entry (``chosen_by`` and other notes aside)."""
        size = data.get("image_size")
        return cls(kind, data["handle"], int(data["output_dim"]), data["fingerprint"],
                   tuple(size) if size is not None else None)


def inspect_encoder(handle: str, kind: str, image_size: Optional[Sequence[int]] = None,
                    model_cache: Optional[str] = None) -> EncoderSpec:
    """Loads and probes an encoder at launch so a bad one fails before any work starts."""
    if not handle:
        raise EncoderError(f"no {kind} encoder given: pass --{kind}-encoder HANDLE_OR_PATH")
    encoder = Encoder(handle, kind, image_size, model_cache)
    dim = encoder.probe()
    return EncoderSpec(kind, handle, dim, fingerprint(resolve_handle(handle, model_cache)), encoder.image_size)

"""Tiny, real TensorFlow SavedModels for tests, the sample run and benchmarks.

No pretrained weights and no network: the encoders are deterministic feature
extractors (feature hashing for text, a pooled colour grid for images) with a
fixed, seeded ``tf.Variable`` so the SavedModels carry real variables.

They follow TF Hub's common signatures, so the project loads them exactly like
a real TF Hub model::

    model = tensorflow_hub.load(path)
    model(tf.constant(["red apple juice 1l"]))          # -> float32 [1, dim]
    model.signatures["serving_default"](inputs=...)     # -> {"default": ...}

* text: ``__call__(tf.TensorSpec([None], tf.string))`` -> float32 ``[batch, dim]``
  (TF Hub text-embedding convention).
* image: ``__call__(tf.TensorSpec([None, size, size, 3], tf.float32))`` with
  values in [0, 1] -> float32 ``[batch, dim]`` (TF Hub image feature-vector
  convention); the fixed size is the static shape of the input signature.

Both outputs are L2-normalised; an input with no features (the text "")
gives the zero vector, never NaN. Same arguments -> same outputs.
"""

import numpy as np
import tensorflow as tf

# Words weigh more than the many character trigrams of a string.
_WORD_WEIGHT = 2.0
_TRIGRAM_WEIGHT = 1.0


def _orthogonal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A seeded matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # make the decomposition unique
    return (q if rows >= cols else q.T).astype(np.float32)


def _l2_normalize(x):
    # rsqrt(max(sum_sq, eps)): an all-zero row stays zero, never NaN.
    return tf.math.l2_normalize(x, axis=1, epsilon=1e-12)


def _check_dim(name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class _TextEncoder(tf.Module):
    """Hashed bag of words + Unicode character trigrams, rotated and normalised."""

    def __init__(self, dim: int, seed: int):
        super().__init__(name="tiny_text_encoder")
        self._dim = dim
        rng = np.random.default_rng(seed)
        self.rotation = tf.Variable(_orthogonal(rng, dim, dim), trainable=False, name="rotation")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
        dim = self._dim
        lowered = tf.strings.lower(texts, encoding="utf-8")
        # Collapse runs of whitespace: whitespace alone is no feature ("  " -> zeros).
        lowered = tf.strings.strip(tf.strings.regex_replace(lowered, r"\s+", " "))
        words = tf.strings.split(lowered)  # ragged [batch, (words)]
        chars = tf.strings.unicode_split(lowered, "UTF-8", errors="replace")
        trigrams = tf.strings.ngrams(chars, 3, separator="")  # ragged [batch, (trigrams)]
        # Prefixes keep a word and a trigram with the same spelling apart.
        words = tf.ragged.map_flat_values(lambda v: tf.strings.join(["w:", v]), words)
        trigrams = tf.ragged.map_flat_values(lambda v: tf.strings.join(["t:", v]), trigrams)
        weights = tf.concat(
            [
                tf.ones_like(words, dtype=tf.float32) * _WORD_WEIGHT,
                tf.ones_like(trigrams, dtype=tf.float32) * _TRIGRAM_WEIGHT,
            ],
            axis=1,
        )
        tokens = tf.concat([words, trigrams], axis=1)

        flat = tokens.flat_values
        bucket = tf.strings.to_hash_bucket_fast(flat, dim)
        sign_bit = tf.strings.to_hash_bucket_fast(tf.strings.join([flat, "#sign"]), 2)
        sign = tf.cast(sign_bit, tf.float32) * 2.0 - 1.0
        rows = tokens.value_rowids()
        batch = tf.shape(texts, out_type=tf.int64)[0]
        summed = tf.math.unsorted_segment_sum(
            sign * weights.flat_values, rows * dim + bucket, batch * dim
        )
        features = tf.reshape(summed, [-1, dim])
        return _l2_normalize(tf.matmul(features, self.rotation))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serve(self, inputs):
        return {"default": self.__call__(inputs)}


GRID = 4  # the image is average-pooled to a GRID x GRID x 3 colour grid


class _ImageEncoder(tf.Module):
    """A 4x4 average-pooled colour grid, centred, projected and normalised."""

    def __init__(self, dim: int, seed: int):
        super().__init__(name="tiny_image_encoder")
        features = GRID * GRID * 3 + 3  # grid + per-channel contrast
        rng = np.random.default_rng(seed)
        self.projection = tf.Variable(
            _orthogonal(rng, features, dim), trainable=False, name="projection"
        )

    def _encode(self, images):
        images = tf.clip_by_value(images, 0.0, 1.0)
        grid = tf.image.resize(images, [GRID, GRID], method="area")
        grid = tf.reshape(grid, [-1, GRID * GRID * 3]) - 0.5
        contrast = tf.math.reduce_std(images, axis=[1, 2])  # [batch, 3]
        features = tf.concat([grid, contrast], axis=1)
        return _l2_normalize(tf.matmul(features, self.projection))


def _image_encoder_class(image_size: int):
    """A subclass whose signatures carry the static image size."""
    shape = [None, image_size, image_size, 3]

    class _SizedImageEncoder(_ImageEncoder):
        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
        def __call__(self, images):
            return self._encode(images)

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="inputs")])
        def serve(self, inputs):
            return {"default": self._encode(inputs)}

    return _SizedImageEncoder


def _save(module, serve_fn, export_dir: str) -> str:
    tf.saved_model.save(
        module,
        export_dir,
        signatures={"serving_default": serve_fn.get_concrete_function()},
    )
    return export_dir


def build_text_encoder(export_dir: str, dim: int = 64, seed: int = 0) -> str:
    """Writes a tiny text encoder SavedModel to export_dir; returns export_dir.

    ``hub.load(export_dir)(tf.constant([...]))`` -> float32 ``[batch, dim]``,
    L2-normalised ("" -> zeros). ``signatures["serving_default"](inputs=...)``
    -> ``{"default": [batch, dim]}``.
    """
    dim = _check_dim("dim", dim)
    module = _TextEncoder(dim, int(seed))
    return _save(module, module.serve, export_dir)


def build_image_encoder(export_dir: str, dim: int = 48, image_size: int = 32, seed: int = 0) -> str:
    """Writes a tiny image encoder SavedModel to export_dir; returns export_dir.

    Input: float32 ``[batch, image_size, image_size, 3]`` in [0, 1] (static size
    in the signature); output float32 ``[batch, dim]``, L2-normalised.
    ``signatures["serving_default"](inputs=...)`` -> ``{"default": ...}``.
    """
    dim = _check_dim("dim", dim)
    image_size = _check_dim("image_size", image_size, minimum=GRID)
    module = _image_encoder_class(image_size)(dim, int(seed))
    return _save(module, module.serve, export_dir)

"""The two towers, their training loop and their export as a fusion SavedModel.

Both towers are the same ``Tower``: the item tower is the learned fusion (an
item's text and image vectors -> one vector) and the query tower maps a query's
text vector, photo vector or both into the same space, with its own weights. The
query and item vectors come from the same encoders (the index's), so the two
towers have the same input sizes.

A tower, for a batch of rows with text ``t`` and image ``i`` (masks ``mt``, ``mi``
in {0, 1}):

    t' = l2n(t) * mt,  i' = l2n(i) * mi                  (a missing modality is a zero block)
    [a_t, a_i] = masked_softmax([t', i', mt, mi] @ K + b) (modality attention; 0 where missing)
    out = l2n(a_t * t' @ P_t + a_i * i' @ P_i)

where ``l2n`` leaves zero rows at zero. A row with both masks 0 gets zero
attention weights and a zero vector, never NaN.

Initialised from the default fusion (``init=FusionSpec(kind="projection")``),
``P_t`` and ``P_i`` are the text and image row blocks of that fusion's matrix
scaled by its weights, and ``K = 0, b = 0`` so both present modalities start at
``a = 1/2``. Then ``out = l2n((w_t t' M_t + w_i i' M_i) / 2)``, which is exactly
``ProjectionFusion`` (the 1/2 drops out in the normalisation), and a single
modality item gets ``a = 1`` and ``l2n(w t' M)``: also exactly the projection.
So an untrained tower reproduces the default fusion up to float rounding (tests
check 1e-5) for full and single-modality items alike, and training starts from
the baseline it has to beat.
"""

import math
import time
from typing import Callable, List, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from embedding import fusion
from training.loss import MASKED, retrieval_loss

ATTENTION = "attention"
WEIGHTS = "weights"


class Items(NamedTuple):
    """Each item's vectors, stored once; examples point into them by row."""

    text: np.ndarray        # float32 [m, text_dim], zeros where missing
    text_mask: np.ndarray   # float32 [m], 1 present / 0 missing
    image: np.ndarray       # float32 [m, image_dim]
    image_mask: np.ndarray  # float32 [m]


class Examples(NamedTuple):
    """One (query, clicked item) pair a row."""

    query_text: np.ndarray        # float32 [n, text_dim], zeros for a photo-only search
    query_text_mask: np.ndarray   # float32 [n]
    query_image: np.ndarray       # float32 [n, image_dim], zeros for a text-only search
    query_image_mask: np.ndarray  # float32 [n]
    item_index: np.ndarray        # int [n], row into Items
    weight: np.ndarray            # float32 [n], >= 0 (event weight)
    log_q: np.ndarray             # float32 [n], log sampling probability of the example's item


def _l2n(x):
    # x * rsqrt(max(|x|^2, 1e-12)): zero rows stay zero and, unlike x / tf.norm(x), the gradient at 0 is finite.
    return tf.math.l2_normalize(x, axis=1, epsilon=1e-12)


class Tower(tf.Module):
    """A fusion of a text vector and an image vector into one L2-normalised ``dim`` vector.

    A ``tf.Module`` rather than a ``keras.Model``: four plain variables, created
    eagerly from numpy in ``__init__`` (so the initial weights depend only on
    ``seed``/``init``, not on TensorFlow's global random state or Keras' layer
    naming), nothing to build, and ``tf.saved_model.save`` exports it with
    exactly the signatures of the fusion interface (``export_tower``) without
    Keras 3's export layer in between.

    ``init``: a ``FusionSpec`` of kind ``projection`` whose sizes match; the
    tower then starts as that fusion (module docstring) and ``seed`` is unused.
    Without it the projections are Glorot-normal from ``numpy.random.default_rng(seed)``.
    The attention layer starts at zero either way (equal weights); a linear
    layer learns from zero since its gradient does not depend on its weights.
    """

    def __init__(self, text_dim: int, image_dim: int, dim: int, *, seed: int = 0,
                 init: Optional[fusion.FusionSpec] = None, name: str = "tower"):
        super().__init__(name=name)
        if min(text_dim, image_dim, dim) < 1:
            raise ValueError(f"tower sizes must be positive, got text {text_dim}, image {image_dim}, dim {dim}")
        self.text_dim, self.image_dim, self.dim = int(text_dim), int(image_dim), int(dim)
        if init is not None:
            if init.kind != fusion.PROJECTION:
                raise ValueError(f"a tower can start only from a projection fusion, not {init.kind!r}")
            if (init.text_dim, init.image_dim, init.dim) != (self.text_dim, self.image_dim, self.dim):
                raise ValueError(
                    f"init fusion is {init.text_dim}+{init.image_dim} -> {init.dim}, "
                    f"the tower {self.text_dim}+{self.image_dim} -> {self.dim}")
            matrix = fusion.projection_matrix(self.text_dim + self.image_dim, self.dim, init.seed)
            text_p = matrix[:self.text_dim] * np.float32(init.text_weight)
            image_p = matrix[self.text_dim:] * np.float32(init.image_weight)
        else:
            rng = np.random.default_rng(seed)
            text_p = rng.standard_normal((self.text_dim, self.dim)) * math.sqrt(2.0 / (self.text_dim + self.dim))
            image_p = rng.standard_normal((self.image_dim, self.dim)) * math.sqrt(2.0 / (self.image_dim + self.dim))
        with self.name_scope:
            self.text_projection = tf.Variable(np.asarray(text_p, np.float32), name="text_projection")
            self.image_projection = tf.Variable(np.asarray(image_p, np.float32), name="image_projection")
            self.attention_kernel = tf.Variable(
                tf.zeros([self.text_dim + self.image_dim + 2, 2]), name="attention_kernel")
            self.attention_bias = tf.Variable(tf.zeros([2]), name="attention_bias")

    def _inputs(self, text, text_mask, image, image_mask):
        mt = tf.cast(tf.convert_to_tensor(text_mask, tf.float32) > 0, tf.float32)
        mi = tf.cast(tf.convert_to_tensor(image_mask, tf.float32) > 0, tf.float32)
        t = _l2n(tf.convert_to_tensor(text, tf.float32)) * mt[:, tf.newaxis]
        i = _l2n(tf.convert_to_tensor(image, tf.float32)) * mi[:, tf.newaxis]
        return t, mt, i, mi

    def _attention(self, t, mt, i, mi):
        masks = tf.stack([mt, mi], axis=1)
        logits = tf.matmul(tf.concat([t, i, masks], axis=1), self.attention_kernel) + self.attention_bias
        # Softmax over the present modalities only: a missing one gets exactly 0, both missing -> [0, 0].
        present = masks > 0
        logits = tf.where(present, logits, tf.constant(MASKED, tf.float32))
        e = tf.exp(logits - tf.reduce_max(logits, axis=1, keepdims=True)) * masks
        return tf.math.divide_no_nan(e, tf.reduce_sum(e, axis=1, keepdims=True))

    def attention(self, text, text_mask, image, image_mask) -> tf.Tensor:
        """float32 [b, 2]: the weights of (text, image); 0 for a missing modality, rows sum to 1 (or 0)."""
        return self._attention(*self._inputs(text, text_mask, image, image_mask))

    def __call__(self, text, text_mask, image, image_mask) -> tf.Tensor:
        """float32 [b, dim], L2-normalised (zero rows where both modalities are missing)."""
        t, mt, i, mi = self._inputs(text, text_mask, image, image_mask)
        a = self._attention(t, mt, i, mi)
        out = a[:, :1] * tf.matmul(t, self.text_projection) + a[:, 1:] * tf.matmul(i, self.image_projection)
        return _l2n(out)

    call = __call__


def enable_determinism(seed: int) -> None:
    """Seeds Python, numpy and TensorFlow, and turns on TensorFlow's op determinism.

    ``tf.config.experimental.enable_op_determinism`` is process-global and has
    no public way back: once ``train`` has run, every later TensorFlow op in
    the process (encoders included) runs its deterministic kernel, or raises
    ``UnimplementedError`` for the few ops that have none (mostly GPU kernels);
    tf.data pipelines become deterministic too (possibly slower), and unseeded
    random ops need the global seed set here. Calling it again is harmless (it
    sets a flag), so ``train`` calls it every time rather than trusting a
    module-level "already done" flag that a test or caller could make stale.
    ``keras.utils.set_random_seed`` (= ``tf.keras.utils.set_random_seed``) also
    reseeds Python's ``random`` and numpy's global generator.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _check(item_tower: Tower, query_tower: Tower, examples: Examples, items: Items, batch_size: int,
           epochs: int, use_logq: bool):
    if (item_tower.text_dim, item_tower.image_dim, item_tower.dim) != (
            query_tower.text_dim, query_tower.image_dim, query_tower.dim):
        raise ValueError("the item and query towers must have the same sizes")
    if item_tower is query_tower:
        raise ValueError("the item and query towers must be two towers (separate weights)")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    m = len(items.text)
    shapes = {"items.text": (items.text, (m, item_tower.text_dim)), "items.text_mask": (items.text_mask, (m,)),
              "items.image": (items.image, (m, item_tower.image_dim)), "items.image_mask": (items.image_mask, (m,))}
    n = len(examples.item_index)
    shapes.update({
        "examples.query_text": (examples.query_text, (n, item_tower.text_dim)),
        "examples.query_text_mask": (examples.query_text_mask, (n,)),
        "examples.query_image": (examples.query_image, (n, item_tower.image_dim)),
        "examples.query_image_mask": (examples.query_image_mask, (n,)),
        "examples.item_index": (examples.item_index, (n,)),
        "examples.weight": (examples.weight, (n,)), "examples.log_q": (examples.log_q, (n,))})
    for name, (array, shape) in shapes.items():
        if np.shape(array) != shape:
            raise ValueError(f"{name} has shape {np.shape(array)}, expected {shape}")
    if n < 2:
        raise ValueError(f"training needs at least 2 examples, got {n}")
    index = np.asarray(examples.item_index)
    if not np.issubdtype(index.dtype, np.integer) or index.min() < 0 or index.max() >= m:
        raise ValueError(f"examples.item_index must be integers in [0, {m})")
    weight = np.asarray(examples.weight, np.float64)
    if not np.all(np.isfinite(weight)) or weight.min() < 0:
        raise ValueError("examples.weight must be finite and >= 0")
    if use_logq:
        log_q = np.asarray(examples.log_q, np.float64)
        if not np.all(np.isfinite(log_q)) or log_q.max() > 0:
            raise ValueError("examples.log_q must be finite and <= 0 (log of a probability)")


def batches(n: int, batch_size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """One epoch's example indices: a permutation cut into batches; a last batch of 1 is dropped."""
    order = rng.permutation(n)
    out = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 2]


def train(item_tower: Tower, query_tower: Tower, examples: Examples, items: Items, *, epochs: int,
          batch_size: int, learning_rate: float, temperature: float, use_logq: bool, seed: int,
          on_epoch: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Trains both towers in place with Adam on ``retrieval_loss``; returns the history.

    Each epoch visits the examples in a new order from
    ``numpy.random.default_rng(seed)``; a last batch smaller than 2 is dropped
    (it has no negatives). Accidental hits are found by ``item_index``; the
    logQ correction uses ``examples.log_q`` when ``use_logq``.

    Deterministic on CPU for a fixed seed and fixed towers: see
    ``enable_determinism``, which this calls (process-global op determinism).

    History: one dict per epoch, ``{"epoch": 1-based, "loss": the weighted mean
    of the per-example losses of the epoch (as the weights changed during it),
    "examples": examples used, "seconds", "examples_per_s"}``, also passed to
    ``on_epoch`` as each epoch ends.
    """
    _check(item_tower, query_tower, examples, items, batch_size, epochs, use_logq)
    enable_determinism(seed)
    rng = np.random.default_rng(seed)
    text_dim, image_dim = item_tower.text_dim, item_tower.image_dim
    item_text = np.asarray(items.text, np.float32)
    item_text_mask = np.asarray(items.text_mask, np.float32)
    item_image = np.asarray(items.image, np.float32)
    item_image_mask = np.asarray(items.image_mask, np.float32)
    query_text = np.asarray(examples.query_text, np.float32)
    query_text_mask = np.asarray(examples.query_text_mask, np.float32)
    query_image = np.asarray(examples.query_image, np.float32)
    query_image_mask = np.asarray(examples.query_image_mask, np.float32)
    item_index = np.asarray(examples.item_index, np.int64)
    weight = np.asarray(examples.weight, np.float32)
    log_q = np.asarray(examples.log_q, np.float32)

    variables = list(item_tower.trainable_variables) + list(query_tower.trainable_variables)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer.build(variables)

    def spec(*shape, dtype=tf.float32):
        return tf.TensorSpec(shape, dtype)

    @tf.function(input_signature=[
        spec(None, text_dim), spec(None), spec(None, image_dim), spec(None),
        spec(None, text_dim), spec(None), spec(None, image_dim), spec(None),
        spec(None, dtype=tf.int64), spec(None), spec(None)])
    def step(qt, qtm, qi, qim, it, itm, ii, iim, ids, w, lq):
        with tf.GradientTape() as tape:
            q = query_tower(qt, qtm, qi, qim)
            v = item_tower(it, itm, ii, iim)
            loss = retrieval_loss(q, v, ids, temperature=temperature, log_q=lq if use_logq else None, weights=w)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        total, total_weight, used = 0.0, 0.0, 0
        for batch in batches(len(item_index), batch_size, rng):
            rows = item_index[batch]
            loss = step(query_text[batch], query_text_mask[batch], query_image[batch], query_image_mask[batch],
                        item_text[rows], item_text_mask[rows], item_image[rows], item_image_mask[rows],
                        rows, weight[batch], log_q[batch])
            w = float(weight[batch].sum())
            total += float(loss) * w
            total_weight += w
            used += len(batch)
        seconds = time.perf_counter() - start
        entry = {"epoch": epoch, "loss": total / total_weight if total_weight > 0 else 0.0, "examples": used,
                 "seconds": seconds, "examples_per_s": used / seconds if seconds > 0 else float("inf")}
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
    return history


def export_tower(tower: Tower, export_dir: str) -> str:
    """Saves ``tower`` as a fusion SavedModel (embedding/fusion.py's interface) plus an ``attention`` signature.

    ``serving_default``: text_embedding [None, text_dim], text_mask [None],
    image_embedding [None, image_dim], image_mask [None] ->
    {"embedding": [None, dim]}; ``attention``: the same inputs ->
    {"weights": [None, 2]} (text, image). The same for both towers: the query
    tower exported this way is what ``--fusion-model`` loads from a models
    version's ``query/`` (embedding/fusion.py). Refuses a non-empty ``export_dir``
    (nothing is overwritten); atomic publication is the caller's job.
    """
    if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir):
        raise FileExistsError(f"export directory {export_dir!r} is not empty")
    signature = [
        tf.TensorSpec([None, tower.text_dim], tf.float32, name=fusion.TEXT_EMBEDDING),
        tf.TensorSpec([None], tf.float32, name=fusion.TEXT_MASK),
        tf.TensorSpec([None, tower.image_dim], tf.float32, name=fusion.IMAGE_EMBEDDING),
        tf.TensorSpec([None], tf.float32, name=fusion.IMAGE_MASK),
    ]

    @tf.function(input_signature=signature)
    def fuse(text_embedding, text_mask, image_embedding, image_mask):
        return {fusion.OUTPUT: tower(text_embedding, text_mask, image_embedding, image_mask)}

    @tf.function(input_signature=signature)
    def attention(text_embedding, text_mask, image_embedding, image_mask):
        return {WEIGHTS: tower.attention(text_embedding, text_mask, image_embedding, image_mask)}

    module = tf.Module()
    module.tower = tower
    module.fuse = fuse
    module.attention = attention
    tf.saved_model.save(module, export_dir, signatures={"serving_default": fuse, ATTENTION: attention})
    return export_dir

"""The retrieval loss: in-batch sampled softmax with temperature, logQ correction and accidental-hit removal.

Written here rather than taken from tensorflow-recommenders, which needs the
legacy Keras 2 (``TF_USE_LEGACY_KERAS``) that the rest of the project does not use.

For a batch of ``b`` (query, item) pairs, row ``i`` of ``query`` and row ``i``
of ``items`` are a clicked pair; every other item of the batch serves as a
negative for query ``i``:

    logits[i, j] = query[i] . items[j] / temperature          (1)
                   - log_q[j]                                  (2, optional)
    logits[i, j] = MASKED  where item_ids[j] == item_ids[i] and j != i   (3, optional)
    loss_i       = -log softmax(logits[i])[i]
    loss         = sum_i w_i loss_i / sum_i w_i

(2) is the logQ correction (Yi et al., RecSys 2019): in-batch negatives are
sampled in proportion to popularity, so popular items are over-represented as
negatives and the model learns to push them down too hard; subtracting the log of
each column's sampling probability undoes that. ``log_q <= 0``, so in absolute
terms every logit goes up by ``-log_q[j]``; what matters to the softmax is the
difference between columns: a rare item's logit goes up more than a popular
one's, i.e. a popular item's logit goes down relative to the rest (by
``log(p_popular / p_rare)`` against a rare item). A uniform ``log_q`` changes nothing.
It is applied to every column, the positive included, as in the paper and in
tensorflow-recommenders.

(3) removes accidental hits: when the same item is in the batch twice, the copy
in another row is not a negative for this row's query (it is the same item), so
its logit is masked. ``MASKED`` is a large negative number, not ``-inf``, so the
softmax and its gradient stay finite; ``exp(MASKED - max)`` underflows to exactly
0 in float32, so a masked column contributes nothing to the loss or the gradient.
The diagonal (the positive) is never masked.
"""

import tensorflow as tf

MASKED = -1e9


def corrected_logits(query, items, item_ids, *, temperature: float = 0.05, log_q=None,
                     remove_accidental_hits: bool = True) -> tf.Tensor:
    """The [b, b] logits of steps (1)-(3) in the module docstring.

    query, items: float32 [b, d], already L2-normalised. item_ids: int64 or
    string [b], the item of each row (only compared for equality). log_q:
    float32 [b] or None, log of the sampling probability of the item in each
    column.
    """
    query = tf.convert_to_tensor(query, tf.float32)
    items = tf.convert_to_tensor(items, tf.float32)
    logits = tf.matmul(query, items, transpose_b=True) / tf.cast(temperature, tf.float32)
    if log_q is not None:
        logits = logits - tf.convert_to_tensor(log_q, tf.float32)[tf.newaxis, :]
    if remove_accidental_hits:
        ids = tf.convert_to_tensor(item_ids)
        same = tf.equal(ids[:, tf.newaxis], ids[tf.newaxis, :])
        off_diagonal = tf.logical_not(tf.cast(tf.eye(tf.shape(logits)[0]), tf.bool))
        logits = tf.where(tf.logical_and(same, off_diagonal), tf.constant(MASKED, tf.float32), logits)
    return logits


def per_example_loss(query, items, item_ids, *, temperature: float = 0.05, log_q=None,
                     remove_accidental_hits: bool = True) -> tf.Tensor:
    """float32 [b]: the softmax cross-entropy of each row against its own column."""
    logits = corrected_logits(query, items, item_ids, temperature=temperature, log_q=log_q,
                              remove_accidental_hits=remove_accidental_hits)
    labels = tf.range(tf.shape(logits)[0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def retrieval_loss(query, items, item_ids, *, temperature: float = 0.05, log_q=None, weights=None,
                   remove_accidental_hits: bool = True) -> tf.Tensor:
    """Scalar float32: the weighted mean over rows of ``per_example_loss``.

    weights: float32 [b] or None (all 1). The mean is ``sum(w * l) / sum(w)``;
    a batch whose weights are all 0 gives 0, not NaN. Pure TF ops: works
    eagerly and inside ``tf.function``.
    """
    losses = per_example_loss(query, items, item_ids, temperature=temperature, log_q=log_q,
                              remove_accidental_hits=remove_accidental_hits)
    if weights is None:
        return tf.reduce_mean(losses)
    weights = tf.convert_to_tensor(weights, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(weights * losses), tf.reduce_sum(weights))

"""The retrieval loss on worked tiny examples; every expected number is computed by hand below, in plain math."""

import math

import numpy as np
import pytest
import tensorflow as tf

from training.loss import MASKED, corrected_logits, per_example_loss, retrieval_loss


def ce(row, label):
    """Softmax cross-entropy of one row of logits against column ``label``: -x_label + log sum exp(x)."""
    return -row[label] + math.log(sum(math.exp(x) for x in row))


# Example B: b = 3, d = 2 (all vectors unit length).
Q = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
V = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
IDS = [10, 11, 12]
# Q @ V^T by hand:
#   row 0: (1,0).(0.8,0.6)=0.8   (1,0).(0,1)=0     (1,0).(1,0)=1
#   row 1: (0,1).(0.8,0.6)=0.6   (0,1).(0,1)=1     (0,1).(1,0)=0
#   row 2: .6*.8+.8*.6=0.96      .8                .6
DOTS = [[0.8, 0.0, 1.0], [0.6, 1.0, 0.0], [0.96, 0.8, 0.6]]


def test_plain_loss_temperature_1_b2():
    # b = 2: q0=(1,0), q1=(0,1); v0=(0.6,0.8), v1=(0.8,0.6) -> logits [[0.6, 0.8], [0.8, 0.6]].
    # row 0: positive 0.6, negative 0.8 -> log(1 + e^(0.8-0.6)) = log(1 + e^0.2); row 1: same numbers.
    expected = math.log(1 + math.exp(0.2))  # 0.7981...
    got = retrieval_loss([[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]], tf.constant([1, 2], tf.int64),
                         temperature=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.798139, abs=1e-6)


def test_plain_loss_temperature_half_b3():
    # Temperature 0.5 doubles every logit.
    logits = [[1.6, 0.0, 2.0], [1.2, 2.0, 0.0], [1.92, 1.6, 1.2]]
    np.testing.assert_allclose(corrected_logits(Q, V, IDS, temperature=0.5).numpy(), logits, rtol=1e-6)
    l0 = -1.6 + math.log(math.exp(1.6) + math.exp(0.0) + math.exp(2.0))
    l1 = -2.0 + math.log(math.exp(1.2) + math.exp(2.0) + math.exp(0.0))
    l2 = -1.2 + math.log(math.exp(1.92) + math.exp(1.6) + math.exp(1.2))
    np.testing.assert_allclose(per_example_loss(Q, V, IDS, temperature=0.5).numpy(), [l0, l1, l2], rtol=1e-6)
    assert float(retrieval_loss(Q, V, IDS, temperature=0.5)) == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)
    # Row 2's positive (0.6) is its smallest dot, so it has the largest loss.
    assert l2 > l0 and l2 > l1


def test_logq_correction_by_hand():
    # Column 0 is a popular item (sampling probability 0.5), column 1 rare (0.1), column 2 in between (0.4).
    p = [0.5, 0.1, 0.4]
    log_q = [math.log(x) for x in p]
    plain = corrected_logits(Q, V, IDS, temperature=1.0).numpy()
    got = corrected_logits(Q, V, IDS, temperature=1.0, log_q=log_q).numpy()
    # logits[:, j] - log(p_j):  -log 0.5 = 0.6931, -log 0.1 = 2.3026, -log 0.4 = 0.9163
    expected = [[DOTS[i][j] - math.log(p[j]) for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Sign: the popular column goes down relative to the rare one, by log(0.5 / 0.1) = log 5 = 1.609.
    shift = (got[:, 0] - got[:, 1]) - (plain[:, 0] - plain[:, 1])
    np.testing.assert_allclose(shift, [-math.log(5)] * 3, rtol=1e-6)
    # The loss by hand. Row 0 (positive: column 0, the popular item) gets worse: its positive loses ground.
    l0 = ce([0.8 - math.log(0.5), 0.0 - math.log(0.1), 1.0 - math.log(0.4)], 0)
    l1 = ce([0.6 - math.log(0.5), 1.0 - math.log(0.1), 0.0 - math.log(0.4)], 1)
    l2 = ce([0.96 - math.log(0.5), 0.8 - math.log(0.1), 0.6 - math.log(0.4)], 2)
    np.testing.assert_allclose(per_example_loss(Q, V, IDS, temperature=1.0, log_q=log_q).numpy(), [l0, l1, l2],
                               rtol=1e-6)
    assert float(retrieval_loss(Q, V, IDS, temperature=1.0, log_q=log_q)) == pytest.approx((l0 + l1 + l2) / 3,
                                                                                         rel=1e-6)
    assert l0 > ce(DOTS[0], 0)          # popular positive: loss up
    assert l1 < ce(DOTS[1], 1)          # rare positive: loss down
    # A uniform sampling probability changes nothing (softmax is shift-invariant).
    uniform = retrieval_loss(Q, V, IDS, temperature=1.0, log_q=[math.log(1 / 3)] * 3)
    assert float(uniform) == pytest.approx(float(retrieval_loss(Q, V, IDS, temperature=1.0)), rel=1e-6)


@pytest.mark.parametrize("ids", [tf.constant([7, 3, 7], tf.int64), tf.constant(["a", "b", "a"])])
def test_accidental_hits_are_removed(ids):
    # Rows 0 and 2 clicked the same item (id 7 / "a"), so v0 == v2.
    q = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    v = [[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]]
    # dots: row 0: [0.8, 0, 0.8]; row 1: [0.6, 1, 0.6]; row 2: [0.96, 0.8, 0.96]
    logits = corrected_logits(q, v, ids, temperature=1.0).numpy()
    assert logits[0, 2] == MASKED and logits[2, 0] == MASKED
    np.testing.assert_allclose(logits[0, :2], [0.8, 0.0], rtol=1e-6)
    np.testing.assert_allclose(logits[1], [0.6, 1.0, 0.6], rtol=1e-6)   # id 3 is alone: nothing masked
    np.testing.assert_allclose(logits[2, 1:], [0.8, 0.96], rtol=1e-6)  # the diagonal is never masked
    # Loss = the loss with the duplicate's column removed from that row:
    l0 = -0.8 + math.log(math.exp(0.8) + math.exp(0.0))            # row 0 without column 2
    l1 = -1.0 + math.log(math.exp(0.6) + math.exp(1.0) + math.exp(0.6))
    l2 = -0.96 + math.log(math.exp(0.8) + math.exp(0.96))          # row 2 without column 0
    np.testing.assert_allclose(per_example_loss(q, v, ids, temperature=1.0).numpy(), [l0, l1, l2], rtol=1e-6)
    # Without removal the duplicate counts as a negative as strong as the positive: a larger loss.
    kept = per_example_loss(q, v, ids, temperature=1.0, remove_accidental_hits=False).numpy()
    k0 = -0.8 + math.log(2 * math.exp(0.8) + math.exp(0.0))
    np.testing.assert_allclose(kept[0], k0, rtol=1e-6)
    assert kept[0] > l0 and kept[2] > l2


def test_weighted_mean():
    l = [ce([1.6, 0.0, 2.0], 0), ce([1.2, 2.0, 0.0], 1), ce([1.92, 1.6, 1.2], 2)]   # temperature 0.5
    # sum(w) = 4 differs from b = 3, so dividing by b instead of sum(w) fails.
    got = retrieval_loss(Q, V, IDS, temperature=0.5, weights=[3.0, 1.0, 0.0])
    assert float(got) == pytest.approx((3 * l[0] + 1 * l[1] + 0 * l[2]) / 4, rel=1e-6)
    assert float(retrieval_loss(Q, V, IDS, temperature=0.5, weights=[1.0, 1.0, 1.0])) == pytest.approx(
        sum(l) / 3, rel=1e-6)
    assert float(retrieval_loss(Q, V, IDS, temperature=0.5, weights=[0.0, 0.0, 0.0])) == 0.0


def test_inside_tf_function_with_finite_gradients():
    q = tf.Variable([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    v = tf.constant([[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.float32)])
    def loss_and_grad(ids, log_q):
        with tf.GradientTape() as tape:
            loss = retrieval_loss(q, v, ids, temperature=0.05, log_q=log_q, weights=tf.ones([3]))
        return loss, tape.gradient(loss, q)

    loss, grad = loss_and_grad(tf.constant(["a", "b", "a"]), tf.math.log(tf.constant([0.5, 0.1, 0.5])))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad.numpy()))
    # The masked duplicate contributes no gradient: row 0's gradient only sees columns 0 and 1.
    # d l0 / d q0 = (softmax - onehot) @ v / T over the two remaining columns.
    z = [0.8 / 0.05 - math.log(0.5), 0.0 / 0.05 - math.log(0.1)]
    s1 = math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1]))
    g0 = [((1 - s1) - 1) * 0.8 / 0.05 + s1 * 0.0 / 0.05, ((1 - s1) - 1) * 0.6 / 0.05 + s1 * 1.0 / 0.05]
    np.testing.assert_allclose(grad.numpy()[0], [x / 3 for x in g0], rtol=1e-4, atol=1e-6)

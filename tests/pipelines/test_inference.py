"""RunInference's model handler around the Beam-free encoders."""

import numpy as np

from embedding import encoders as enc
from pipelines import inference


def test_model_handler_encodes_batches_one_vector_per_example(tiny_encoders):
    handler = inference.EncoderModelHandler(tiny_encoders[0], enc.TEXT, max_batch_size=4)
    model = handler.load_model()
    out = handler.run_inference(["red apple", "green tea", "blue jeans"], model)
    assert len(out) == 3 and out[0].shape == (64,) and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], model.encode(["red apple"])[0], atol=1e-6)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}

    ih = inference.EncoderModelHandler(tiny_encoders[1], enc.IMAGE, image_size=(32, 32))
    images = [np.random.default_rng(s).random((32, 32, 3), dtype=np.float32) for s in range(2)]
    vecs = ih.run_inference(images, ih.load_model())
    assert [v.shape for v in vecs] == [(48,), (48,)]
    assert ih.get_num_bytes(images) == 2 * 32 * 32 * 3 * 4


def test_whole_batches_encodes_each_example_in_fixed_size_model_batches(tiny_encoders):
    """One example is a list of inputs: one list of vectors per example, each input encoded in a model
    batch of exactly batch_size rows (zero images as filler), so its vector does not depend on the
    list it came in."""
    inner = inference.EncoderModelHandler(tiny_encoders[1], enc.IMAGE, image_size=(32, 32))
    handler = inference.WholeBatches(inner, batch_size=4)
    model = handler.load_model()
    rng = np.random.default_rng(7)
    first = [rng.random((32, 32, 3), dtype=np.float32) for _ in range(3)]
    second = [rng.random((32, 32, 3), dtype=np.float32) for _ in range(5)]
    out = handler.run_inference([first, second], model)
    assert [len(v) for v in out] == [3, 5]
    zero = np.zeros((32, 32, 3), np.float32)
    np.testing.assert_array_equal(np.stack(out[0]), model.encode(np.stack(first + [zero]))[:3])
    np.testing.assert_array_equal(np.stack(out[1][:4]), model.encode(np.stack(second[:4])))
    np.testing.assert_array_equal(np.stack(out[1][4:]), model.encode(np.stack(second[4:] + [zero] * 3))[:1])
    # The same image in another list, at another place: the same bits.
    again = handler.run_inference([[second[1], first[0]]], model)[0]
    np.testing.assert_array_equal(again[0], out[1][1])
    np.testing.assert_array_equal(again[1], out[0][0])
    assert handler.get_num_bytes([first, second]) == 8 * 32 * 32 * 3 * 4
    assert handler.get_metrics_namespace() == inner.get_metrics_namespace()


def test_whole_batches_gives_empty_lists_nothing_and_a_failing_batch_its_failure(tiny_encoders):
    """An empty list is not encoded; inputs of a model batch the encoder raises on come back as
    BatchFailure in place of their vectors, the other batches of the same call encoded as usual."""
    inner = inference.EncoderModelHandler(tiny_encoders[1], enc.IMAGE, image_size=(32, 32))
    handler = inference.WholeBatches(inner, batch_size=2)
    model = handler.load_model()
    good = [np.full((32, 32, 3), 0.5, np.float32)]
    wrong_shape = [np.zeros((7, 7, 3), np.float32)]
    out = handler.run_inference([[], wrong_shape, good, good + wrong_shape + good], model)
    assert out[0] == []
    assert isinstance(out[1][0], inference.BatchFailure) and isinstance(out[1][0].error, Exception)
    assert out[1][0].inputs == 1
    np.testing.assert_array_equal(out[2][0], model.encode(np.stack(good + [np.zeros((32, 32, 3), np.float32)]))[0])
    # The mixed list: its first model batch (good, wrong) fails, the second (good + filler) does not.
    assert [type(v).__name__ for v in out[3]] == ["BatchFailure", "BatchFailure", "ndarray"]
    assert out[3][0].inputs == 2
    np.testing.assert_array_equal(out[3][2], out[2][0])


def test_a_builtin_model_on_a_worker_must_be_the_one_the_launcher_inspected(builtin_cache):
    """A built-in handle resolves in each machine's own cache (on Dataflow, the one baked into the worker image):
    the handler checks the worker's copy against the fingerprint the launcher recorded."""
    import pytest

    from schemas.errors import EncoderError

    handle = "builtin:efficientnet-lite0"
    inspected = enc.inspect_encoder(handle, enc.IMAGE, model_cache=builtin_cache)  # what the launcher does
    loaded = inference.EncoderModelHandler(handle, enc.IMAGE, model_cache=builtin_cache,
                                 fingerprint=inspected.fingerprint).load_model()
    assert loaded.probe() == 1280
    other = "sha256:" + "0" * 64  # a worker image built from another release
    with pytest.raises(EncoderError, match="is not the model the launcher inspected .*rebuild and push both"):
        inference.EncoderModelHandler(handle, enc.IMAGE, model_cache=builtin_cache, fingerprint=other).load_model()

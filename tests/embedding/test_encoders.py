import os

import numpy as np
import pytest

from catalog_index.errors import EncoderError
from embedding import encoders as enc


def test_inspect_tiny_encoders(tiny_encoders):
    text, image = tiny_encoders
    t = enc.inspect_encoder(text, enc.TEXT)
    i = enc.inspect_encoder(image, enc.IMAGE)
    assert (t.output_dim, t.image_size) == (64, None)
    assert (i.output_dim, i.image_size) == (48, (32, 32))  # read from the model's signature
    assert t.fingerprint == enc.inspect_encoder(text, enc.TEXT).fingerprint
    assert t.fingerprint != i.fingerprint
    assert i.to_json()["image_size"] == [32, 32]


def test_image_size_conflicting_with_signature_fails(tiny_encoders):
    with pytest.raises(EncoderError, match="takes 32x32 images, not 64x64"):
        enc.inspect_encoder(tiny_encoders[1], enc.IMAGE, (64, 64))


def test_unloadable_encoder_fails_clearly(tmp_path):
    with pytest.raises(EncoderError, match="cannot load text encoder"):
        enc.inspect_encoder(str(tmp_path / "nope"), enc.TEXT)
    with pytest.raises(EncoderError, match="no image encoder given: pass --image-encoder"):
        enc.inspect_encoder(None, enc.IMAGE)


def test_swapped_encoders_fail_on_probe(tiny_encoders):
    text, image = tiny_encoders
    with pytest.raises(EncoderError, match="failed on a probe input.*1-D tf.string"):
        enc.inspect_encoder(image, enc.TEXT)
    with pytest.raises(EncoderError, match="failed on a probe input.*float32"):
        enc.inspect_encoder(text, enc.IMAGE)


def test_model_handler_encodes_batches_one_vector_per_example(tiny_encoders):
    handler = enc.EncoderModelHandler(tiny_encoders[0], enc.TEXT, max_batch_size=4)
    model = handler.load_model()
    out = handler.run_inference(["red apple", "green tea", "blue jeans"], model)
    assert len(out) == 3 and out[0].shape == (64,) and out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], model.encode(["red apple"])[0], atol=1e-6)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}

    ih = enc.EncoderModelHandler(tiny_encoders[1], enc.IMAGE, image_size=(32, 32))
    images = [np.random.default_rng(s).random((32, 32, 3), dtype=np.float32) for s in range(2)]
    vecs = ih.run_inference(images, ih.load_model())
    assert [v.shape for v in vecs] == [(48,), (48,)]
    assert ih.get_num_bytes(images) == 2 * 32 * 32 * 3 * 4


def test_a_failed_probe_does_not_poison_later_loads(tiny_encoders):
    # TensorFlow keeps a restored function locked after a signature mismatch;
    # the failed model must not be reused from the per-process cache.
    text, image = tiny_encoders
    with pytest.raises(EncoderError):
        enc.Encoder(image, enc.TEXT).probe()
    images = np.zeros((2, 32, 32, 3), np.float32)
    assert enc.Encoder(image, enc.IMAGE).encode(images).shape == (2, 48)


def test_fresh_process_loads_a_model_that_needs_tensorflow_text(builtin_cache, tmp_path):
    # A worker loads an exported model by path with nothing imported beforehand; the
    # encoder must register tensorflow-text's ops itself when the model needs them.
    import subprocess
    import sys

    from embedding import builtin

    path = builtin.ensure_built("builtin:use-multilingual-v3", builtin_cache)
    code = ("import sys, numpy as np; from embedding.encoders import Encoder; "
            "v = Encoder(sys.argv[1], 'text').encode(['red apple juice']); "
            "print(v.shape, round(float(np.linalg.norm(v)), 4))")
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(1, 512) 1.0")

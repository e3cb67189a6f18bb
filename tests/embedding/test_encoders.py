import os

import numpy as np
import pytest

from schemas.errors import EncoderError
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


def test_fixed_batches_without_a_tokenizer_fix_the_batch_size(tiny_encoders):
    """The tiny text encoder has no tokenize function: batches in the given order, filled with empty texts."""
    text = enc.Encoder(tiny_encoders[0], enc.TEXT)
    assert text.token_counts(["a"]) is None
    assert list(text.fixed_batches(["a", "bb", "ccc"], 2)) == [([0, 1], ["a", "bb"]), ([2], ["ccc", ""])]
    assert list(text.fixed_batches([], 2)) == []
    image = enc.Encoder(tiny_encoders[1], enc.IMAGE, image_size=(32, 32))
    pixels = [np.full((32, 32, 3), v, np.float32) for v in (0.1, 0.2, 0.3)]
    got = list(image.fixed_batches(pixels, 2))
    assert [i for i, _ in got] == [[0, 1], [2]]
    assert [len(b) for _, b in got] == [2, 2]
    np.testing.assert_array_equal(got[1][1][1], np.zeros((32, 32, 3), np.float32))

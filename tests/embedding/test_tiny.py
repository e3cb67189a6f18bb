"""The tiny encoders load and behave like TF Hub models."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from embedding.tiny import build_image_encoder, build_text_encoder

TITLES = [
    "red apple juice 1l",
    "Red Apple Juice 2l",
    "blue cotton t-shirt xl",
    "有机绿茶 500克",
    "Ελαιόλαδο εξαιρετικά παρθένο 1 λίτρο",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    return build_text_encoder(str(tmp_path_factory.mktemp("text")), dim=64, seed=0)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return build_image_encoder(str(tmp_path_factory.mktemp("image")), dim=48, image_size=32, seed=0)


def _images(n=4, size=32, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, 3)).astype(np.float32)
    images[-1] = 0.0  # an all-black image
    return images


def test_text_shape_dtype_and_norm(text_path):
    out = hub.load(text_path)(tf.constant(TITLES)).numpy()
    assert out.shape == (len(TITLES), 64)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[:5], 1.0, atol=1e-5)


def test_text_empty_and_blank_give_zeros(text_path):
    out = hub.load(text_path)(tf.constant(["", "   "])).numpy()
    assert not np.any(np.isnan(out))
    np.testing.assert_array_equal(out, 0.0)


def test_text_empty_batch(text_path):
    out = hub.load(text_path)(tf.constant([], dtype=tf.string)).numpy()
    assert out.shape == (0, 64)


def test_text_non_latin_gets_features(text_path):
    model = hub.load(text_path)
    out = model(tf.constant(["有机绿茶 500克", "有机绿茶", "Ελαιόλαδο παρθένο", "ΕΛΑΙΌΛΑΔΟ ΠΑΡΘΈΝΟ"])).numpy()
    assert np.all(np.linalg.norm(out, axis=1) > 0.99)
    assert out[0] @ out[1] > 0.5  # shared characters without spaces
    np.testing.assert_allclose(out[2], out[3], atol=1e-6)  # Unicode-aware lower-casing


def test_text_similar_titles_are_closer(text_path):
    model = hub.load(text_path)
    a, b, c, d = model(
        tf.constant(["red apple juice 1l", "red apple juice 2l", "blue cotton t-shirt xl", "green apple juice"])
    ).numpy()
    assert a @ b > a @ c
    assert a @ d > a @ c
    assert a @ b > 0.6


def test_text_deterministic(tmp_path):
    inputs = tf.constant(TITLES)
    first = hub.load(build_text_encoder(str(tmp_path / "a"), dim=32, seed=3))(inputs).numpy()
    second = hub.load(build_text_encoder(str(tmp_path / "b"), dim=32, seed=3))(inputs).numpy()
    other = hub.load(build_text_encoder(str(tmp_path / "c"), dim=32, seed=4))(inputs).numpy()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[:5], other[:5])


def test_text_serving_signature(text_path):
    model = hub.load(text_path)
    sig = model.signatures["serving_default"]
    _, kwargs = sig.structured_input_signature
    (name, spec), = kwargs.items()
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    out = sig(**{name: tf.constant(TITLES[:3])})
    assert set(out) == {"default"}
    np.testing.assert_allclose(out["default"].numpy(), model(tf.constant(TITLES[:3])).numpy(), atol=1e-6)
    assert sig.structured_outputs["default"].shape.as_list() == [None, 64]


def test_text_has_variables(text_path):
    loaded = tf.saved_model.load(text_path)
    assert isinstance(loaded.rotation, tf.Variable)
    assert loaded.rotation.shape == (64, 64)


def test_image_shape_dtype_norm(image_path):
    out = hub.load(image_path)(tf.constant(_images())).numpy()
    assert out.shape == (4, 48)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_image_similar_pictures_are_closer(image_path):
    model = hub.load(image_path)
    red = np.zeros((32, 32, 3), np.float32)
    red[..., 0] = 0.9
    red2 = red.copy()
    red2[4:8, 4:8] = 0.5
    blue = np.zeros((32, 32, 3), np.float32)
    blue[..., 2] = 0.9
    a, b, c = model(tf.constant(np.stack([red, red2, blue]))).numpy()
    assert a @ b > a @ c


def test_image_signature_exposes_static_size(image_path):
    model = hub.load(image_path)
    sig = model.signatures["serving_default"]
    _, kwargs = sig.structured_input_signature
    (name, spec), = kwargs.items()
    assert spec.dtype == tf.float32
    assert spec.shape.as_list() == [None, 32, 32, 3]
    out = sig(**{name: tf.constant(_images())})
    assert set(out) == {"default"}
    assert out["default"].shape == (4, 48)
    # The restored __call__ also carries it.
    (call_spec,), _ = model.__call__.concrete_functions[0].structured_input_signature
    assert call_spec.shape.as_list() == [None, 32, 32, 3]


def test_image_rejects_wrong_size(image_path):
    model = hub.load(image_path)
    with pytest.raises((ValueError, TypeError)):
        model(tf.zeros([1, 16, 16, 3], tf.float32))


def test_image_deterministic(tmp_path):
    images = tf.constant(_images(size=24))
    first = hub.load(build_image_encoder(str(tmp_path / "a"), dim=16, image_size=24, seed=7))(images).numpy()
    second = hub.load(build_image_encoder(str(tmp_path / "b"), dim=16, image_size=24, seed=7))(images).numpy()
    np.testing.assert_array_equal(first, second)
    assert first.shape == (4, 16)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_text_encoder(str(tmp_path / "t"), dim=0)
    with pytest.raises(ValueError):
        build_image_encoder(str(tmp_path / "i"), image_size=2)

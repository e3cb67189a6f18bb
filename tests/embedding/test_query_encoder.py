"""The exported query encoder computes what the pipeline computes (encoders, then fusion)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from embedding import encoders as enc
from embedding import fusion as fus
from embedding import query_encoder as qe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = ["red apple juice 1l", "Äpfel, grün — 500 g", "   ", "x" * 5000 + " tail"]


def worked_images(n=4, size=32):
    rng = np.random.default_rng(3)
    # Prepared as images.to_model_input prepares them: uint8 / 255.
    return rng.integers(0, 256, size=(n, size, size, 3)).astype(np.float32) / np.float32(255.0)


@pytest.fixture(scope="module")
def specs(tiny_encoders):
    text = enc.inspect_encoder(tiny_encoders[0], enc.TEXT)
    image = enc.inspect_encoder(tiny_encoders[1], enc.IMAGE)
    fusion = fus.FusionSpec(fus.PROJECTION, text.output_dim, image.output_dim, 40, text_weight=1.0,
                            image_weight=0.5, seed=11)
    return text, image, fusion


def pipeline_vectors(text_spec, image_spec, fusion, texts, images):
    """What the pipeline computes: encoders.Encoder, then the fusion, per modality."""
    spec = fusion.spec
    n = len(texts)
    # The pipeline cuts texts at MAX_TEXT_CHARS and treats a blank one as missing (transforms.item_text).
    cut = [t[:4096] for t in texts]
    t = enc.Encoder(text_spec.handle, enc.TEXT).encode(cut)
    t_mask = np.array([1.0 if c.strip() else 0.0 for c in cut], np.float32)
    i = enc.Encoder(image_spec.handle, enc.IMAGE, image_spec.image_size).encode(images)
    zeros_t, zeros_i, no = np.zeros((n, spec.text_dim)), np.zeros((n, spec.image_dim)), np.zeros(n)
    return {qe.TEXT: fusion(t, t_mask, zeros_i, no), qe.IMAGE: fusion(zeros_t, no, i, np.ones(n)),
            qe.TEXT_AND_IMAGE: fusion(t, t_mask, i, np.ones(n))}


def query_vectors(encoder, texts, images):
    return {qe.TEXT: encoder.encode_text(texts), qe.IMAGE: encoder.encode_image(images),
            qe.TEXT_AND_IMAGE: encoder.encode(texts, images)}


@pytest.fixture(scope="module")
def exported(specs, tmp_path_factory):
    text, image, fusion = specs
    return qe.export_query_encoder(text, image, fusion, str(tmp_path_factory.mktemp("qe") / qe.DIRECTORY))


def test_projection_export_matches_the_pipeline(specs, exported):
    text, image, fusion_spec = specs
    images = worked_images()
    encoder = qe.QueryEncoder(exported)
    assert (encoder.dim, encoder.image_size) == (40, (32, 32))
    want = pipeline_vectors(text, image, fus.ProjectionFusion(fusion_spec), TEXTS, images)
    got = query_vectors(encoder, TEXTS, images)
    for name in qe.SIGNATURES:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    # L2-normalised, except the blank text alone, which is a missing text: the zero vector.
    norms = np.linalg.norm(got[qe.TEXT], axis=1)
    np.testing.assert_allclose(norms, [1, 1, 0, 1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got[qe.TEXT_AND_IMAGE], axis=1), 1, atol=1e-5)


def test_fusion_saved_model_export_gives_the_same(specs, exported, tmp_path):
    text, image, fusion_spec = specs
    model_dir = fus.export_projection_fusion(fusion_spec, str(tmp_path / "fusion"))
    saved_spec = fus.inspect_fusion(model_dir, text.output_dim, image.output_dim, None)
    assert saved_spec.kind == fus.SAVED_MODEL
    path = qe.export_query_encoder(text, image, saved_spec, str(tmp_path / "qe"))
    images = worked_images()
    got = query_vectors(qe.QueryEncoder(path), TEXTS, images)
    want = pipeline_vectors(text, image, fus.make_fusion(saved_spec), TEXTS, images)
    projection = query_vectors(qe.QueryEncoder(exported), TEXTS, images)
    for name in qe.SIGNATURES:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got[name], projection[name], atol=1e-5, err_msg=name)


def test_export_is_self_contained_and_loads_in_a_fresh_process(specs, exported, tmp_path):
    # The encoders' own folders are not needed any more: move the export elsewhere and load it there.
    import shutil

    moved = shutil.copytree(exported, str(tmp_path / "elsewhere"))
    images = worked_images()
    np.save(tmp_path / "images.npy", images)
    code = ("import sys, numpy as np, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); "
            "imgs = tf.constant(np.load(sys.argv[2])); texts = tf.constant(['red apple juice 1l'] * len(imgs)); "
            "out = [m.signatures['text'](text=texts), m.signatures['image'](image=imgs), "
            "m.signatures['text_and_image'](text=texts, image=imgs)]; "
            "np.save(sys.argv[3], np.stack([o['embedding'].numpy() for o in out]))")
    done = subprocess.run([sys.executable, "-c", code, moved, str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = np.load(tmp_path / "out.npy")
    here = query_vectors(qe.QueryEncoder(exported), ["red apple juice 1l"] * len(images), images)
    for k, name in enumerate(qe.SIGNATURES):
        np.testing.assert_allclose(fresh[k], here[name], atol=1e-6, err_msg=name)


def test_builtin_text_model_with_tensorflow_text_ops_survives_export(builtin_cache, specs, tmp_path):
    # MiniLM tokenises in the graph with tensorflow-text ops and a vocab asset: a fresh process
    # that imports nothing but this project must load the export through QueryEncoder.
    pytest.importorskip("tensorflow_text")
    from embedding import builtin

    try:
        text = enc.inspect_encoder("builtin:minilm-l6-v2", enc.TEXT, model_cache=builtin_cache)
    except Exception as e:  # weights package missing
        pytest.skip(f"built-in MiniLM unavailable: {e}")
    _, image, _ = specs
    fusion_spec = fus.FusionSpec(fus.PROJECTION, text.output_dim, image.output_dim, 64, seed=2)
    path = qe.export_query_encoder(text, image, fusion_spec, str(tmp_path / "qe"), model_cache=builtin_cache)
    assert builtin.is_builtin(text.handle)
    code = ("import sys, numpy as np; from embedding.query_encoder import QueryEncoder; "
            "v = QueryEncoder(sys.argv[1]).encode_text(['red apple juice 1l', 'Äpfel grün']); "
            "np.save(sys.argv[2], v)")
    done = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "v.npy")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    t = enc.Encoder(text.handle, enc.TEXT, model_cache=builtin_cache).encode(["red apple juice 1l", "Äpfel grün"])
    want = fus.ProjectionFusion(fusion_spec)(t, np.ones(2), np.zeros((2, image.output_dim)), np.zeros(2))
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), want, atol=1e-5)


class Sample:
    def __init__(self, item_id, text, image, text_embedding, image_embedding, embedding):
        self.item_id, self.text, self.image = item_id, text, image
        self.text_embedding, self.image_embedding, self.embedding = text_embedding, image_embedding, embedding


def test_measure_parity_on_pipeline_vectors_and_on_a_broken_encoder(specs, exported):
    text, image, fusion_spec = specs
    fusion = fus.ProjectionFusion(fusion_spec)
    texts = ["red apple juice 1l", "green pear", "blue hat", None]
    images = worked_images()
    t = enc.Encoder(text.handle, enc.TEXT).encode([x or "" for x in texts])
    i = enc.Encoder(image.handle, enc.IMAGE).encode(images)
    t_mask = np.array([x is not None for x in texts], np.float32)
    i_mask = np.array([1, 0, 1, 1], np.float32)
    fused = fusion(t, t_mask, i, i_mask)
    samples = [Sample(f"id{k}", texts[k], images[k] if i_mask[k] else None, t[k] if t_mask[k] else None,
                      i[k] if i_mask[k] else None, fused[k]) for k in range(4)]
    parity = qe.measure_parity(qe.QueryEncoder(exported), fusion, samples)
    assert {name: parity[name]["items"] for name in qe.SIGNATURES} == {"text": 3, "image": 3, "text_and_image": 2}
    assert all(parity[name]["min_cosine"] >= 0.99999 for name in qe.SIGNATURES), parity
    assert qe.worst_parity(parity)[1] >= qe.PARITY_THRESHOLD
    assert all(parity[name]["max_norm_error"] < 1e-5 for name in qe.SIGNATURES)
    assert qe.parity_problem(parity) is None
    # Vectors from another fusion (another seed) are not what this encoder computes.
    other = fus.ProjectionFusion(fus.FusionSpec(fus.PROJECTION, fusion_spec.text_dim, fusion_spec.image_dim, 40,
                                                seed=12))
    parity = qe.measure_parity(qe.QueryEncoder(exported), other, samples)
    name, cosine, item_id = qe.worst_parity(parity)
    assert cosine < 0.9 and item_id.startswith("id")
    assert qe.parity_problem(parity).startswith(f"worst cosine {cosine:.6f} ({name}, item '{item_id}')")
    # Right directions but not unit vectors: cosine cannot see it, the length check does.
    encoder = qe.QueryEncoder(exported)

    class Unnormalised:
        def encode_text(self, texts):
            return 2 * encoder.encode_text(texts)

        def encode_image(self, images):
            return encoder.encode_image(images)

        def encode(self, texts, images):
            return encoder.encode(texts, images)

    parity = qe.measure_parity(Unnormalised(), fusion, samples)
    assert parity["text"]["min_cosine"] >= 0.99999
    assert qe.parity_problem(parity) == "text vectors are not L2-normalised (length off by up to 1.000000)"
    assert qe.worst_parity(qe.measure_parity(qe.QueryEncoder(exported), fusion, [])) is None

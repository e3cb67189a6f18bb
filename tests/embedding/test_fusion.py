import dataclasses

import numpy as np
import pytest

from schemas.errors import EncoderError
from embedding import fusion as fus


def spec(text_dim=6, image_dim=4, dim=16, **kw):
    return fus.FusionSpec(fus.PROJECTION, text_dim, image_dim, dim, **kw)


@pytest.mark.parametrize("in_dim, out_dim", [(10, 4), (4, 10), (7, 7)])
def test_projection_matrix_is_orthonormal_and_seeded(in_dim, out_dim):
    m = fus.projection_matrix(in_dim, out_dim, seed=3)
    assert m.shape == (in_dim, out_dim)
    gram = m.T @ m if in_dim >= out_dim else m @ m.T
    np.testing.assert_allclose(gram, np.eye(min(in_dim, out_dim)), atol=1e-5)
    np.testing.assert_array_equal(m, fus.projection_matrix(in_dim, out_dim, seed=3))
    assert not np.allclose(m, fus.projection_matrix(in_dim, out_dim, seed=4))


def test_l2_normalize_keeps_zero_rows():
    out = fus.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_widening_projection_preserves_weighted_concat_cosines():
    # Concatenation (10) narrower than dim (16): the projection keeps inner products exactly.
    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(5, 6)), rng.normal(size=(5, 4))
    f = fus.ProjectionFusion(spec(text_weight=1.0, image_weight=2.0))
    out = f(t, np.ones(5), i, np.ones(5))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    concat = np.concatenate([fus.l2_normalize(t), 2.0 * fus.l2_normalize(i)], axis=1)
    expected = fus.l2_normalize(concat) @ fus.l2_normalize(concat).T
    np.testing.assert_allclose(out @ out.T, expected, atol=1e-5)


def test_missing_image_is_text_block_alone():
    rng = np.random.default_rng(1)
    t, i = rng.normal(size=(2, 6)), rng.normal(size=(2, 4))
    f = fus.ProjectionFusion(spec())
    text_only = f(t[:1], np.ones(1), i[:1], np.zeros(1))  # image values ignored when masked
    same = f(t[:1], np.ones(1), np.zeros((1, 4)), np.zeros(1))
    np.testing.assert_allclose(text_only, same, atol=1e-6)
    full = f(t[:1], np.ones(1), i[:1], np.ones(1))
    # Equal weights: cosine(text-only, full) = 1/sqrt(2) for the same item.
    assert float((text_only @ full.T)[0, 0]) == pytest.approx(1 / np.sqrt(2), abs=1e-5)


def test_exported_projection_is_a_fusion_savedmodel_with_same_numbers(tmp_path):
    s = spec(text_dim=6, image_dim=4, dim=3, text_weight=0.5, seed=9)
    path = fus.export_projection_fusion(s, str(tmp_path / "fusion"))
    rng = np.random.default_rng(2)
    t, i = rng.normal(size=(4, 6)), rng.normal(size=(4, 4))
    masks = np.array([1, 1, 0, 1.0]), np.array([1, 0, 1, 1.0])
    np.testing.assert_allclose(
        fus.SavedModelFusion(fus.FusionSpec(fus.SAVED_MODEL, 6, 4, 3, path=path))(t, masks[0], i, masks[1]),
        fus.ProjectionFusion(s)(t, masks[0], i, masks[1]),
        atol=1e-5,
    )
    got = fus.inspect_fusion(path, 6, 4, None)
    assert (got.kind, got.dim, got.fingerprint.startswith("sha256:")) == (fus.SAVED_MODEL, 3, True)


def test_inspect_fusion_rejects_dimension_mismatch(tmp_path):
    path = fus.export_projection_fusion(spec(dim=8), str(tmp_path / "fusion"))
    with pytest.raises(EncoderError, match="returns 8-d vectors but --dimension is 16"):
        fus.inspect_fusion(path, 6, 4, 16)
    with pytest.raises(EncoderError, match="does not accept text vectors of size 5"):
        fus.inspect_fusion(path, 5, 4, None)


def test_inspect_fusion_rejects_non_savedmodel(tmp_path):
    with pytest.raises(EncoderError, match="cannot load fusion model"):
        fus.inspect_fusion(str(tmp_path), 6, 4, None)


def test_default_fusion_spec():
    s = fus.inspect_fusion(None, 64, 48, None)
    assert (s.kind, s.dim, s.text_weight, s.image_weight) == (fus.PROJECTION, 256, 1.0, 1.0)


def test_specs_round_trip_through_their_manifest_json():
    from embedding import encoders as enc

    projection = fus.FusionSpec(fus.PROJECTION, 8, 4, 6, text_weight=2.0, image_weight=0.5, seed=3)
    assert fus.FusionSpec.from_json(projection.to_json()) == projection
    saved = fus.FusionSpec(fus.SAVED_MODEL, 8, 4, 6, path="/m", fingerprint="sha256:" + "a" * 64)
    assert fus.FusionSpec.from_json(saved.to_json()) == dataclasses.replace(saved, seed=0)
    spec = enc.EncoderSpec(enc.IMAGE, "builtin:x", 12, "sha256:" + "b" * 64, (32, 32))
    assert enc.EncoderSpec.from_json(enc.IMAGE, dict(spec.to_json(), chosen_by={"rule": "auto"})) == spec


def test_fuse_fixed_runs_blocks_of_fixed_rows_so_an_item_keeps_its_bits():
    """Each item fused in a block of exactly `rows` rows (zero rows as filler): the same item fused among
    5 or among 2 others gets the same bits, equal to the fusion of its padded block, and close to the
    fusion computed alone."""
    rng = np.random.default_rng(3)
    t, i = rng.normal(size=(7, 6)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    tm, im = np.ones(7, np.float32), np.array([1, 0, 1, 1, 0, 1, 1], np.float32)
    f = fus.ProjectionFusion(spec())
    out = fus.fuse_fixed(f, t, tm, i, im, rows=4)
    assert out.shape == (7, 16)
    np.testing.assert_array_equal(out[:4], f(t[:4], tm[:4], i[:4], im[:4]))
    pad = lambda a: np.concatenate([a[4:], np.zeros((1, *a.shape[1:]), np.float32)])  # noqa: E731
    np.testing.assert_array_equal(out[4:], f(pad(t), pad(tm), pad(i), pad(im))[:3])
    again = fus.fuse_fixed(f, t[5:7], tm[5:7], i[5:7], im[5:7], rows=4)
    np.testing.assert_array_equal(again, out[5:7])
    np.testing.assert_allclose(out[6], f(t[6:7], tm[6:7], i[6:7], im[6:7])[0], atol=1e-6)
    assert fus.fuse_fixed(f, t[:0], tm[:0], i[:0], im[:0]).shape == (0, 16)

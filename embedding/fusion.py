"""Fusion: one L2-normalised vector per item from its text and image vectors.

The fusion interface, shared by the built-in projection and by any fusion
SavedModel given with ``--fusion-model`` (the training pipeline exports those):
a ``serving_default`` signature taking

    text_embedding  float32 [batch, text_dim]   (zeros where the item has no text)
    text_mask       float32 [batch]             (1.0 present, 0.0 missing)
    image_embedding float32 [batch, image_dim]  (zeros where the item has no image)
    image_mask      float32 [batch]

and returning ``{"embedding": float32 [batch, dim]}``. The pipeline
L2-normalises whatever the model returns, so a model need not.

The default, ``ProjectionFusion``: each present modality vector is
L2-normalised and scaled by its weight, missing modalities contribute a zero
block, the blocks are concatenated and multiplied by a fixed, seeded random
matrix with orthonormal rows or columns, then L2-normalised. When the
concatenation is shorter than ``dim`` this keeps inner products exactly; when
it is wider it loses neighbour structure in proportion to the squeeze (measured
in benchmarks/fusion_quality.md: 93% item-to-item recall@10 at 1280 -> 256). An item without an image therefore
gets the projection of its weighted text block alone; with equal weights the
cosine between a text-only item and a full item is their text cosine scaled by
1/sqrt(2). benchmarks/fusion_quality.md says why a random projection and not a
PCA fitted on the catalog: PCA keeps more at small ``dim``, but needs a second
pass over the catalog and a fitted matrix per version, so vectors of different
versions stop being comparable; a fitted reduction can still come in as a
``--fusion-model``.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import numpy as np

from schemas.errors import EncoderError, brief

TEXT_EMBEDDING = "text_embedding"
TEXT_MASK = "text_mask"
IMAGE_EMBEDDING = "image_embedding"
IMAGE_MASK = "image_mask"
OUTPUT = "embedding"

PROJECTION = "projection"
SAVED_MODEL = "saved_model"


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Row-wise L2 normalisation that leaves all-zero rows at zero (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@functools.lru_cache(maxsize=8)
def projection_matrix(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """A seeded [in_dim, out_dim] matrix with orthonormal rows or columns (read-only).

    Built from a Gaussian matrix by QR so every worker (and every rerun) makes
    the same matrix from the same seed without shipping it around. Cached: the QR
    of 1,664 x 256 takes ~1 s here, and one run needs the matrix four times
    (fusion, query encoder export, parity, recall gate).
    """
    rng = np.random.default_rng(seed)
    big, small = max(in_dim, out_dim), min(in_dim, out_dim)
    q, r = np.linalg.qr(rng.standard_normal((big, small)))
    # Fix QR's sign ambiguity so the result does not depend on the LAPACK build.
    q = q * np.sign(np.diag(r))
    q = (q if in_dim >= out_dim else q.T).astype(np.float32)
    q.setflags(write=False)  # shared by every caller through the cache
    return q


@dataclasses.dataclass(frozen=True)
class FusionSpec:
    """Everything needed to rebuild the fusion on a worker; small and picklable."""

    kind: str
    text_dim: int
    image_dim: int
    dim: int
    text_weight: float = 1.0
    image_weight: float = 1.0
    seed: int = 0
    path: Optional[str] = None
    fingerprint: Optional[str] = None
    # A trained models version brings a query tower (the same interface) that embeds queries instead.
    query_path: Optional[str] = None
    query_fingerprint: Optional[str] = None
    models_version: Optional[str] = None

    def to_json(self) -> dict:
        out = {"kind": self.kind, "text_dim": self.text_dim, "image_dim": self.image_dim, "dim": self.dim}
        if self.kind == PROJECTION:
            out.update(text_weight=self.text_weight, image_weight=self.image_weight, seed=self.seed)
        else:
            out.update(path=self.path, fingerprint=self.fingerprint)
            if self.query_path is not None:
                out.update(query_path=self.query_path, query_fingerprint=self.query_fingerprint)
            if self.models_version is not None:
                out.update(models_version=self.models_version)
        return out

    def query_spec(self) -> "FusionSpec":
        """The fusion that embeds queries: the query tower when there is one, else this fusion itself."""
        if self.query_path is None:
            return self
        return FusionSpec(SAVED_MODEL, self.text_dim, self.image_dim, self.dim, path=self.query_path,
                          fingerprint=self.query_fingerprint)

    @classmethod
    def from_json(cls, data: dict) -> "FusionSpec":
        """The manifest's ``fusion`` entry."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class ProjectionFusion:
    """Weighted concatenation of normalised modality vectors, then a seeded projection."""

    def __init__(self, spec: FusionSpec):
        self.spec = spec
        self.matrix = projection_matrix(spec.text_dim + spec.image_dim, spec.dim, spec.seed)

    def __call__(self, text, text_mask, image, image_mask) -> np.ndarray:
        t = l2_normalize(text) * (self.spec.text_weight * np.asarray(text_mask, np.float32))[:, None]
        i = l2_normalize(image) * (self.spec.image_weight * np.asarray(image_mask, np.float32))[:, None]
        return l2_normalize(np.concatenate([t, i], axis=1) @ self.matrix)


class SavedModelFusion:
    """A fusion SavedModel that follows the interface in this module's docstring."""

    def __init__(self, spec: FusionSpec):
        import tensorflow as tf

        self.spec = spec
        try:
            model = tf.saved_model.load(spec.path)
            self._fn = model.signatures["serving_default"]
        except Exception as e:
            raise EncoderError(
                f"cannot load fusion model {spec.path!r}: {brief(e)}. It must be a SavedModel "
                f"with a serving_default signature (see embedding/fusion.py)"
            ) from e
        self._model = model  # keeps the signature's variables alive

    def __call__(self, text, text_mask, image, image_mask) -> np.ndarray:
        import tensorflow as tf

        out = self._fn(
            **{
                TEXT_EMBEDDING: tf.constant(np.asarray(text, np.float32)),
                TEXT_MASK: tf.constant(np.asarray(text_mask, np.float32)),
                IMAGE_EMBEDDING: tf.constant(np.asarray(image, np.float32)),
                IMAGE_MASK: tf.constant(np.asarray(image_mask, np.float32)),
            }
        )
        if OUTPUT not in out:
            raise EncoderError(f"fusion model {self.spec.path!r} returns {sorted(out)}, expected {OUTPUT!r}")
        return l2_normalize(out[OUTPUT].numpy())


def make_fusion(spec: FusionSpec):
    return ProjectionFusion(spec) if spec.kind == PROJECTION else SavedModelFusion(spec)


FUSION_ROWS = 32


def fuse_fixed(fusion, text, text_mask, image, image_mask, rows: int = FUSION_ROWS) -> np.ndarray:
    """``fusion(...)`` run on blocks of exactly ``rows`` rows (zero rows as filler), so that an item's
    fused vector does not depend on how many items it was fused with: a matmul's last bits do (its
    kernels block by the number of rows), and an incremental run fuses other groups of items than a
    full run."""
    n = len(text_mask)
    out = []
    for start in range(0, n, rows):
        block = [np.asarray(a[start:start + rows], np.float32) for a in (text, text_mask, image, image_mask)]
        fill = rows - len(block[1])
        if fill:
            block = [np.concatenate([a, np.zeros((fill, *a.shape[1:]), np.float32)]) for a in block]
        out.append(np.asarray(fusion(*block))[:rows - fill])
    return np.concatenate(out) if out else np.zeros((0, fusion.spec.dim), np.float32)


class FusionModel(NamedTuple):
    """What ``--fusion-model`` named, resolved: the item tower, the query tower if any, training.json if any."""

    fusion_path: str
    query_path: Optional[str] = None
    training: Optional[dict] = None
    models_version: Optional[str] = None


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _read_bytes(path: str) -> bytes:
    with _gfile().GFile(path, "rb") as f:
        return f.read()


def _check_models_version(version_dir: str, expected_sha256: Optional[str] = None) -> dict:
    """training.json of a models version, checked: its own sha256 against the pointer's and the size and
    sha256 of every file it lists (a half-copied or edited version is refused, never half-used)."""
    import hashlib
    import json

    from schemas import layout

    path = _join(version_dir, layout.TRAINING_FILE)
    try:
        raw = _read_bytes(path)
        training = json.loads(raw)
        files = training["files"]
    except Exception as e:  # pylint: disable=broad-except
        raise EncoderError(f"--fusion-model {version_dir!r}: {path} is missing or unreadable ({brief(e)}); "
                           f"pass a models directory, one of its versions or a fusion SavedModel") from None
    digest = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise EncoderError(f"--fusion-model: {path} does not match the checksum LATEST gives for it")
    for rel, facts in sorted(files.items()):
        target = _join(version_dir, rel)
        try:
            data = _read_bytes(target)
        except Exception as e:  # pylint: disable=broad-except
            raise EncoderError(f"--fusion-model: {target} is missing ({brief(e)})") from None
        if len(data) != facts["size"] or hashlib.sha256(data).hexdigest() != facts["sha256"]:
            raise EncoderError(f"--fusion-model: {target} does not match its size and sha256 in {path}")
    return training


def resolve_fusion_model(path: str) -> FusionModel:
    """``--fusion-model``: a models directory (its LATEST), one models version, or a bare fusion SavedModel."""
    from schemas import layout

    fs = _gfile()
    root = layout.local_path(path)
    latest = _join(root, layout.LATEST_FILE)
    version_dir, expected = root, None
    if fs.exists(latest):
        pointer = layout.ModelsPointer.loads(_read_bytes(latest), where=latest)
        version_dir, expected = _join(root, pointer.version), pointer.training_sha256
    elif not fs.exists(_join(root, layout.TRAINING_FILE)):
        if fs.exists(_join(root, layout.MODELS_FUSION_DIR)) and not fs.exists(_join(root, "saved_model.pb")):
            raise EncoderError(f"--fusion-model {path!r} has a {layout.MODELS_FUSION_DIR}/ folder but no "
                               f"{layout.TRAINING_FILE}: an unfinished models version; pick a finished one")
        return FusionModel(root)
    training = _check_models_version(version_dir, expected)
    query = _join(version_dir, layout.MODELS_QUERY_DIR)
    return FusionModel(_join(version_dir, layout.MODELS_FUSION_DIR), query if fs.exists(query) else None,
                       training, training.get("version"))


def check_trained_against(model: FusionModel, encoders: dict) -> None:
    """Refuses a models version trained against other encoders than the run's (``encoders``: kind -> EncoderSpec)."""
    if model.training is None:
        return
    trained = model.training.get("encoders") or {}
    for kind, spec in sorted(encoders.items()):
        want = (trained.get(kind) or {}).get("fingerprint")
        if want != spec.fingerprint:
            raise EncoderError(
                f"--fusion-model {model.models_version or model.fusion_path!r} was trained against the {kind} "
                f"encoder {(trained.get(kind) or {}).get('handle')!r} (fingerprint {str(want)[:19]}), but this "
                f"run's {kind} encoder is {spec.handle!r} (fingerprint {spec.fingerprint[:19]}); pass the "
                f"encoders it was trained with, or retrain with `catalog-index train` on an index of these")


def inspect_fusion(path: Optional[str], text_dim: int, image_dim: int, dim: Optional[int],
                   text_weight: float = 1.0, image_weight: float = 1.0, seed: int = 0,
                   encoders: Optional[dict] = None) -> FusionSpec:
    """Builds the FusionSpec at launch, loading and probing a fusion SavedModel if given.

    ``path`` may name a models directory of ``catalog-index train`` (its LATEST), one of its versions
    (then the query tower comes along, and ``encoders`` {kind: EncoderSpec} must match the ones it was
    trained against), or a bare fusion SavedModel. Fails with EncoderError when a model does not take
    the encoders' sizes or does not return ``dim``-sized vectors.
    """
    if path is None:
        return FusionSpec(PROJECTION, text_dim, image_dim, dim or 256, text_weight, image_weight, seed)
    from embedding.encoders import fingerprint

    model = resolve_fusion_model(path)
    if encoders:
        check_trained_against(model, encoders)
    out_dim = _probe(model.fusion_path, text_dim, image_dim, dim)
    spec = FusionSpec(SAVED_MODEL, text_dim, image_dim, out_dim, path=model.fusion_path,
                      fingerprint=fingerprint(model.fusion_path), models_version=model.models_version)
    if model.query_path is not None:
        if _probe(model.query_path, text_dim, image_dim, out_dim) != out_dim:  # pragma: no cover - _probe raises
            raise EncoderError(f"query tower {model.query_path!r} does not return {out_dim}-d vectors")
        spec = dataclasses.replace(spec, query_path=model.query_path, query_fingerprint=fingerprint(model.query_path))
    return spec


def _probe(path: str, text_dim: int, image_dim: int, dim: Optional[int]) -> int:
    """Loads a fusion SavedModel and runs it once; returns its output size."""
    model = SavedModelFusion(FusionSpec(SAVED_MODEL, text_dim, image_dim, dim or 0, path=path))
    try:
        out = model(np.zeros((2, text_dim)), np.ones(2), np.zeros((2, image_dim)), np.zeros(2))
    except EncoderError:
        raise
    except Exception as e:
        raise EncoderError(
            f"fusion model {path!r} does not accept text vectors of size {text_dim} and image vectors of "
            f"size {image_dim} (the encoders' output sizes): {brief(e)}"
        ) from e
    out_dim = int(out.shape[1])
    if dim is not None and out_dim != dim:
        raise EncoderError(
            f"fusion model {path!r} returns {out_dim}-d vectors but --dimension is {dim}; "
            f"drop --dimension or set it to {out_dim}"
        )
    return out_dim


def export_projection_fusion(spec: FusionSpec, export_dir: str) -> str:
    """Saves a ProjectionFusion as a fusion SavedModel (same interface, same numbers).

    Lets the index ship its fusion as a model, and gives tests a real fusion
    SavedModel to load through ``--fusion-model``.
    """
    import tensorflow as tf

    matrix = ProjectionFusion(spec).matrix
    module = tf.Module()
    module.matrix = tf.Variable(matrix, trainable=False)
    wt, wi = float(spec.text_weight), float(spec.image_weight)

    def normalize(x):
        return tf.math.divide_no_nan(x, tf.norm(x, axis=1, keepdims=True))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, spec.text_dim], tf.float32, name=TEXT_EMBEDDING),
            tf.TensorSpec([None], tf.float32, name=TEXT_MASK),
            tf.TensorSpec([None, spec.image_dim], tf.float32, name=IMAGE_EMBEDDING),
            tf.TensorSpec([None], tf.float32, name=IMAGE_MASK),
        ]
    )
    def fuse(text_embedding, text_mask, image_embedding, image_mask):
        t = normalize(text_embedding) * (wt * text_mask)[:, None]
        i = normalize(image_embedding) * (wi * image_mask)[:, None]
        return {OUTPUT: normalize(tf.matmul(tf.concat([t, i], axis=1), module.matrix))}

    module.fuse = fuse
    tf.saved_model.save(module, export_dir, signatures={"serving_default": fuse})
    return export_dir


"""The query encoder every release ships: one SavedModel, the pipeline's encoders and fusion in one graph.

``export_query_encoder`` writes ``<release>/query_encoder/``, a TensorFlow
SavedModel with three signatures, each returning ``{"embedding": float32 [b, dim]}``
(L2-normalised, ``dim`` = the manifest's ``dimension``):

    text            text  = 1-D tf.string                       (an item with only a text)
    image           image = float32 [b, h, w, 3] in [0, 1]      (an item with only an image;
                                                                  h, w = encoders.image.image_size)
    text_and_image  text, image                                  (an item with both)

Each computes what the pipeline computes for an item with that modality: the
same text and image encoders (loaded as the pipeline loads them and tracked by
the exported module, so the folder is self-contained), then the same fusion
(``embedding/fusion.py``: the projection, or the fusion SavedModel's
``serving_default`` with masks), then L2 normalisation. A text that is blank
(only whitespace) counts as missing, as ``item_text`` makes it; texts are cut
to the pipeline's ``MAX_TEXT_CHARS`` code points first.

Text models with tokenisation in the graph (the built-in ones) need the ops of
tensorflow-text to load: ``QueryEncoder`` imports it when a load says an op is
missing, as the pipeline does (``encoders._register_text_ops``).

``measure_parity`` compares the exported model with vectors the pipeline
produced; the publisher refuses a release whose worst cosine is under
``PARITY_THRESHOLD``. No Beam here: a search service loads the model with
``QueryEncoder(path)`` (or plain ``tf.saved_model.load`` after
``import tensorflow_text``).
"""

from typing import Optional, Sequence

import numpy as np

from embedding import encoders as enc
from embedding import fusion as fus
from schemas.errors import EncoderError, brief

DIRECTORY = "query_encoder"  # relative to the release folder
TEXT = "text"
IMAGE = "image"
TEXT_AND_IMAGE = "text_and_image"
SIGNATURES = (TEXT, IMAGE, TEXT_AND_IMAGE)
OUTPUT = "embedding"
PARITY_THRESHOLD = 0.999


def _tf():
    import tensorflow as tf

    return tf


def _normalize(x):
    tf = _tf()
    # Zero rows stay zero, as fusion.l2_normalize leaves them.
    return tf.math.divide_no_nan(x, tf.norm(x, axis=1, keepdims=True))


def _model_fn(model, handle: str, kind: str):
    """The batch -> [b, dim] function of a loaded encoder, chosen as encoders.Encoder chooses it."""
    if callable(model):
        fn = model
    elif "serving_default" in getattr(model, "signatures", {}):
        sig = model.signatures["serving_default"]
        _, kwargs = sig.structured_input_signature
        if len(kwargs) != 1:
            raise EncoderError(f"{kind} encoder {handle!r}: serving signature must take one input")
        name = next(iter(kwargs))

        def fn(x):
            return sig(**{name: x})
    else:
        raise EncoderError(f"{kind} encoder {handle!r} is neither callable nor has a serving signature")
    return lambda x: enc._single_output(fn(x), handle)


def _fusion_fn(spec: fus.FusionSpec, module):
    """(text, text_mask, image, image_mask) -> fused [b, dim], L2-normalised, as fusion.make_fusion(spec)."""
    tf = _tf()
    if spec.kind == fus.PROJECTION:
        module.projection = tf.Variable(fus.ProjectionFusion(spec).matrix, trainable=False, name="projection")
        wt, wi = float(spec.text_weight), float(spec.image_weight)

        def fuse(text, text_mask, image, image_mask):
            t = _normalize(text) * (wt * text_mask)[:, None]
            i = _normalize(image) * (wi * image_mask)[:, None]
            return _normalize(tf.matmul(tf.concat([t, i], axis=1), module.projection))

        return fuse
    try:
        module.fusion_model = tf.saved_model.load(spec.path)
        sig = module.fusion_model.signatures["serving_default"]
    except Exception as e:
        raise EncoderError(f"cannot load fusion model {spec.path!r}: {brief(e)}") from e

    def fuse(text, text_mask, image, image_mask):
        out = sig(**{fus.TEXT_EMBEDDING: text, fus.TEXT_MASK: text_mask,
                     fus.IMAGE_EMBEDDING: image, fus.IMAGE_MASK: image_mask})
        return _normalize(out[fus.OUTPUT])

    return fuse


def export_query_encoder(text_spec: enc.EncoderSpec, image_spec: enc.EncoderSpec, fusion_spec: fus.FusionSpec,
                         export_dir: str, model_cache: Optional[str] = None,
                         max_text_chars: Optional[int] = 4096) -> str:
    """Writes the query encoder SavedModel (see the module docstring) to ``export_dir``; returns it.

    ``max_text_chars``: the pipeline's cut of item texts (transforms.MAX_TEXT_CHARS); None for none.
    """
    tf = _tf()
    if image_spec.image_size is None:
        raise EncoderError(f"image encoder {image_spec.handle!r} has no image size; inspect it first")
    if (fusion_spec.text_dim, fusion_spec.image_dim) != (text_spec.output_dim, image_spec.output_dim):
        raise EncoderError(f"fusion takes {fusion_spec.text_dim}-d text and {fusion_spec.image_dim}-d image "
                           f"vectors; the encoders give {text_spec.output_dim} and {image_spec.output_dim}")
    height, width = (int(v) for v in image_spec.image_size)
    module = tf.Module()
    # Tracked as resources of the module: the export carries their variables, assets and functions.
    module.text_model = enc._load_model(text_spec.handle, enc.TEXT, model_cache)
    module.image_model = enc._load_model(image_spec.handle, enc.IMAGE, model_cache)
    encode_text = _model_fn(module.text_model, text_spec.handle, enc.TEXT)
    encode_image = _model_fn(module.image_model, image_spec.handle, enc.IMAGE)
    fuse = _fusion_fn(fusion_spec.query_spec(), module)  # a trained query tower when the fusion has one
    text_dim, image_dim = fusion_spec.text_dim, fusion_spec.image_dim

    def text_inputs(text):
        if max_text_chars is not None:
            text = tf.strings.substr(text, 0, int(max_text_chars), unit="UTF8_CHAR")
        # A blank text is a missing text (transforms.item_text): mask 0, like an item without one.
        present = tf.cast(tf.strings.length(tf.strings.strip(text)) > 0, tf.float32)
        return tf.reshape(tf.cast(encode_text(text), tf.float32), [-1, text_dim]), present

    def image_inputs(image):
        vectors = tf.reshape(tf.cast(encode_image(image), tf.float32), [-1, image_dim])
        return vectors, tf.ones([tf.shape(image)[0]], tf.float32)

    text_spec_in = tf.TensorSpec([None], tf.string, name=TEXT)
    image_spec_in = tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGE)

    @tf.function(input_signature=[text_spec_in])
    def text_only(text):
        t, t_mask = text_inputs(text)
        n = tf.shape(t)[0]
        return {OUTPUT: fuse(t, t_mask, tf.zeros([n, image_dim]), tf.zeros([n]))}

    @tf.function(input_signature=[image_spec_in])
    def image_only(image):
        i, i_mask = image_inputs(image)
        n = tf.shape(i)[0]
        return {OUTPUT: fuse(tf.zeros([n, text_dim]), tf.zeros([n]), i, i_mask)}

    @tf.function(input_signature=[text_spec_in, image_spec_in])
    def text_and_image(text, image):
        t, t_mask = text_inputs(text)
        i, i_mask = image_inputs(image)
        return {OUTPUT: fuse(t, t_mask, i, i_mask)}

    module.text = text_only
    module.image = image_only
    module.text_and_image = text_and_image
    signatures = {TEXT: text_only.get_concrete_function(), IMAGE: image_only.get_concrete_function(),
                  TEXT_AND_IMAGE: text_and_image.get_concrete_function()}
    tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir


def load_saved_model(path: str):
    """tf.saved_model.load, registering tensorflow-text's ops first when the model needs them."""
    tf = _tf()
    try:
        return tf.saved_model.load(path)
    except Exception as e:
        # The built-in text models use tensorflow-text ops, registered only once it is imported.
        if "Op type not registered" not in str(e) or not enc._register_text_ops():
            raise
        return tf.saved_model.load(path)


class QueryEncoder:
    """A loaded query encoder: strings and/or images in, L2-normalised float32 [b, dim] out."""

    def __init__(self, path: str):
        try:
            self._model = load_saved_model(path)
            self._signatures = {name: self._model.signatures[name] for name in SIGNATURES}
        except Exception as e:
            raise EncoderError(f"cannot load the query encoder {path!r}: {brief(e)}") from e
        _, kwargs = self._signatures[IMAGE].structured_input_signature
        shape = kwargs[IMAGE].shape
        self.image_size = (int(shape[1]), int(shape[2]))
        self.dim = int(self._signatures[TEXT].structured_outputs[OUTPUT].shape[-1])

    def _run(self, name: str, **inputs) -> np.ndarray:
        return self._signatures[name](**inputs)[OUTPUT].numpy()

    def _texts(self, texts: Sequence[str]):
        return _tf().constant([t.encode("utf-8") if isinstance(t, str) else t for t in texts], _tf().string)

    def _images(self, images):
        return _tf().constant(np.asarray(images, np.float32).reshape(-1, *self.image_size, 3))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self._run(TEXT, text=self._texts(texts))

    def encode_image(self, images) -> np.ndarray:
        """images: float32 [b, h, w, 3] in [0, 1], prepared as embedding.images.to_model_input does."""
        return self._run(IMAGE, image=self._images(images))

    def encode(self, texts: Sequence[str], images) -> np.ndarray:
        return self._run(TEXT_AND_IMAGE, text=self._texts(texts), image=self._images(images))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide((a * b).sum(axis=1), norms, out=np.zeros(len(a)), where=norms > 0)


def _summary(ids, got=None, want=None) -> dict:
    if len(ids) == 0:
        return {"items": 0}
    cosines = _cosines(got, want)
    worst = int(np.argmin(cosines))
    # Cosine does not see the length: the query vectors must also be unit vectors, like the indexed ones.
    norm_error = float(np.abs(np.linalg.norm(np.asarray(got, np.float64), axis=1) - 1.0).max())
    return {"items": len(ids), "min_cosine": float(cosines[worst]), "worst_item": ids[worst],
            "max_norm_error": norm_error}


def measure_parity(encoder: QueryEncoder, fusion, samples, query_tower: bool = False) -> dict:
    """Cosines between the query encoder and the pipeline's own vectors on sampled items.

    ``samples``: objects with ``item_id``, ``text`` (what the text encoder saw, or None), ``image``
    (float32 [h, w, 3] as the image encoder saw it, or None) and the item's stored ``text_embedding``,
    ``image_embedding`` and fused ``embedding``. ``fusion``: the pipeline's (fusion.make_fusion), or with
    ``query_tower`` the query tower of a trained fusion (then text_and_image is compared with the query
    tower on the stored text and image vectors, not with the item's fused vector).

    - text: query ``text`` on the text vs the fusion of the stored text vector alone;
    - image: query ``image`` on the pixels vs the fusion of the stored image vector alone;
    - text_and_image: query ``text_and_image`` vs the stored fused vector, for items with both.

    Returns {"threshold", "text", "image", "text_and_image"}, each modality {"items", "min_cosine",
    "worst_item", "max_norm_error"} ({"items": 0} when no sampled item has it).
    """
    spec = fusion.spec
    texts = [s for s in samples if s.text is not None and s.text_embedding is not None]
    images = [s for s in samples if s.image is not None and s.image_embedding is not None]
    both = [s for s in texts if s.image is not None and s.image_embedding is not None]
    out = {"threshold": PARITY_THRESHOLD}
    if texts:
        n = len(texts)
        want = fusion(np.stack([s.text_embedding for s in texts]), np.ones(n),
                      np.zeros((n, spec.image_dim)), np.zeros(n))
        got = encoder.encode_text([s.text for s in texts])
        out[TEXT] = _summary([s.item_id for s in texts], got, want)
    else:
        out[TEXT] = _summary([])
    if images:
        n = len(images)
        want = fusion(np.zeros((n, spec.text_dim)), np.zeros(n),
                      np.stack([s.image_embedding for s in images]), np.ones(n))
        got = encoder.encode_image(np.stack([s.image for s in images]))
        out[IMAGE] = _summary([s.item_id for s in images], got, want)
    else:
        out[IMAGE] = _summary([])
    if both:
        got = encoder.encode([s.text for s in both], np.stack([s.image for s in both]))
        if not query_tower:
            want = np.stack([s.embedding for s in both])  # the item's own fused vector, as published
        else:  # a query tower embeds queries differently from items: compare with it on the stored vectors
            n = len(both)
            want = fusion(np.stack([s.text_embedding for s in both]), np.ones(n),
                          np.stack([s.image_embedding for s in both]), np.ones(n))
        out[TEXT_AND_IMAGE] = _summary([s.item_id for s in both], got, want)
    else:
        out[TEXT_AND_IMAGE] = _summary([])
    return out


def worst_parity(parity: dict) -> Optional[tuple]:
    """(signature, cosine, item_id) of the lowest measured cosine, or None when nothing was measured."""
    measured = [(parity[name]["min_cosine"], name) for name in SIGNATURES if parity[name]["items"]]
    if not measured:
        return None
    cosine, name = min(measured)
    return name, cosine, parity[name]["worst_item"]


def parity_problem(parity: dict) -> Optional[str]:
    """Why the query encoder may not ship (worst cosine under the threshold, or vectors that are
    not unit length), or None when it passes."""
    worst = worst_parity(parity)
    if worst is not None and worst[1] < parity["threshold"]:
        name, cosine, item_id = worst
        return f"worst cosine {cosine:.6f} ({name}, item {item_id!r}), under {parity['threshold']}"
    for name in SIGNATURES:
        error = parity[name].get("max_norm_error", 0.0)
        if error > 1.0 - parity["threshold"]:
            return f"{name} vectors are not L2-normalised (length off by up to {error:.6f})"
    return None


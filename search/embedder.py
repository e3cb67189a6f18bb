"""Query embedding: a query's vector, made exactly as the pipeline makes an item's with those modalities.

The release's ``query_encoder`` SavedModel when the manifest names one (its
``text``, ``image`` or ``text_and_image`` signature by what the query has),
else the manifest's encoders and fusion. Images go through the pipeline's own
decoder (pixel limit, EXIF, first frame) and resize.
"""

import os
import threading
from typing import Optional

import numpy as np

from embedding import encoders as enc
from embedding import fusion as fus
from embedding import images as img
from schemas.errors import DataError, VerificationError, brief

# The pipeline cuts an item's text at this many characters (pipelines/transforms.MAX_TEXT_CHARS).
MAX_TEXT_CHARS = 4096
DEFAULT_BATCH_SIZE = 32
# The signatures of a release's query_encoder SavedModel, by the modalities a query has.
QUERY_SIGNATURES = {(True, False): "text", (False, True): "image", (True, True): "text_and_image"}


class QueryError(DataError):
    """One query cannot be answered (no text and no image, an undecodable image...)."""

    reason = "bad_query"


def prepare_text(text) -> Optional[str]:
    if text is None:
        return None
    if not isinstance(text, str):
        raise QueryError(f"text must be a string, not {type(text).__name__}")
    text = text.strip()
    return text[:MAX_TEXT_CHARS] if text else None


class QueryEmbedder:
    """Encoders and fusion of one release: query vectors as the pipeline makes item vectors."""

    def __init__(self, release_dir: str, manifest: dict):
        self.manifest = manifest
        options = manifest.get("options") or {}
        self.max_pixels = int(options.get("max_image_pixels") or img.DEFAULT_MAX_PIXELS)
        self.batch_size = int(options.get("batch_size") or DEFAULT_BATCH_SIZE)
        self.dim = int(manifest["dimension"])
        image_spec = enc.EncoderSpec.from_json(enc.IMAGE, manifest["encoders"][enc.IMAGE])
        self.image_size = tuple(image_spec.image_size or (enc.DEFAULT_IMAGE_SIZE, enc.DEFAULT_IMAGE_SIZE))
        self._query_model = None
        self._text = self._image = self._fusion = None
        self._lock = threading.Lock()
        query_encoder = manifest.get("query_encoder")
        if query_encoder:
            rel = query_encoder.get("path") if isinstance(query_encoder, dict) else query_encoder
            self._load_query_encoder(os.path.join(release_dir, rel))
        else:
            text_spec = enc.EncoderSpec.from_json(enc.TEXT, manifest["encoders"][enc.TEXT])
            # Built-in models come from the model cache ($CATALOG_INDEX_MODEL_CACHE or the user's cache).
            self._text = enc.Encoder(text_spec.handle, enc.TEXT)
            self._image = enc.Encoder(image_spec.handle, enc.IMAGE, image_spec.image_size)
            self.image_size = self._image.image_size
            # Queries go through the query tower of a trained fusion, when the release has one.
            self._fusion = fus.make_fusion(fus.FusionSpec.from_json(manifest["fusion"]).query_spec())

    def _load_query_encoder(self, path: str):
        from embedding.query_encoder import load_saved_model

        try:
            model = load_saved_model(path)  # one loader: it registers tensorflow-text's ops when needed
            self._signatures = {name: model.signatures[name] for name in set(QUERY_SIGNATURES.values())}
        except Exception as e:
            raise VerificationError(f"{path}: not a query encoder with signatures text, image and "
                                    f"text_and_image ({brief(e)})") from None
        self._query_model = model
        _, kwargs = self._signatures["image"].structured_input_signature
        for spec in kwargs.values():  # the image size the query encoder was exported for
            if spec.shape.rank == 4 and spec.shape[1] is not None and spec.shape[2] is not None:
                self.image_size = (int(spec.shape[1]), int(spec.shape[2]))

    def image_input(self, data) -> np.ndarray:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise QueryError(f"image must be bytes, not {type(data).__name__}")
        decoded = img.decode_image(bytes(data), max_pixels=self.max_pixels, min_size=self.image_size)
        return img.to_model_input(decoded, self.image_size)

    def _batches(self, rows):
        for start in range(0, len(rows), self.batch_size):
            yield rows[start:start + self.batch_size]

    def _encode(self, encoder, values, dim_hint=None) -> np.ndarray:
        out = [encoder.encode(list(b) if encoder.kind == enc.TEXT else np.stack(b)) for b in self._batches(values)]
        return np.concatenate(out) if out else np.zeros((0, dim_hint or 1), np.float32)

    def _call_signature(self, name, texts, pixels) -> np.ndarray:
        import tensorflow as tf

        fn = self._signatures[name]
        _, kwargs = fn.structured_input_signature
        feed = {}
        for key, spec in kwargs.items():
            if spec.dtype == tf.string:
                feed[key] = tf.constant([t.encode("utf-8") for t in texts], tf.string)
            else:
                feed[key] = tf.constant(np.asarray(pixels, np.float32))
        out = fn(**feed)
        if isinstance(out, dict):
            out = out.get(fus.OUTPUT, next(iter(out.values())) if len(out) == 1 else None)
            if out is None:
                raise QueryError(f"query encoder signature {name!r} returns no {fus.OUTPUT!r}")
        return fus.l2_normalize(np.asarray(out, np.float32))

    def vectors(self, texts: list, pixels: list) -> np.ndarray:
        """Fused vectors of queries whose text (str or None) and pixels (array or None) are ready."""
        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if self._query_model is not None:
            groups = {}
            for i, (t, p) in enumerate(zip(texts, pixels)):
                groups.setdefault(QUERY_SIGNATURES[(t is not None, p is not None)], []).append(i)
            for name, rows in groups.items():
                for batch in self._batches(rows):
                    out[batch] = self._call_signature(name, [texts[i] for i in batch], [pixels[i] for i in batch])
            return out
        text_rows = [i for i in range(n) if texts[i] is not None]
        image_rows = [i for i in range(n) if pixels[i] is not None]
        spec = self._fusion.spec
        text = np.zeros((n, spec.text_dim), np.float32)
        image = np.zeros((n, spec.image_dim), np.float32)
        text_mask = np.zeros(n, np.float32)
        image_mask = np.zeros(n, np.float32)
        if text_rows:
            text[text_rows] = self._encode(self._text, [texts[i] for i in text_rows])
            text_mask[text_rows] = 1.0
        if image_rows:
            image[image_rows] = self._encode(self._image, [pixels[i] for i in image_rows])
            image_mask[image_rows] = 1.0
        return fus.l2_normalize(self._fusion(text, text_mask, image, image_mask))

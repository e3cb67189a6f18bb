"""Language detection and the `--text-encoder auto` rule: worked examples, catalogs, a cross-lingual check."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import ConfigError
from embedding import languages as lg

ENGLISH = ["Fresh red apples, 1 kg bag from local orchards", "Whole milk, 1 litre bottle",
           "Wholemeal sliced bread, baked every morning", "Strawberry jam with large pieces of fruit",
           "Free range eggs, box of twelve", "Extra virgin olive oil in a glass bottle",
           "Organic carrots washed and ready to cook", "Orange juice without pulp, chilled"]
FRENCH = ["Pommes de terre nouvelles, sachet de 2 kg", "Lait demi-écrémé bio", "Yaourt nature au lait entier",
          "Confiture de fraises extra", "Pain de mie complet", "Jus d'orange sans pulpe", "Fromage de chèvre frais",
          "Poireaux bio de France", "Céleri rave", "Haricots verts extra fins"]
# Short product names: no detector can tell their language alone (Grocery Store class names).
SHORT_NAMES = ["Granny Smith", "Pink Lady", "Royal Gala", "Avocado", "Banana", "Kiwi", "Lemon", "Lime", "Mango",
               "Cantaloupe", "Nectarine", "Orange", "Papaya", "Pineapple", "Plum", "Pomegranate", "Satsumas"]


@pytest.mark.parametrize("text, language", [
    ("苹果", "zh"), ("新鲜红苹果 一公斤", "zh"),
    ("りんごジュース", "ja"), ("青森県産りんご", "ja"),  # Kana alone, Kana with Han
    ("사과 주스", "ko"), ("Φρέσκα μήλα Granny", "el"), ("Μήλα Granny Smith", "latin"), ("Яблоки свежие", "ru"), ("عصير تفاح", "ar"),
    ("תפוחים", "he"), ("सेब का रस", "hi"), ("น้ำแอปเปิ้ล", "th"),
    ("iPhone 手机壳", "zh"),  # mixed: three Han characters outweigh a Latin brand name
    ("Apple iPhone 15 Pro Max case with MagSafe 手机", "latin"),  # two Han characters in an English title
    ("", None), (None, None), ("   ", None), ("😀😀😀", None), ("12345 67,89", None), ("€ 3.99 - 50%", None),
])
def test_script_decides_without_a_model(text, language):
    assert lg.script_language(text) == language


def test_script_counts_weigh_cjk():
    assert lg.script_counts("iPhone 手机") == {"latin": 6, "han": 6}
    assert lg.script_counts("a1!😀") == {"latin": 1}


def test_latin_texts_are_told_apart_by_the_model():
    got = lg.detect(ENGLISH + FRENCH)
    assert got[:len(ENGLISH)] == ["en"] * len(ENGLISH)
    assert got[len(ENGLISH):] == ["fr"] * len(FRENCH)


def test_short_names_stay_undetermined_not_foreign():
    got = lg.detect(SHORT_NAMES)
    assert set(got) == {lg.UNDETERMINED}
    assert lg.choose("auto", SHORT_NAMES).handle == lg.ENGLISH_ENCODER


def test_shares_count_only_texts_with_letters():
    assert lg.shares_of(["en", "en", "zh", None, None]) == {"en": 0.6667, "zh": 0.3333}
    assert lg.shares_of([None]) == {}


def _catalog(english, chinese):
    return ENGLISH * (english // len(ENGLISH)) + ["新鲜水果", "牛奶", "面包", "鸡蛋", "番茄"] * (chinese // 5)


@pytest.mark.parametrize("english, chinese, handle", [
    (96, 0, lg.ENGLISH_ENCODER),
    (96, 5, lg.ENGLISH_ENCODER),  # 5 of 101: 4.95 %, at the threshold
    (96, 10, lg.MULTILINGUAL_ENCODER),  # 10 of 106: 9.4 %
    (0, 50, lg.MULTILINGUAL_ENCODER),
])
def test_auto_rule_threshold(english, chinese, handle):
    choice = lg.choose("auto", _catalog(english, chinese))
    assert choice.handle == handle and choice.rule == "auto"
    assert choice.warning is None
    expected_zh = chinese / (english + chinese)
    assert choice.shares.get("zh", 0) == pytest.approx(expected_zh, abs=1e-4)


def test_explicit_encoder_is_never_overridden_but_warned_about():
    choice = lg.choose(lg.ENGLISH_ENCODER, _catalog(8, 50))
    assert choice.handle == lg.ENGLISH_ENCODER and choice.rule == "explicit"
    assert choice.warning == ("text encoder builtin:minilm-l6-v2 does not cover zh (86% of the texts); "
                              "consider --text-encoder builtin:use-multilingual-v3 (or auto)")
    assert lg.choose("/models/my-own", _catalog(8, 50)).warning is None  # its languages are unknown to us


def test_query_languages_pick_the_multilingual_encoder():
    choice = lg.choose("auto", _catalog(96, 0), languages=("en", "zh"))
    assert choice.handle == lg.MULTILINGUAL_ENCODER and "--languages names zh" in choice.reason
    assert choice.to_json()["languages"] == ["en", "zh"]
    assert lg.choose("auto", _catalog(96, 0), languages=("en",)).handle == lg.ENGLISH_ENCODER
    warned = lg.choose(lg.ENGLISH_ENCODER, _catalog(96, 0), languages=("ja",)).warning
    assert "does not cover ja (--languages)" in warned


def test_a_language_no_builtin_covers_is_warned_about():
    choice = lg.choose("auto", ["Φρέσκα μήλα Granny", "Πορτοκάλια", "Γάλα φρέσκο"] * 10)
    assert choice.handle == lg.MULTILINGUAL_ENCODER
    assert "does not cover el" in choice.warning and "no built-in text encoder covers them" in choice.warning


@pytest.mark.parametrize("value, parsed", [("en,zh", ("en", "zh")), (" EN , zh,en ", ("en", "zh")), (None, ())])
def test_parse_languages(value, parsed):
    assert lg.parse_languages(value) == parsed


@pytest.mark.parametrize("value", ["english", "en,xx", "", ","])
def test_parse_languages_refuses_what_it_does_not_know(value):
    with pytest.raises(ConfigError, match="--languages"):
        lg.parse_languages(value)


def test_sample_texts_spreads_over_files_and_row_groups(tmp_path):
    from pipelines.options import sample_texts

    a = tmp_path / "a.parquet"
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"item_id": [f"a{i}" for i in range(300)], "title": [f"a title {i}" for i in range(300)],
                             "description": [f"about {i}" if i % 2 else None for i in range(300)]}),
                   a, row_group_size=50)
    bad = b"caf\xe9"  # not UTF-8: sampled with a replacement character, never a crash
    offsets = np.cumsum([0] + [len(bad)] * 100).astype(np.int32)
    titles = pa.Array.from_buffers(pa.string(), 100, [None, pa.py_buffer(offsets.tobytes()),
                                                      pa.py_buffer(bad * 100)])
    pq.write_table(pa.table({"item_id": [f"b{i}" for i in range(100)], "title": titles}), b)
    got = sample_texts([str(a), str(b)], [300, 100], n=40)
    assert len(got) == 40
    assert got[:30] == [f"a title {i}" + (f"\nabout {i}" if i % 2 else "") for i in range(0, 300, 10)]
    assert got[30:] == ["caf\ufffd"] * 10
    assert sample_texts([str(a)], [300], n=5000) == sample_texts([str(a)], [300], n=300)  # capped at the rows


def test_cross_lingual_twins_with_the_multilingual_model(builtin_cache):
    """Product names written for this test: each Chinese name finds its English twin first."""
    from embedding import encoders as enc

    pairs = [("red apples", "红苹果"), ("bananas", "香蕉"), ("whole milk", "全脂牛奶"), ("tomatoes", "番茄"),
             ("chicken eggs", "鸡蛋"), ("white rice", "白米"), ("orange juice", "橙汁"), ("green tea", "绿茶"),
             ("motor oil", "机油"), ("running shoes", "跑鞋")]
    encoder = enc.Encoder(lg.MULTILINGUAL_ENCODER, enc.TEXT, model_cache=builtin_cache)
    english = encoder.encode([e for e, _ in pairs])
    chinese = encoder.encode([c for _, c in pairs])
    english = english / np.linalg.norm(english, axis=1, keepdims=True)
    chinese = chinese / np.linalg.norm(chinese, axis=1, keepdims=True)
    best = (chinese @ english.T).argmax(axis=1)
    assert best.tolist() == list(range(len(pairs)))

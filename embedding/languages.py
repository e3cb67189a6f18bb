"""Which languages a catalog's texts are in, and which built-in text encoder fits them.

``--text-encoder auto`` (the default) samples the catalog's texts at validation and
picks ``builtin:minilm-l6-v2`` (English only, the better English model) for
English-dominant catalogs and ``builtin:use-multilingual-v3`` otherwise. An explicit
encoder is never overridden; when it does not cover the catalog's languages, one
warning line says so.

Detection, per text:
- letters are counted by Unicode script (digits, punctuation and emoji are not letters;
  a text without letters has no language). A non-Latin script that holds at least half
  the letters (CJK characters count 3 each: one is about a word) decides: Han -> zh,
  any Kana -> ja, Hangul -> ko, Cyrillic -> ru, Greek -> el, Arabic -> ar, Hebrew -> he,
  Devanagari -> hi, Thai -> th.
- Latin-script texts go to py3langid (a maintained fork of langid.py, model bundled,
  no network) restricted to Latin-script languages. Short product titles are too short
  for any detector (alone, 68 of the 81 Grocery product names come out non-English), so
  texts under LONG_TEXT letters are classified in consecutive groups of at least
  CHUNK_LETTERS letters, and a group's language counts for each of its texts only when
  the detector is at least MIN_CONFIDENCE sure; otherwise they are "und" (undetermined
  Latin), counted with English for the choice.

Choice: the multilingual model when more than NON_ENGLISH_SHARE of the texts with
letters are confidently not English, or when ``--languages`` names a language other
than English (queries in another language than the catalog need it too).
"""

import collections
import dataclasses
import logging
import re
import threading
import time
from typing import Dict, List, Optional, Sequence

from schemas.errors import ConfigError

_log = logging.getLogger(__name__)

NON_ENGLISH_SHARE = 0.05
MIN_CONFIDENCE = 0.9
LONG_TEXT = 80  # letters: classified alone
CHUNK_LETTERS = 120  # letters per group of short texts
MAX_CHARS = 150  # a text's head is enough to tell its language (and bounds the cost)
UNDETERMINED = "und"

ENGLISH_ENCODER = "builtin:minilm-l6-v2"
MULTILINGUAL_ENCODER = "builtin:use-multilingual-v3"
# What the built-in text encoders were trained on (USE multilingual v3: its 16 languages).
COVERAGE = {
    ENGLISH_ENCODER: frozenset({"en"}),
    MULTILINGUAL_ENCODER: frozenset({"ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th",
                                     "tr", "zh"}),
}
# Latin-script languages the detector chooses among (USE's, plus common ones it lacks, so
# that a Swedish catalog is not forced into a French or German label).
LATIN_LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "tr", "sv", "da", "no", "fi", "cs", "sk", "ro",
                   "hu", "hr", "sl", "id", "ms", "vi", "ca", "et", "lv", "lt", "sq", "af", "tl")
_BY_SCRIPT = {"han": "zh", "kana": "ja", "hangul": "ko", "cyrillic": "ru", "greek": "el", "arabic": "ar",
              "hebrew": "he", "devanagari": "hi", "thai": "th"}
_CJK = frozenset({"han", "kana", "hangul"})
_RANGES = (  # (first, last, script), sorted; everything alphabetic outside them is "other"
    (0x0041, 0x024F, "latin"), (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x08A0, 0x08FF, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0E00, 0x0E7F, "thai"), (0x1100, 0x11FF, "hangul"),
    (0x1E00, 0x1EFF, "latin"), (0x1F00, 0x1FFF, "greek"), (0x3040, 0x309F, "kana"), (0x30A0, 0x30FF, "kana"),
    (0x3130, 0x318F, "hangul"), (0x31F0, 0x31FF, "kana"), (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"),
    (0xAC00, 0xD7AF, "hangul"), (0xF900, 0xFAFF, "han"), (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0xFF21, 0xFF5A, "latin"), (0xFF66, 0xFF9F, "kana"), (0x20000, 0x2FFFF, "han"),
)
_LETTER = re.compile(r"[^\W\d_]")  # a Unicode letter (what str.isalpha() says), found in C
_SCRIPT_RES = {}
for _first, _last, _script in _RANGES:
    _SCRIPT_RES.setdefault(_script, []).append(f"\\U{_first:08x}-\\U{_last:08x}")
_SCRIPT_RES = {script: re.compile("[" + "".join(parts) + "]") for script, parts in _SCRIPT_RES.items()}
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def script_counts(text: str) -> Dict[str, int]:
    """Letters per script (CJK characters weigh 3); letters of other scripts count as "other"."""
    text = text or ""
    if text.isascii():  # the common case, without a per-script pass
        n = len(_ASCII_LETTER.findall(text))
        return {"latin": n} if n else {}
    letters = "".join(_LETTER.findall(text))
    counts, seen = {}, 0
    for script, pattern in _SCRIPT_RES.items():
        n = len(pattern.findall(letters))
        if n:
            counts[script] = n * 3 if script in _CJK else n
            seen += n
    if len(letters) > seen:
        counts["other"] = len(letters) - seen
    return counts


def script_of(char: str) -> str:
    """The script of one character, as script_counts classifies it."""
    for script, pattern in _SCRIPT_RES.items():
        if pattern.match(char):
            return script
    return "other"


def script_language(text: str) -> Optional[str]:
    """The language a non-Latin script decides, "latin" for Latin-script text, None without letters."""
    counts = script_counts(text)
    total = sum(counts.values())
    if not total:
        return None
    if counts.get("kana", 0) and counts.get("kana", 0) + counts.get("han", 0) >= total / 2:
        return "ja"  # Japanese mixes Kana with Han; Chinese has no Kana
    script, weight = max(counts.items(), key=lambda kv: (kv[1], kv[0] != "latin"))
    if script == "latin" and weight * 2 > total:
        return "latin"
    non_latin = {s: w for s, w in counts.items() if s != "latin"}
    script, weight = max(non_latin.items(), key=lambda kv: kv[1])
    if weight * 2 >= total:
        return _BY_SCRIPT.get(script, UNDETERMINED)
    return "latin"


_identifier = None
_identifier_lock = threading.Lock()


def _latin_identifier():
    """py3langid's model, restricted to Latin-script languages; loaded once per process (~0.5 s)."""
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            ident.set_languages([lang for lang in LATIN_LANGUAGES if lang in ident.nb_classes])
            _identifier = ident
        return _identifier


def preload() -> threading.Thread:
    """Loads the detector's model on a thread, so it overlaps other validation work."""
    thread = threading.Thread(target=_latin_identifier, name="load-language-model", daemon=True)
    thread.start()
    return thread


def _letters(text: str) -> int:
    return len(_LETTER.findall(text))


def detect(texts: Sequence[Optional[str]]) -> List[Optional[str]]:
    """One language code per text (None: no letters; "und": Latin, undetermined)."""
    texts = [(t or "")[:MAX_CHARS] for t in texts]
    out: List[Optional[str]] = [script_language(t) for t in texts]
    latin = [i for i, lang in enumerate(out) if lang == "latin"]
    if not latin:
        return out
    ident = _latin_identifier()

    def decide(indices, text):
        lang, confidence = ident.classify(text)
        for i in indices:
            out[i] = lang if confidence >= MIN_CONFIDENCE else UNDETERMINED

    group, letters = [], 0
    for i in latin:
        n = _letters(texts[i])
        if n >= LONG_TEXT:
            decide([i], texts[i])
            continue
        group.append(i)
        letters += n
        if letters >= CHUNK_LETTERS:
            decide(group, " ; ".join(texts[j] for j in group))
            group, letters = [], 0
    if group:
        decide(group, " ; ".join(texts[j] for j in group))
    return out


def parse_languages(value: Optional[str]) -> tuple:
    """``--languages en,zh`` -> ("en", "zh"); ConfigError on anything that is not a known code."""
    if value is None:
        return ()
    known = set(LATIN_LANGUAGES) | set(_BY_SCRIPT.values()) | set().union(*COVERAGE.values())
    codes = tuple(dict.fromkeys(c.strip().lower() for c in value.split(",") if c.strip()))
    unknown = [c for c in codes if c not in known]
    if not codes or unknown:
        raise ConfigError(f"--languages {value!r}: {', '.join(unknown) or 'empty'} not understood; give ISO 639-1 "
                          f"codes separated by commas, e.g. en,zh (known: {', '.join(sorted(known))})")
    return codes


@dataclasses.dataclass(frozen=True)
class TextEncoderChoice:
    """What ``--text-encoder`` resolved to and why; the manifest's ``encoders.text.chosen_by``."""

    handle: str
    rule: str  # "auto" or "explicit"
    reason: str
    sampled: int
    shares: Dict[str, float]  # language -> share of the sampled texts that have letters
    languages: tuple = ()  # --languages (query languages), if given
    warning: Optional[str] = None
    seconds: float = 0.0  # what detection cost, waiting for the detector's model included

    def to_json(self) -> dict:
        out = {"rule": self.rule, "reason": self.reason, "sampled": self.sampled, "shares": self.shares}
        if self.languages:
            out["languages"] = list(self.languages)
        return out

    def describe(self) -> str:
        top = ", ".join(f"{lang} {share:.0%}" if share >= 0.1 else f"{lang} {share:.1%}"
                        for lang, share in list(self.shares.items())[:4]) or "no text"
        return f"{self.handle} ({self.rule}: {self.reason}; {top} of {self.sampled} sampled texts)"


def shares_of(languages: Sequence[Optional[str]]) -> Dict[str, float]:
    counted = [lang for lang in languages if lang is not None]
    if not counted:
        return {}
    counts = collections.Counter(counted)
    return {lang: round(n / len(counted), 4) for lang, n in counts.most_common()}


def choose(requested: str, texts: Sequence[Optional[str]], languages: Sequence[str] = ()) -> TextEncoderChoice:
    """Resolves ``--text-encoder`` (``auto`` or a handle) against a sample of the catalog's texts."""
    started = time.perf_counter()
    shares = shares_of(detect(texts))
    seconds = time.perf_counter() - started
    non_english = {lang: s for lang, s in shares.items() if lang not in ("en", UNDETERMINED)}
    non_english_share = sum(non_english.values())
    foreign_queries = [lang for lang in languages if lang != "en"]
    if requested != "auto":
        handle, rule, reason = requested, "explicit", "given by --text-encoder"
    elif foreign_queries:
        handle, rule = MULTILINGUAL_ENCODER, "auto"
        reason = f"--languages names {', '.join(foreign_queries)}"
    elif non_english_share > NON_ENGLISH_SHARE:
        handle, rule = MULTILINGUAL_ENCODER, "auto"
        reason = f"{non_english_share:.0%} of the texts are not English (over {NON_ENGLISH_SHARE:.0%})"
    else:
        handle, rule = ENGLISH_ENCODER, "auto"
        reason = f"English-dominant ({non_english_share:.0%} not English, at most {NON_ENGLISH_SHARE:.0%})"
    return TextEncoderChoice(handle, rule, reason, len(texts), shares, tuple(languages),
                             _coverage_warning(handle, non_english, languages), seconds)


def _coverage_warning(handle: str, non_english: Dict[str, float], languages: Sequence[str]) -> Optional[str]:
    covered = COVERAGE.get(handle)
    if covered is None:  # a user's own model: its languages are unknown to us
        return None
    missing = {lang: s for lang, s in non_english.items() if lang not in covered and s > NON_ENGLISH_SHARE}
    missing.update({lang: None for lang in languages if lang not in covered})
    if not missing:
        return None
    what = ", ".join(f"{lang} ({s:.0%} of the texts)" if s is not None else f"{lang} (--languages)"
                     for lang, s in missing.items())
    better = [h for h, langs in COVERAGE.items() if h != handle and set(missing) <= langs]
    hint = (f"consider --text-encoder {better[0]} (or auto)" if better
            else "no built-in text encoder covers them; pass a --text-encoder that does")
    return f"text encoder {handle} does not cover {what}; {hint}"

"""ASR text normalisation per language, so WER/CER measure recognition errors and not formatting.

English goes through Whisper's English normaliser (spelling variants, numbers, contractions: what
published WERs use). Chinese is converted to simplified (zh-cn), full-width folded to half-width,
punctuation removed and scored per character, as the official Qwen-Audio evaluation does. Mixed text
keeps each CJK character and each Latin word as one unit, so "我用iPhone打电话" is 6 units, not 13.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import cache
from typing import Literal

import zhconv

Unit = Literal["word", "char"]

_TAG = re.compile(r"<\|[^|>]*\|>")
_CJK_CHAR = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\U00020000-\U0002fa1f"
)
_CJK = re.compile(f"[{_CJK_CHAR}]")
_UNIT = re.compile(f"[{_CJK_CHAR}]|[^\\s{_CJK_CHAR}]+")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
# Scripts written without spaces: scored per character.
CHAR_LANGUAGES = frozenset({"zh", "yue", "ja", "ko", "th", "lo", "my", "km"})
_ALIASES = {
    "cmn": "zh",
    "chinese": "zh",
    "mandarin": "zh",
    "cantonese": "yue",
    "english": "en",
    "eng": "en",
    "japanese": "ja",
    "korean": "ko",
}


def strip_tags(text: str) -> str:
    """Remove special tokens like <|en|> or <|endoftext|> that some models leave in transcripts."""
    return _TAG.sub(" ", text or "")


def canonical_language(language: str | None) -> str | None:
    """'zh-CN', 'cmn', 'Chinese' -> 'zh'; 'en-US' -> 'en'; None or blank -> None."""
    if language is None or not language.strip():
        return None
    code = language.strip().lower().replace("_", "-")
    code = _ALIASES.get(code, code)
    base = code.split("-")[0]
    return _ALIASES.get(base, base)


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among the units (CJK characters + Latin words) of `text`."""
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN_WORD.findall(text))
    return cjk / (cjk + latin) if cjk + latin else 0.0


def detect_language(text: str) -> str:
    """'zh' when at least half of the units are CJK characters, else 'en' (used when no language is given)."""
    return "zh" if cjk_ratio(strip_tags(text)) >= 0.5 else "en"


def unit_for(language: str) -> Unit:
    """Characters for scripts without spaces (CER), words otherwise (WER)."""
    return "char" if language in CHAR_LANGUAGES else "word"


@cache
def _english_normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@cache
def _basic_normalizer() -> Callable[[str], str]:
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def _fold(text: str) -> str:
    """Simplified Chinese, half-width forms, lower case."""
    return unicodedata.normalize("NFKC", zhconv.convert(text, "zh-cn")).lower()


def _drop_punctuation(text: str) -> str:
    """Punctuation and symbols become spaces; apostrophes inside words are kept (don't, it's)."""
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
            out.append(ch)
        elif cat[0] in "PSZ" or cat in ("Cc", "Cf"):
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def tokenize(text: str, language: str) -> list[str]:
    """Scoring units of `text` after normalisation for `language` (a canonical code, e.g. 'en', 'zh')."""
    text = strip_tags(text)
    if unit_for(language) == "char":
        return _UNIT.findall(_drop_punctuation(_fold(text)))
    if language == "en":
        normalized = _english_normalizer()(unicodedata.normalize("NFKC", text))
    else:
        normalized = _basic_normalizer()(unicodedata.normalize("NFKC", text))
    # CJK inside an English transcript still counts one unit per character
    return _UNIT.findall(_drop_punctuation(normalized))


def normalize_text(text: str, language: str) -> str:
    """The normalised text that is scored (units joined: CJK without spaces, Latin words with one)."""
    return join_units(tokenize(text, language))


def join_units(units: list[str] | tuple[str, ...]) -> str:
    """Join scoring units back into readable text: no space between two CJK characters."""
    out = ""
    for unit in units:
        if out and not (_CJK.fullmatch(out[-1]) and _CJK.fullmatch(unit[0])):
            out += " "
        out += unit
    return out

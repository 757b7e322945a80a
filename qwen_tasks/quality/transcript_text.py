"""ASR text normalisation per language, so WER/CER measure recognition errors and not formatting.

This is the default scoring mode (`cer` / `wer`): a difference in formatting only scores 0 errors, a
different, missing or extra word never does. English goes through Whisper's English normaliser
(spelling variants, numbers, contractions: what published WERs use) plus what it misses: okay / OK /
O.K., cannot / can't, contractions typed without their apostrophe (dont, im, theyre; not the ambiguous
its / ill / were), curly apostrophes, dotted acronyms (U.S.A. = USA) and clock times with a.m./p.m.
(3:30 p.m. = three thirty pm, 3:00 pm = 3 pm). Chinese is converted to simplified (zh-cn), full-width
folded to half-width, numbers brought to one spoken form with WeNet's WeTextProcessing (5号 = 五号,
1990年 = 一九九零年, 20% = 百分之二十, 110 = 幺幺零 = 一一零), punctuation removed and scored per
character. Mixed text keeps each CJK character and each Latin word as one unit, so "我用iPhone打电话"
is 6 units, not 13. The official Qwen2-Audio scoring (`cer_official` / `wer_official`) is
`official_asr`.
"""

from __future__ import annotations

import logging
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


# --- English: what Whisper's normaliser leaves as formatting differences ---------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# U.S.A. / a.m. / O.K. / e.g. -> USA / am / OK / eg (single letters joined by dots, before Whisper, which
# would read the O of O.K. as a zero and split the rest into letters)
_DOTTED_ACRONYM = re.compile(r"(?<![\w.])[A-Za-z](?:\.[A-Za-z])+\.?(?!\w)")
# after Whisper: "3 30 pm" (from 3:30 p.m.), "330 pm" (from "three thirty pm"), "3 p m"
_CLOCK_SPLIT = re.compile(r"\b(\d{1,2}) (\d{1,2}) ([ap]m)\b")
_CLOCK_SPOKEN = re.compile(r"\b(\d{1,2})(\d{2}) ([ap]m)\b")
_AM_PM_SPACED = re.compile(r"(\d) ([ap]) m\b")
_WORD_FOLDS = {"ok": ("okay",), "okey": ("okay",), "okeh": ("okay",), "cannot": ("can", "not")}
# Contractions typed without the apostrophe, each read as its apostrophe form (whatever Whisper expands
# that to: don't -> do not). Only the unambiguous ones: its / ill / hell / shell / were / well / wed are
# words of their own, and "hes" / "shes" / "id" / "lets" too close to other words to guess.
_APOSTROPHE_LESS = {
    word: word[: -len(tail)] + "'" + tail
    for tail, words in {
        "t": ("dont", "doesnt", "didnt", "cant", "wont", "isnt", "arent", "wasnt", "werent", "couldnt",
              "shouldnt", "wouldnt", "hasnt", "havent", "hadnt", "mustnt", "neednt"),
        "m": ("im",),
        "ve": ("ive", "weve", "youve", "theyve", "couldve", "shouldve", "wouldve"),
        "re": ("youre", "theyre"),
    }.items()
    for word in words
}  # fmt: skip


@cache
def _apostrophe_less_folds() -> dict[str, tuple[str, ...]]:
    """dont -> ("do", "not"): each typed form folded to the units of its apostrophe form."""
    english = _english_normalizer()
    return {word: tuple(english(spelled).split()) for word, spelled in _APOSTROPHE_LESS.items()}


def _english_before(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    return _DOTTED_ACRONYM.sub(lambda m: m.group(0).replace(".", ""), text)


def _clock(match: re.Match[str]) -> str:
    hour, minute, half = int(match.group(1)), int(match.group(2)), match.group(3)
    if not (hour <= 12 and minute < 60):
        return match.group(0)
    return f"{hour} {half}" if minute == 0 else f"{hour} {minute} {half}"


def _english_after(normalized: str) -> str:
    normalized = _AM_PM_SPACED.sub(r"\1 \2m", normalized)
    normalized = _CLOCK_SPLIT.sub(_clock, normalized)
    return _CLOCK_SPOKEN.sub(_clock, normalized)


# --- Chinese: numbers in one spoken form (WeTextProcessing) --------------------------------------------

# WeTextProcessing's shipped grammars delete the fillers 呃/啊 and the erhua 儿; a dropped or added
# syllable is a recognition error here, so they are hidden behind private-use code points while the
# grammars run (rebuilding the grammars without those rules would cost ~15 s on first use).
_HIDE = str.maketrans({"呃": "\ue000", "啊": "\ue001", "儿": "\ue002"})
_UNHIDE = str.maketrans({"\ue000": "呃", "\ue001": "啊", "\ue002": "儿"})
_NUMERAL = "零一二三四五六七八九十百千万亿两幺"
# two numeral characters (possibly joined by 点 or 分之): what WeTextProcessing's ITN turns into digits
_NUMERAL_PAIR = re.compile(f"[{_NUMERAL}](?:点|分之)?[{_NUMERAL}]")
_DIGIT = re.compile(r"\d")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_ZERO_CIRCLE = re.compile(r"〇|(?<=[零一二三四五六七八九])○|○(?=[零一二三四五六七八九])")


@cache
def _wetext() -> tuple[Callable[[str], str], Callable[[str], str]]:
    """WeTextProcessing's Chinese inverse normaliser (words -> digits) and normaliser (digits -> words)."""
    from itn.chinese.inverse_normalizer import InverseNormalizer
    from tn.chinese.normalizer import Normalizer

    logging.getLogger("wetext").setLevel(logging.WARNING)  # it logs every grammar load at INFO
    return InverseNormalizer().normalize, Normalizer().normalize


# Numbers, and how much context the grammars need around them: the inverse normaliser needs what
# follows a numeral (十一点半, 二零二三年, 百分之二十 is in the match itself), the normaliser what
# precedes and follows digits (第2天, 下午3点, 12岁, 3.5公里). Each window is its own grammar call:
# joining windows into one longer input costs more per window, not less (3.7 ms a window alone,
# 15.9 ms in calls of 256).
_NUMERAL_RUN = re.compile(f"[{_NUMERAL}](?:(?:点|分之)?[{_NUMERAL}])+")
_DIGIT_RUN = re.compile(r"\d+(?:[.:/]\d+)*%?")


def _windows(text: str, pattern: re.Pattern[str], left: int, right: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for piece in _CLAUSE_PIECE.finditer(text):
        for m in pattern.finditer(piece.group(0)):
            start = piece.start() + max(0, m.start() - left)
            end = piece.start() + min(len(piece.group(0)), m.end() + right)
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
    return spans


def _apply(text: str, pattern: re.Pattern[str], left: int, right: int, grammar: Callable[[str], str]) -> str:
    spans = _windows(text, pattern, left, right)
    if not spans:
        return text
    cache = _WINDOW_CACHE.setdefault(grammar, {})
    if len(cache) > 200_000:
        cache.clear()
    out, pos = [], 0
    for a, b in spans:
        window = text[a:b]
        if window not in cache:
            cache[window] = grammar(window)
        out += [text[pos:a], cache[window]]
        pos = b
    return "".join(out) + text[pos:]


_WINDOW_CACHE: dict[Callable[[str], str], dict[str, str]] = {}
_CLAUSE_PIECE = re.compile(r"[^\s,。!?;、\"'“”‘’()（）《》〈〉「」『』【】\[\]…—~]+")


def _numbers_prepared(text: str) -> str:
    return _ZERO_CIRCLE.sub("零", _THOUSANDS.sub("", text)).translate(_HIDE)


def spoken_numbers(text: str) -> str:
    """Chinese text with every number in one canonical spoken form: digits and all the ways of reading
    them (一万两千 / 一万二千 / 12000, 二〇二三年 / 2023年, 十一点半 / 11:30) give the same characters."""
    text = _numbers_prepared(text)
    if not (_NUMERAL_PAIR.search(text) or _DIGIT.search(text)):
        return text.translate(_UNHIDE)
    inverse, forward = _wetext()
    text = _apply(text, _NUMERAL_RUN, 0, 2, inverse)  # 一万两千 -> 12000, 十一点半 -> 11:30
    text = _apply(text, _DIGIT_RUN, 2, 3, forward)  # 12000 -> 一万二千, 11:30 -> 十一点三十分
    # WeTextProcessing reads 第2天 as 第两天 (2 before a measure word is 两, but not after 第)
    return text.translate(_UNHIDE).replace("第两", "第二")


def tokenize(text: str, language: str) -> list[str]:
    """Scoring units of `text` after normalisation for `language` (a canonical code, e.g. 'en', 'zh')."""
    text = strip_tags(text)
    if unit_for(language) == "char":
        text = _fold(text)
        if language in ("zh", "yue"):
            text = spoken_numbers(text)
        return _UNIT.findall(_drop_punctuation(text))
    if language == "en":
        normalized = _english_after(_english_normalizer()(_english_before(text)))
    else:
        normalized = _basic_normalizer()(unicodedata.normalize("NFKC", text))
    # CJK inside an English transcript still counts one unit per character
    units = _UNIT.findall(_drop_punctuation(normalized))
    if language == "en":
        folds = {**_apostrophe_less_folds(), **_WORD_FOLDS}
        units = [folded for unit in units for folded in folds.get(unit, (unit,))]
    return units


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

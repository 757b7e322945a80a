"""ASR text normalisation: English (Whisper), Chinese (simplified, half-width, no punctuation), mixed."""

from __future__ import annotations

import pytest

from qwen_tasks.textnorm import (
    canonical_language,
    cjk_ratio,
    detect_language,
    join_units,
    normalize_text,
    strip_tags,
    tokenize,
    unit_for,
)


def test_english_uses_whisper_normaliser() -> None:
    assert tokenize("Hello, Mr. Smith! It's 5 PM.", "en") == [
        "hello",
        "mister",
        "smith",
        "it",
        "is",
        "5",
        "pm",
    ]
    assert tokenize("The colour is GREY.", "en") == tokenize("the color is gray", "en")


def test_chinese_traditional_full_width_and_punctuation() -> None:
    assert tokenize("今天天氣很好，對嗎？", "zh") == list("今天天气很好对吗")
    assert tokenize("ＡＢＣ　１２３。", "zh") == ["abc", "123"]
    assert normalize_text("我用 iPhone 打電話！", "zh") == "我用 iphone 打电话"


def test_mixed_text_units() -> None:
    units = tokenize("我今天用iPhone打电话 OK", "zh")
    assert units == ["我", "今", "天", "用", "iphone", "打", "电", "话", "ok"]
    assert join_units(units) == "我今天用 iphone 打电话 ok"
    # CJK inside an English transcript still counts per character
    assert tokenize("I said 你好 to him", "en") == ["i", "said", "你", "好", "to", "him"]


def test_special_tags_are_removed() -> None:
    assert strip_tags("<|en|>hello<|endoftext|>").split() == ["hello"]
    assert tokenize("<|zh|>你好<|endoftext|>", "zh") == ["你", "好"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("zh-CN", "zh"),
        ("cmn", "zh"),
        ("Chinese", "zh"),
        ("en_US", "en"),
        ("English", "en"),
        ("", None),
        (None, None),
    ],
)
def test_canonical_language(raw: str | None, code: str | None) -> None:
    assert canonical_language(raw) == code


def test_detect_language_by_cjk_ratio() -> None:
    assert detect_language("今天天气很好") == "zh"
    assert detect_language("我用iPhone打电话") == "zh"
    assert detect_language("the quick brown fox") == "en"
    assert detect_language("the word 你 is short") == "en"
    assert cjk_ratio("") == 0.0
    assert unit_for("zh") == "char" and unit_for("ja") == "char" and unit_for("fr") == "word"


def test_other_word_languages_use_the_basic_normaliser() -> None:
    assert tokenize("Bonjour, le monde!", "fr") == ["bonjour", "le", "monde"]

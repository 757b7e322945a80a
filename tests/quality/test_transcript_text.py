"""ASR text normalisation: English (Whisper), Chinese (simplified, half-width, no punctuation), mixed."""

from __future__ import annotations

import pytest

from qwen_tasks.quality.transcript_text import (
    canonical_language,
    cjk_ratio,
    detect_language,
    join_units,
    normalize_text,
    spoken_numbers,
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
    assert tokenize("ＡＢＣ　１２３。", "zh") == ["abc", *"一百二十三"]  # numbers are read out
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


def test_chinese_numbers_have_one_spoken_form() -> None:
    # every way of writing or reading a number gives the same characters
    forms = {spoken_numbers(t) for t in ("工资12000", "工资一万两千", "工资一万二千")}
    assert forms == {"工资一万二千"}
    assert spoken_numbers("二〇二三年") == spoken_numbers("2023年") == "二零二三年"
    assert spoken_numbers("十一点半") == spoken_numbers("11:30")
    assert spoken_numbers("第2天") == "第二天"  # WeTextProcessing alone says 第两天
    # words that merely contain numerals, fillers and erhua stay as they are
    for text in ("一心一意", "万一下雨", "三心二意", "呃，那边儿有人啊", "今天天气很好"):
        assert spoken_numbers(text) == text


def test_english_formatting_variants() -> None:
    assert tokenize("OK", "en") == tokenize("O.K.", "en") == tokenize("okay", "en") == ["okay"]
    assert tokenize("can't", "en") == tokenize("cannot", "en") == ["can", "not"]
    assert tokenize("U.S.A. and e.g.", "en") == ["usa", "and", "eg"]
    assert tokenize("3:30 p.m.", "en") == tokenize("three thirty PM", "en") == ["3", "30", "pm"]
    assert tokenize("3:00 a.m.", "en") == tokenize("3 am", "en") == ["3", "am"]
    assert tokenize("25:70 pm", "en") == ["25", "70", "pm"]  # not a clock time: left alone

"""WER/CER against hand-computed values, corpus totals, substitution pairs, and both scoring modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_tasks.quality.official_asr import official_units
from qwen_tasks.quality.scoring import corpus_score, score_utterance, top_substitutions


def test_english_wer_hand_computed() -> None:
    s = score_utterance("The cat sat on the mat.", "the cat sit on mat", "en")
    assert (s.unit, s.n_ref, s.substitutions, s.deletions, s.insertions) == ("word", 6, 1, 1, 0)
    assert s.error_rate == pytest.approx(2 / 6)
    assert s.pairs == (("sat", "sit"),)
    # normalisation: case, punctuation and spelling variants are not errors
    assert score_utterance("Hello, Mr. Smith!", "hello mister smith", "en").error_rate == 0


def test_insertions_count() -> None:
    s = score_utterance("a b c", "a b c d e", "en")
    assert (s.insertions, s.error_rate) == (2, pytest.approx(2 / 3))


def test_traditional_reference_simplified_hypothesis_is_zero_cer() -> None:
    s = score_utterance("今天天氣很好，我們去公園。", "今天天气很好我们去公园", "zh")
    assert (s.unit, s.n_ref, s.errors, s.error_rate) == ("char", 11, 0, 0.0)


def test_chinese_cer_hand_computed_and_paraphrase_pair() -> None:
    s = score_utterance("我今天很高兴", "我今天很开心", "zh")
    assert (s.n_ref, s.substitutions, s.deletions, s.insertions) == (6, 2, 0, 0)
    assert s.error_rate == pytest.approx(2 / 6)
    assert s.pairs == (("高兴", "开心"),)
    d = score_utterance("我们今天去公园", "我们去公园了", "zh")  # 今天 deleted, 了 inserted
    assert (d.deletions, d.insertions, d.substitutions, d.pairs) == (2, 1, 0, ())


def test_language_detected_when_missing() -> None:
    assert score_utterance("我很高兴", "我很开心", None).language == "zh"
    assert score_utterance("good morning", "good morning", None).language == "en"


def test_empty_reference_and_hypothesis() -> None:
    empty_ref = score_utterance("", "extra words", "en")
    assert empty_ref.n_ref == 0 and empty_ref.insertions == 2 and empty_ref.error_rate is None
    empty_hyp = score_utterance("two words", None, "en")
    assert (empty_hyp.deletions, empty_hyp.error_rate) == (2, 1.0)


def test_corpus_is_total_edits_over_total_reference() -> None:
    scores = [
        score_utterance("a b c d", "a x c d", "en"),  # 1 of 4
        score_utterance("one", "two", "en"),  # 1 of 1
    ]
    corpus = corpus_score(scores)
    assert corpus.error_rate == pytest.approx(2 / 5)  # not the mean of 0.25 and 1.0
    assert corpus.as_dict()["substitutions"] == 2
    assert corpus_score([]).error_rate is None


def test_top_substitutions_counts_paraphrases() -> None:
    scores = [
        score_utterance("我很高兴", "我很开心", "zh"),
        score_utterance("他们都很高兴", "他们都很开心", "zh"),
        score_utterance("very happy", "quite glad", "en"),
        score_utterance("天气好", "天气好", "zh"),
    ]
    assert top_substitutions(scores) == [("高兴", "开心", 2), ("very happy", "quite glad", 1)]
    assert top_substitutions(scores, n=1) == [("高兴", "开心", 2)]


# --- default mode: formatting scores 0, recognition errors never do -------------------------------------

FORMATTING_ONLY = [
    # Chinese numerals: digits and their spoken forms (WeTextProcessing)
    ("zh", "我5号去北京", "我五号去北京"),
    ("zh", "他1990年出生", "他一九九零年出生"),
    ("zh", "她今年12岁了", "她今年十二岁了"),
    ("zh", "利润增长了20%", "利润增长了百分之二十"),
    ("zh", "大约2.5公里", "大约二点五公里"),
    ("zh", "他得了第2名，第2天就走了", "他得了第二名第二天就走了"),
    ("zh", "请拨打110", "请拨打幺幺零"),
    ("zh", "请拨打110", "请拨打一一零"),
    ("zh", "号码是13812345678", "号码是幺三八幺二三四五六七八"),
    ("zh", "会议在2023年5月3日召开", "会议在二〇二三年五月三日召开"),
    ("zh", "有2000多人", "有两千多人"),
    ("zh", "一共有3,000人", "一共有三千人"),
    ("zh", "工资是一万两千", "工资是12000"),
    ("zh", "十一点半见", "11:30见"),
    ("zh", "大约3.5KM", "大约三点五公里"),
    # Chinese decimals and percentages in words or digits
    ("zh", "三点五", "3.5"),
    ("zh", "零点五", "0.5"),
    ("zh", "百分之三点五", "3.5%"),
    ("zh", "利率下调了零点五个百分点", "利率下调了0.5个百分点"),
    ("zh", "增长了百分之零点五", "增长了0.5%"),
    # Chinese script and width
    ("zh", "今天天氣很好，我們去公園。", "今天天气很好我们去公园"),
    ("zh", "我用ＡＢＣ打字", "我用abc打字"),
    ("zh", "我用iPhone打电话", "我用 iphone 打电话"),
    # English
    ("en", "OK, let's go.", "okay let us go"),
    ("en", "O.K. then", "ok then"),
    ("en", "I can't do it", "I cannot do it"),
    ("en", "I don’t know", "I do not know"),
    ("en", "It isn't here", "it is not here"),
    ("en", "the U.S.A. is big", "the USA is big"),
    ("en", "the F.B.I. agent", "the fbi agent"),
    ("en", "We'll meet at 3:30 p.m.", "we will meet at three thirty pm"),
    ("en", "at 3:00 p.m.", "at 3 PM"),
    ("en", "at 10:05 a.m.", "at ten oh five am"),
    ("en", "it's 5pm", "it is five p.m."),
    # contractions typed without their apostrophe (the unambiguous ones)
    ("en", "I don't know", "I dont know"),
    ("en", "she doesn't care and he didn't ask", "she doesnt care and he didnt ask"),
    ("en", "we can't, they won't", "we cant they wont"),
    ("en", "it isn't, they aren't, it wasn't, we weren't", "it isnt they arent it wasnt we werent"),
    ("en", "I couldn't, you shouldn't, he wouldn't", "I couldnt you shouldnt he wouldnt"),
    ("en", "I'm sure I've seen it", "im sure ive seen it"),
    ("en", "you're right, they're late", "youre right theyre late"),
    ("en", "we've, they've and you've been there", "weve theyve and youve been there"),
]

REAL_ERRORS = [
    ("zh", "我今天很高兴", "我今天很开心", 2),  # paraphrase
    ("zh", "我们今天去公园", "我们去公园", 2),  # dropped word
    ("zh", "我们去公园", "我们今天去公园", 2),  # added word
    ("zh", "请把门关上", "", 5),  # empty transcript
    ("zh", "我5号去北京", "我六号去北京", 1),  # a different number is not formatting
    ("zh", "大家好啊", "大家好", 1),  # the filler 啊 is a syllable the speaker said
    ("zh", "那边儿有人", "那边有人", 1),  # so is the erhua 儿
    ("en", "I am happy today", "I am glad today", 1),
    ("en", "the cat sat on the mat", "the cat sat on mat", 1),
    ("en", "the cat sat on mat", "the cat sat on the mat", 1),
    ("en", "good morning", "", 2),
    ("en", "at 3:30 p.m.", "at 3:40 pm", 1),
    ("en", "at 3 p.m.", "at 3 a.m.", 1),
    ("en", "okay", "oh", 1),
    # words of their own, not read as contractions: "its" is not "it is", "ill" not "I will"
    ("en", "it's raining", "its raining", 2),
    ("en", "I'll go", "ill go", 2),
]


@pytest.mark.parametrize(("language", "reference", "hypothesis"), FORMATTING_ONLY)
def test_formatting_only_differences_score_zero(language: str, reference: str, hypothesis: str) -> None:
    s = score_utterance(reference, hypothesis, language)
    assert (s.errors, s.reference) == (0, s.hypothesis)
    assert s.n_ref > 0


@pytest.mark.parametrize(("language", "reference", "hypothesis", "errors"), REAL_ERRORS)
def test_recognition_errors_never_score_zero(
    language: str, reference: str, hypothesis: str, errors: int
) -> None:
    assert score_utterance(reference, hypothesis, language).errors == errors


# --- official mode: Qwen2-Audio's evaluate_asr.py, unit for unit --------------------------------------

# Each line was scored by evaluate_asr.py's own remove_sp and compute_wer (with its cn_tn, fairseq
# tokenizer and vendored Whisper normalisers): the units it compared and their edit distance.
OFFICIAL_PAIRS = [
    json.loads(line)
    for line in (Path(__file__).parents[1] / "data" / "qwen2_audio_official_pairs.jsonl")
    .read_text(encoding="utf-8")
    .splitlines()
]


@pytest.mark.parametrize("pair", OFFICIAL_PAIRS, ids=lambda p: f"{p['language']}:{p['reference'][:12]}")
def test_official_mode_reproduces_the_qwen2_audio_script(pair: dict) -> None:
    lang = pair["language"]
    assert official_units(pair["reference"], lang) == pair["ref_units"]
    assert official_units(pair["hypothesis"], lang) == pair["hyp_units"]
    s = score_utterance(pair["reference"], pair["hypothesis"], lang, mode="official")
    assert (s.n_ref, s.errors) == (len(pair["ref_units"]), pair["distance"])
    assert s.unit == ("char" if lang in ("zh", "yue") else "word")


def test_official_corpus_rate_is_the_scripts() -> None:
    zh = [p for p in OFFICIAL_PAIRS if p["language"] == "zh"]
    corpus = corpus_score(score_utterance(p["reference"], p["hypothesis"], "zh", mode="official") for p in zh)
    expected = sum(p["distance"] for p in zh) / sum(len(p["ref_units"]) for p in zh)
    assert corpus.error_rate == pytest.approx(expected)
    # where the modes part: the script counts traditional characters, full-width letters and
    # 110 read 幺幺零 as errors, the default mode does not
    default = corpus_score(score_utterance(p["reference"], p["hypothesis"], "zh") for p in zh)
    assert default.error_rate < corpus.error_rate


def test_official_number_reading_quirks() -> None:
    # cn_tn reads a bare 4+ digit string digit by digit and a counted one as a number
    assert "".join(official_units("有2000个", "zh")) == "有两千个"
    assert "".join(official_units("有2000", "zh")) == "有二零零零"
    assert "".join(official_units("10元5角", "zh")) == "十元五角"
    assert official_units("I kinda like it", "en") == ["i", "kinda", "like", "it"]  # the vendored copy
    with pytest.raises(ValueError, match="scoring mode"):
        score_utterance("a", "a", "en", mode="paper")  # type: ignore[arg-type]

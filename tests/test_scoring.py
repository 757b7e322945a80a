"""WER/CER against hand-computed values, corpus totals and substitution pairs."""

from __future__ import annotations

import pytest

from qwen_tasks.scoring import corpus_score, score_utterance, top_substitutions


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

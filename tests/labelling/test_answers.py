"""The yes/no answer normaliser against a table of verbose EN/ZH answers (tests/data/yes_no_cases.tsv).

The table is the specification: every row must match, and above all no row may get a confident
answer that contradicts it (a wrong "yes"/"no" is worse than "unknown").
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from qwen_tasks.labelling.answers import CRY_VOCABULARY, YesNoVocabulary, clean_answer, normalize_yes_no

TABLE = Path(__file__).parents[1] / "data" / "yes_no_cases.tsv"


def _load_table() -> list[tuple[str, str]]:
    rows = []
    for line_no, line in enumerate(TABLE.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        expected, sep, text = line.partition("\t")
        if not sep or expected not in ("yes", "no", "unknown"):
            raise ValueError(f"{TABLE}:{line_no}: expected 'yes|no|unknown<TAB>text', got {line!r}")
        rows.append((expected, text))
    return rows


CASES = _load_table()


def test_table_is_broad() -> None:
    counts = Counter(expected for expected, _ in CASES)
    chinese = sum(any("\u4e00" <= ch <= "\u9fff" for ch in text) for _, text in CASES)
    assert len(CASES) >= 500
    assert min(counts.values()) >= 100, counts
    assert chinese >= 150


@pytest.mark.parametrize(("expected", "text"), CASES)
def test_table_row(expected: str, text: str) -> None:
    """Every row exactly: accuracy 1.0 over the table, so no confident error either (a wrong yes/no is
    worse than `unknown`, which a reviewer sees; the message says which kind of miss this is)."""
    got = normalize_yes_no(text)
    kind = "CONFIDENTLY WRONG" if got != "unknown" else "unknown instead of an answer"
    assert got == expected, f"{kind}: {text!r} -> {got!r}, expected {expected!r}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, a baby is crying loudly.", "yes"),
        ("The audio features an infant wailing.", "yes"),
        ("是的，有婴儿在哭", "yes"),
        ("沒有嬰兒哭聲", "no"),
        ("No crying is heard, only a dog barking.", "no"),
        ("There is a baby, but it is not crying.", "no"),
        ("No, but there is a baby babbling.", "no"),
        ("Is there a baby crying? Yes.", "yes"),
        ("It might be a baby crying, but it could also be a cat.", "unknown"),
        ("I can't tell.", "unknown"),
        ("Yes and no.", "unknown"),
        ("", "unknown"),
        ("<|endoftext|><|im_end|>", "unknown"),
    ],
)
def test_issue_examples(text: str, expected: str) -> None:
    assert normalize_yes_no(text) == expected


def test_cleaning_strips_tokens_markdown_and_full_width() -> None:
    assert clean_answer("<|im_start|>assistant\n**Ｙｅｓ**，「嬰兒」在哭。<|im_end|>") == "yes , 婴儿 在哭。"
    assert clean_answer("It isn't crying.") == "it is not crying."


def test_none_and_non_text_are_unknown() -> None:
    assert normalize_yes_no(None) == "unknown"  # type: ignore[arg-type]
    assert normalize_yes_no("   \n\t") == "unknown"


def test_configurable_vocabulary_for_another_question() -> None:
    dog = YesNoVocabulary(
        events=("bark", "barks", "barked", "barking"),
        subjects=("dog", "dogs", "puppy"),
        other_subjects=("seal", "seals"),
        zh_events=("吠", "叫"),
        zh_subjects=("狗",),
    )
    assert normalize_yes_no("Yes, a dog is barking.", dog) == "yes"
    assert normalize_yes_no("There is no dog barking, only a baby crying.", dog) == "no"
    assert normalize_yes_no("A seal is barking.", dog) == "unknown"
    assert normalize_yes_no("没有狗叫声。", dog) == "no"
    assert normalize_yes_no("A baby is crying.", dog) == "unknown"
    # the default vocabulary is untouched by the custom one
    assert normalize_yes_no("A baby is crying.") == "yes"


def test_event_only_vocabulary_needs_no_subject() -> None:
    speech = YesNoVocabulary(events=("speech", "speaking", "talking", "voice", "voices"), zh_events=("说话",))
    assert normalize_yes_no("There is someone talking.", speech) == "yes"
    assert normalize_yes_no("No speech, only music.", speech) == "no"
    assert normalize_yes_no("有人在说话。", speech) == "yes"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"events": ()},
        {"events": ("cry", "")},
        {"events": "crying"},
    ],
)
def test_vocabulary_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="YesNoVocabulary"):
        YesNoVocabulary(**kwargs)


def test_default_vocabulary_is_hashable_and_reused() -> None:
    assert hash(CRY_VOCABULARY) == hash(CRY_VOCABULARY)
    assert normalize_yes_no("Yes.", CRY_VOCABULARY) == "yes"


def test_structured_answers_and_anaphora_follow_the_vocabulary() -> None:
    dog = YesNoVocabulary(events=("bark", "barks", "barking"), subjects=("dog", "dogs"), zh_events=("狗叫",))
    assert normalize_yes_no('{"dog_barking": true, "baby_crying": false}', dog) == "yes"
    assert normalize_yes_no('{"dog_barking": true, "baby_crying": false}') == "no"
    assert normalize_yes_no("<barking>no</barking>", dog) == "no"
    assert normalize_yes_no("Nothing of the sort.", dog) == "no"  # "the sort" is whatever was asked


def test_self_correction_counts_flips() -> None:
    assert normalize_yes_no("Yes. Hmm, actually no.") == "no"
    assert normalize_yes_no("No — wait, yes, a baby is crying.") == "yes"
    assert normalize_yes_no("Yes. Actually no. Wait, yes.") == "unknown"  # flips twice
    assert normalize_yes_no("Yes. Actually, I'm not sure.") == "unknown"  # ends in doubt

"""WER/CER per utterance and per corpus, with the substitution pairs that reveal systematic paraphrases.

Two modes: "default" normalises with `transcript_text` (formatting differences score 0, see docs/review.md);
"official" reproduces Qwen2-Audio's evaluate_asr.py unit for unit (`official_asr`), so a run's
`cer_official` / `wer_official` can stand next to a paper's table.

Corpus error rate is total edits / total reference units (as the official Qwen-Audio evaluation), not
the mean of per-utterance rates, so a long utterance weighs what it contains. Alignment is jiwer's
(Levenshtein with S/D/I counts; S + D + I is the edit distance the official script computes). Adjacent
edited units are merged into one pair, so a model writing 开心 where the speaker said 高兴 shows up as
the pair 高兴 -> 开心 rather than two character swaps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import jiwer

from qwen_tasks.quality import official_asr
from qwen_tasks.quality.transcript_text import (
    Unit,
    canonical_language,
    detect_language,
    join_units,
    tokenize,
    unit_for,
)

ScoringMode = Literal["default", "official"]
SCORING_MODES: tuple[ScoringMode, ...] = ("default", "official")


class _EditTotals:
    """Shared by one utterance's and a corpus's scores: WER/CER = edits / reference units."""

    n_ref: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def error_rate(self) -> float | None:
        """Edits per reference unit; None when the reference is empty (undefined, not zero)."""
        return self.errors / self.n_ref if self.n_ref else None


@dataclass(frozen=True)
class UtteranceScore(_EditTotals):
    """Edit counts of one hypothesis against its reference, in the units of its language."""

    language: str
    unit: Unit
    n_ref: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    reference: str = ""  # normalised text that was scored
    hypothesis: str = ""
    pairs: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (reference phrase, hypothesis phrase)

    def as_dict(self) -> dict:
        return {
            "language": self.language,
            "unit": self.unit,
            "n_ref": self.n_ref,
            "hits": self.hits,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "error_rate": self.error_rate,
        }


@dataclass(frozen=True)
class CorpusScore(_EditTotals):
    """Totals over many utterances; `error_rate` = total edits / total reference units."""

    n_utterances: int
    n_ref: int
    substitutions: int
    deletions: int
    insertions: int

    def as_dict(self) -> dict:
        return {
            "n_utterances": self.n_utterances,
            "n_ref": self.n_ref,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "error_rate": self.error_rate,
        }


def resolve_language(reference: str, language: str | None) -> str:
    """The given language (canonicalised), else detected from the reference's CJK ratio."""
    return canonical_language(language) or detect_language(reference)


def _edit_pairs(
    ref: list[str], hyp: list[str], chunks: Iterable[jiwer.AlignmentChunk]
) -> list[tuple[str, str]]:
    """Runs of adjacent non-equal chunks that contain a substitution, as (reference, hypothesis) phrases."""
    pairs: list[tuple[str, str]] = []
    run: list[jiwer.AlignmentChunk] = []

    def flush() -> None:
        if run and any(c.type == "substitute" for c in run):
            r = join_units(ref[run[0].ref_start_idx : run[-1].ref_end_idx])
            h = join_units(hyp[run[0].hyp_start_idx : run[-1].hyp_end_idx])
            if r and h:
                pairs.append((r, h))
        run.clear()

    for chunk in chunks:
        if chunk.type == "equal":
            flush()
        else:
            run.append(chunk)
    flush()
    return pairs


def units_of(text: str, language: str, mode: ScoringMode = "default") -> tuple[Unit, list[str]]:
    """The unit kind and the scoring units of `text` in `language` (canonical code) under `mode`."""
    if mode == "official":
        unit: Unit = "char" if language in official_asr.CHAR_LANGUAGES else "word"
        return unit, official_asr.official_units(text, language)
    if mode != "default":
        raise ValueError(f"scoring mode must be one of {', '.join(SCORING_MODES)}, got {mode!r}")
    return unit_for(language), tokenize(text, language)


def score_utterance(
    reference: str, hypothesis: str | None, language: str | None = None, mode: ScoringMode = "default"
) -> UtteranceScore:
    """Score one hypothesis; `language` None means detect it from the reference."""
    lang = resolve_language(reference, language)
    unit, ref = units_of(reference, lang, mode)
    _, hyp = units_of(hypothesis or "", lang, mode)
    if not ref:
        return UtteranceScore(lang, unit, 0, 0, 0, 0, len(hyp), "", join_units(hyp))
    if not hyp:
        return UtteranceScore(lang, unit, len(ref), 0, 0, len(ref), 0, join_units(ref), "")
    # Units never contain spaces, so joining with spaces and splitting again is lossless.
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return UtteranceScore(
        language=lang,
        unit=unit,
        n_ref=len(ref),
        hits=out.hits,
        substitutions=out.substitutions,
        deletions=out.deletions,
        insertions=out.insertions,
        reference=join_units(ref),
        hypothesis=join_units(hyp),
        pairs=tuple(_edit_pairs(ref, hyp, out.alignments[0])),
    )


class CorpusTotals:
    """Running sums of utterance scores (add one at a time, read `score()`): a corpus score in bounded
    memory, for runs scored chunk by chunk."""

    def __init__(self) -> None:
        self.n_utterances = self.n_ref = self.substitutions = self.deletions = self.insertions = 0

    def add(self, s: UtteranceScore) -> None:
        self.n_utterances += 1
        self.n_ref += s.n_ref
        self.substitutions += s.substitutions
        self.deletions += s.deletions
        self.insertions += s.insertions

    def score(self) -> CorpusScore:
        return CorpusScore(
            n_utterances=self.n_utterances,
            n_ref=self.n_ref,
            substitutions=self.substitutions,
            deletions=self.deletions,
            insertions=self.insertions,
        )


def corpus_score(scores: Iterable[UtteranceScore]) -> CorpusScore:
    """Sum the edits and reference lengths of `scores`."""
    totals = CorpusTotals()
    for s in scores:
        totals.add(s)
    return totals.score()


def top_substitutions(scores: Iterable[UtteranceScore], n: int = 20) -> list[tuple[str, str, int]]:
    """The `n` most frequent (reference phrase, hypothesis phrase) pairs, most frequent first."""
    counts: Counter[tuple[str, str]] = Counter()
    for score in scores:
        counts.update(score.pairs)
    return top_pairs(counts, n)


def top_pairs(counts: Counter[tuple[str, str]], n: int = 20) -> list[tuple[str, str, int]]:
    """The `n` most frequent of counted (reference phrase, hypothesis phrase) pairs, most frequent first,
    ties in pair order."""
    return [(r, h, c) for (r, h), c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

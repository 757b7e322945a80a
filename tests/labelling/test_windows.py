"""Windowing of audio over 30 s and merging of per-window answers (pure functions, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_tasks.labelling.answers import normalize_yes_no
from qwen_tasks.labelling.windows import (
    combine_p_yes,
    join_transcripts,
    pick_cry_answer,
    plan_windows,
)

SR = 16000


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def _check_cover(windows, n: int, max_s: float = 30.0) -> None:
    assert windows[0].start == 0 and windows[-1].end == n
    for a, b in zip(windows, windows[1:], strict=False):
        assert a.end == b.start
    assert all(0 < w.end - w.start <= max_s * SR for w in windows)
    assert [w.index for w in windows] == list(range(len(windows)))


@pytest.mark.parametrize("seconds", [0.1, 7.0, 30.0])
def test_up_to_30_s_is_one_window(seconds: float) -> None:
    wave = _noise(seconds)
    assert [(w.start, w.end) for w in plan_windows(wave, SR)] == [(0, len(wave))]


def test_cut_goes_to_the_quiet_gap_before_the_limit() -> None:
    wave = _noise(45.0)
    wave[int(27.0 * SR) : int(27.3 * SR)] = 0.0  # a pause at 27.0-27.3 s
    windows = plan_windows(wave, SR)
    _check_cover(windows, len(wave))
    assert len(windows) == 2
    assert 27.0 * SR <= windows[0].end <= 27.3 * SR


def test_no_pause_still_cuts_within_the_search_range() -> None:
    wave = _noise(95.0, seed=3)
    windows = plan_windows(wave, SR)
    _check_cover(windows, len(wave))
    assert len(windows) == 4
    assert all(w.end - w.start >= 25 * SR for w in windows[:-1])


def test_last_window_is_not_a_sliver() -> None:
    wave = _noise(30.2)
    wave[int(29.9 * SR) :] = 0.0  # the quietest audio is right at the end
    windows = plan_windows(wave, SR)
    _check_cover(windows, len(wave))
    assert windows[-1].end - windows[-1].start >= 1.0 * SR


def test_window_seconds() -> None:
    windows = plan_windows(_noise(40.0), SR)
    start, end = windows[1].seconds(SR)
    assert start == windows[0].end / SR and end == 40.0


def test_join_transcripts_by_language() -> None:
    assert join_transcripts([" hello there ", "", "general kenobi"], "en") == "hello there general kenobi"
    assert join_transcripts(["今天天气", "很好"], "zh") == "今天天气很好"


def test_cry_merge_any_yes_wins() -> None:
    assert combine_p_yes([0.1, 0.8, None, 0.3]) == 0.8
    assert combine_p_yes([None]) is None
    assert pick_cry_answer(["No.", "Yes, a baby.", "No"]) == "Yes, a baby."
    assert pick_cry_answer(["No.", "I hear traffic", "no"]) == "I hear traffic"
    assert pick_cry_answer(["No.", "no"]) == "No."
    assert normalize_yes_no("Yes.") == "yes" and normalize_yes_no("No") == "no"

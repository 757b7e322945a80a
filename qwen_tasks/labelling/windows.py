"""Split audio longer than the model's 30 s window, and merge the per-window answers back per clip.

Qwen-Audio / Qwen2-Audio see at most 30 s: the feature extractor silently truncates the rest (users
report half-transcribed recordings). We cut long clips ourselves, preferring the quietest point in the
last few seconds before each 30 s limit so that words are not cut in half, then join transcripts and
combine cry answers (any window "yes" makes the clip "yes"; p_yes is the maximum over windows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwen_tasks.labelling.answers import normalize_yes_no
from qwen_tasks.records import DEFAULT_LANGUAGE, ENCODER_WINDOW_SECONDS

SEARCH_S = 5.0  # look for a quiet cut point within this many seconds before the limit
FRAME_S = 0.025  # RMS frame length used to find quiet points
MIN_TAIL_S = 1.0  # never leave a last window shorter than this (if the clip allows)

# Languages written without spaces between words: window transcripts are joined without a space.
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "yue", "th", "lo", "my", "km"})


@dataclass(frozen=True)
class Window:
    """Samples [start, end) of a clip."""

    index: int
    start: int
    end: int

    def seconds(self, sample_rate: int) -> tuple[float, float]:
        return self.start / sample_rate, self.end / sample_rate


def plan_windows(
    waveform: np.ndarray,
    sample_rate: int,
    *,
    max_s: float = ENCODER_WINDOW_SECONDS,
    search_s: float = SEARCH_S,
    frame_s: float = FRAME_S,
    min_tail_s: float = MIN_TAIL_S,
) -> list[Window]:
    """Windows of at most `max_s` covering the whole clip, cut at the quietest frame near each limit.

    A clip of up to `max_s` is one window. Otherwise each cut is placed at the centre of the frame with
    the lowest RMS energy in [limit - search_s, limit] (ties go to the later frame, keeping windows long),
    and never so late that fewer than `min_tail_s` seconds would remain for the last window.
    """
    if not 0 < search_s < max_s:
        raise ValueError(f"search_s must be in (0, max_s), got {search_s}")
    n = len(waveform)
    max_len = int(round(max_s * sample_rate))
    if n <= max_len:
        return [Window(0, 0, n)]
    frame = max(1, int(round(frame_s * sample_rate)))
    search = int(round(search_s * sample_rate))
    min_tail = int(round(min_tail_s * sample_rate))
    windows: list[Window] = []
    start = 0
    while n - start > max_len:
        hi = min(start + max_len, n - min_tail)
        lo = max(start + max_len - search, start + frame)
        if hi - lo < frame:  # the tail constraint leaves no room to search: cut at the limit
            cut = start + max_len if hi <= lo else hi
        else:
            cut = _quietest_cut(waveform[lo:hi], frame) + lo
        cut = min(cut, start + max_len)
        windows.append(Window(len(windows), start, cut))
        start = cut
    windows.append(Window(len(windows), start, n))
    return windows


def _quietest_cut(segment: np.ndarray, frame: int) -> int:
    """Offset (in samples) of the centre of the lowest-energy frame; ties go to the latest frame."""
    n_frames = len(segment) // frame
    frames = segment[: n_frames * frame].astype(np.float64).reshape(n_frames, frame)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    best = n_frames - 1 - int(np.argmin(rms[::-1]))
    return best * frame + frame // 2


def join_transcripts(texts: Sequence[str], language: str = DEFAULT_LANGUAGE) -> str:
    """Join window transcripts in order; no separator for languages written without spaces."""
    parts = [t.strip() for t in texts if t and t.strip()]
    return ("" if language in _NO_SPACE_LANGUAGES else " ").join(parts)


def combine_p_yes(values: Sequence[float | None]) -> float | None:
    """Clip p_yes = max over windows: one crying window is enough to call the clip 'yes'."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def pick_cry_answer(answers: Sequence[str]) -> str:
    """The raw answer that stands for the clip: the first window answering yes, else unknown, else no.

    The label is derived from this text by the answer normaliser, so choosing the window this way makes
    "any window yes -> clip yes" hold for the generated answer too; every window's answer is kept
    in the per-window results.
    """
    labels = [normalize_yes_no(a) for a in answers]
    for wanted in ("yes", "unknown"):
        for answer, label in zip(answers, labels, strict=True):
            if label == wanted:
                return answer
    return answers[0] if answers else ""

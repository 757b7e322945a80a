"""The Qwen2-Audio backend on the tiny random-init model: real transformers code, no fakes.

Batch invariance is the point (Qwen-Audio #43: batching changed answers): a clip's transcript, answer
and p_yes must not depend on batch size, order or neighbours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling.backends import get_backend, load_backend, model_info, planned_model_info
from qwen_tasks.labelling.backends.backoff import run_resilient
from qwen_tasks.labelling.backends.common import Unit, cut_at_budget
from qwen_tasks.labelling.backends.qwen2_audio import length_groups
from qwen_tasks.labelling.windows import Window
from qwen_tasks.records import ASR_MAX_NEW_TOKENS, AudioClip, ClipResult, LabelRequest, default_max_new_tokens

SR = 16000
ASR = LabelRequest("asr", max_new_tokens=6)
SCORE = LabelRequest("cry")
BOTH = LabelRequest("cry", methods=("score", "generate"), max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir)


@pytest.fixture(scope="module")
def backend(tiny: str):
    return load_backend(tiny, device="cpu")


def _clips(n: int, seed: int = 0) -> list[AudioClip]:
    """n clips of 0.5-7 s: noise, tones and a chirp, so their audio tokens and lengths all differ."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        seconds = 0.5 + 6.5 * rng.random()
        t = np.arange(int(seconds * SR)) / SR
        wave = 0.2 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t) + 0.05 * rng.standard_normal(len(t))
        clips.append(AudioClip(audio_id=i + 1, path=f"/audio/clip{i}.wav", waveform=wave.astype(np.float32)))
    return clips


def _assert_same(a: list[ClipResult], b: list[ClipResult], tol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.audio_id == y.audio_id
        assert x.error == y.error
        assert x.text == y.text, (x, y)
        if x.p_yes is None or y.p_yes is None:
            assert x.p_yes is y.p_yes
        else:
            assert abs(x.p_yes - y.p_yes) <= tol, (x.p_yes, y.p_yes)
        assert x.truncated == y.truncated, (x, y)
        assert [(w.text, w.truncated) for w in x.windows] == [(w.text, w.truncated) for w in y.windows]


@pytest.mark.parametrize("request_", [ASR, SCORE, BOTH], ids=["asr", "cry-score", "cry-both"])
def test_batch_of_16_equals_batch_of_1(backend, request_: LabelRequest) -> None:
    clips = _clips(16)
    batched = backend.label(clips, request_)
    alone = [backend.label([clip], request_)[0] for clip in clips]
    _assert_same(batched, alone)
    assert all(r.error is None for r in batched)
    if request_.task == "asr":
        assert all(r.text is not None and r.p_yes is None for r in batched)
    elif request_.methods == ("score",):
        assert all(r.text is None and 0.0 <= r.p_yes <= 1.0 for r in batched)
    else:
        assert all(r.text is not None and 0.0 <= r.p_yes <= 1.0 for r in batched)
    # the p_yes values really differ between clips (a constant would pass the comparison trivially)
    if request_.task == "cry":
        assert len({round(r.p_yes, 6) for r in batched}) > 8


def test_order_and_neighbours_do_not_matter(backend) -> None:
    clips = _clips(8, seed=1)
    forward = backend.label(clips, BOTH)
    backward = backend.label(clips[::-1], BOTH)[::-1]
    with_others = backend.label(clips[:4] + _clips(4, seed=9), BOTH)[:4]
    _assert_same(forward, backward)
    _assert_same(forward[:4], with_others)


def _noise_clips(seconds: list[float], seed: int) -> list[AudioClip]:
    rng = np.random.default_rng(seed)
    return [
        AudioClip(300 + i, f"/audio/d{i}.wav", (0.1 * rng.standard_normal(int(s * SR))).astype(np.float32))
        for i, s in enumerate(seconds)
    ]


def test_default_budgets_follow_the_window_duration() -> None:
    assert default_max_new_tokens("asr", 30.0) == 392 >= 256  # the stock Qwen-Audio eval scripts' 256
    budgets = [default_max_new_tokens("asr", s) for s in (0.05, 0.5, 5.0, 10.0, 20.0, 30.0)]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    assert default_max_new_tokens("asr", 3600.0) == ASR_MAX_NEW_TOKENS == 448
    assert default_max_new_tokens("cry", 1.0) == default_max_new_tokens("cry", 30.0) == 32
    assert LabelRequest("asr").token_budget(30.0) == 392
    assert LabelRequest("asr", max_new_tokens=8).token_budget(30.0) == 8  # an explicit cap: every clip
    assert LabelRequest("cry", methods=("generate",)).token_budget(30.0) == 32


def test_cut_at_budget_flags_rows_that_used_their_whole_budget() -> None:
    stop = {0}
    rows = [[5, 6, 7, 8], [5, 0, 0, 0], [5, 6, 7, 0], [5, 6, 7, 0], [5, 6]]
    assert cut_at_budget(rows, [3, 3, 3, 4, 3], stop) == [
        ([5, 6, 7], True),  # no stop token within its budget
        ([5, 0, 0], False),  # stopped early (the batch went on: padding after the stop)
        ([5, 6, 7], True),  # the stop came after its budget: alone it would have been cut too
        ([5, 6, 7, 0], False),  # the stop is the budget's last token
        ([5, 6], False),  # the whole batch stopped before this budget
    ]


def test_derived_budgets_are_per_clip_and_batch_invariant(backend) -> None:
    """Mixed durations under the default (derived) budgets: batch = alone, texts and truncation flags,
    and each clip generates exactly its own budget, whatever its batch-mates' budgets."""
    clips = _noise_clips([0.5, 2.0, 6.0, 13.0, 30.0, 41.0], seed=11)
    default = LabelRequest("asr")
    batched = backend.label(clips, default)
    alone = [backend.label([clip], default)[0] for clip in clips]
    _assert_same(batched, alone)
    assert [len(r.windows) for r in batched] == [0, 0, 0, 0, 0, 2]
    # the random-init model stops at once on the 0.5-s clip (an end-of-sequence token first: not
    # truncated) and rambles on the others until their budgets run out
    assert [r.truncated for r in batched] == [False, True, True, True, True, True]
    assert batched[0].text == "" and all(w.truncated for w in batched[-1].windows)
    for clip, result in zip(clips[:-1], batched[:-1], strict=True):
        budget = default_max_new_tokens("asr", clip.duration_s)
        explicit = backend.label([clip], LabelRequest("asr", max_new_tokens=budget))[0]
        shorter = backend.label([clip], LabelRequest("asr", max_new_tokens=budget - 8))[0]
        assert (result.text, result.truncated) == (explicit.text, explicit.truncated), clip.duration_s
        assert (result.text != shorter.text) == result.truncated, clip.duration_s
    # a 30-s window is not cut at the stock 256: the default transcript is longer
    capped = backend.label([clips[4]], LabelRequest("asr", max_new_tokens=256))[0]
    assert len(batched[4].text) > len(capped.text) > 0
    # an explicit cap applies to every clip, long or short, and flags them all
    two = backend.label(clips, LabelRequest("asr", max_new_tokens=2))
    _assert_same(two, [backend.label([clip], LabelRequest("asr", max_new_tokens=2))[0] for clip in clips])
    assert [r.truncated for r in two] == [False, True, True, True, True, True]
    assert all(len(r.text) < len(b.text) for r, b in zip(two[1:], batched[1:], strict=True))


def test_score_equals_first_step_of_generate(backend) -> None:
    clips = _clips(6, seed=2)
    score = backend.label(clips, SCORE)
    gen = backend.label(clips, LabelRequest("cry", methods=("generate",), max_new_tokens=3))
    for s, g in zip(score, gen, strict=True):
        assert abs(s.p_yes - g.p_yes) < 1e-5
        assert s.text is None and g.text is not None


def test_long_clip_is_windowed_and_merged(backend) -> None:
    rng = np.random.default_rng(5)
    wave = (0.1 * rng.standard_normal(45 * SR)).astype(np.float32)
    wave[int(28 * SR) : int(28.2 * SR)] = 0.0  # a pause where the cut should go
    long_clip = AudioClip(audio_id=100, path="/audio/long.wav", waveform=wave)
    short = _clips(2, seed=3)

    cry = backend.label([short[0], long_clip, short[1]], BOTH)
    merged = cry[1]
    assert merged.error is None and len(merged.windows) == 2
    first, second = merged.windows
    assert first.start_s == 0.0 and second.end_s == 45.0 and first.end_s == second.start_s
    assert 28.0 <= first.end_s <= 28.2
    assert merged.p_yes == max(first.p_yes, second.p_yes)
    assert merged.text in (first.text, second.text)
    _assert_same([cry[0], cry[2]], backend.label(short, BOTH))  # neighbours unaffected

    # each window's result is what that stretch of audio gives on its own
    cut = int(round(first.end_s * SR))
    parts = [AudioClip(101, "/a/w0.wav", wave[:cut]), AudioClip(102, "/a/w1.wav", wave[cut:])]
    alone = backend.label(parts, BOTH)
    assert [w.text for w in merged.windows] == [r.text for r in alone]
    assert all(abs(w.p_yes - r.p_yes) < 1e-4 for w, r in zip(merged.windows, alone, strict=True))

    asr = backend.label([long_clip], ASR)[0]
    window_texts = [w.text for w in asr.windows]
    assert asr.text == " ".join(t.strip() for t in window_texts if t.strip())


def test_bad_clips_fail_alone_and_the_rest_is_kept(backend) -> None:
    good = _clips(4, seed=4)
    nan = np.ones(SR, dtype=np.float32)
    nan[100] = np.nan
    bad = [
        AudioClip(201, "/audio/nan.wav", nan),
        AudioClip(202, "/audio/empty.wav", np.zeros(0, dtype=np.float32)),
        AudioClip(203, "/audio/stereo.wav", np.zeros((SR, 2), dtype=np.float32)),
        AudioClip(204, "/audio/8k.wav", np.zeros(SR, dtype=np.float32), sample_rate=8000),
    ]
    mixed = [bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3], good[3]]
    for request_ in (SCORE, ASR):
        results = backend.label(mixed, request_)
        assert [r.audio_id for r in results] == [c.audio_id for c in mixed]
        errors = {r.audio_id: r.error for r in results if r.error}
        assert set(errors) == {201, 202, 203, 204}
        assert "/audio/nan.wav" in errors[201] and "NaN" in errors[201]
        assert "/audio/empty.wav" in errors[202] and "too short" in errors[202]
        assert "mono" in errors[203] and "8000 Hz" in errors[204]
        _assert_same([r for r in results if r.error is None], backend.label(good, request_))


def test_trimmed_encoder_matches_the_stock_30_s_pass(backend) -> None:
    """The default encoder pass stops at the batch's longest clip; outputs must match the stock pass."""
    clips = _clips(6, seed=6) + [AudioClip(300, "/audio/30s.wav", _clips(1, seed=7)[0].waveform.repeat(5))]
    assert backend.trim_audio
    results = {}
    for trim in (True, False):
        backend.trim_audio = trim
        results[trim] = (backend.label(clips, ASR), backend.label(clips, BOTH), backend.label(clips, SCORE))
    backend.trim_audio = True
    for trimmed, stock in zip(results[True], results[False], strict=True):
        _assert_same(trimmed, stock, tol=1e-5)


def test_score_groups_bound_padding() -> None:
    lengths = [16000, 15000, 14000, 13000, 12500, 9000, 8000, 7000, 6000, 2000]
    units = [Unit(i, Window(0, 0, n), np.zeros(n, dtype=np.float32)) for i, n in enumerate(lengths)]
    groups = length_groups(units, min_ratio=0.75, min_size=2)
    assert [[len(u.waveform) for u in g] for g in groups] == [
        [16000, 15000, 14000, 13000, 12500],
        [9000, 8000, 7000],
        [6000, 2000],  # a group keeps min_size units even when they differ more
    ]
    assert [u for g in groups for u in g] == units


def test_back_off_halves_on_oom_and_isolates_a_failing_item() -> None:
    calls: list[int] = []

    def run(items: list[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if 13 in items:
            raise ValueError("item 13 is poison")
        return [x * 10 for x in items]

    out = run_resilient(list(range(10, 18)), run, lambda item, exc: f"failed {item}: {exc}")
    assert out == [100, 110, 120, "failed 13: item 13 is poison", 140, 150, 160, 170]
    assert calls[:3] == [8, 4, 2]  # halved twice before it fit
    assert max(calls[3:]) <= 2


def test_model_info_and_cache(tiny: str, backend) -> None:
    assert (
        planned_model_info(tiny, SCORE, device="cpu")
        == backend.loaded_model_info(SCORE)
        == model_info(backend, SCORE)
    )
    info = backend.loaded_model_info(ASR)
    assert info.model == str(Path(tiny).resolve()) and info.prompt_version == "q2a-chat-asr-v1"
    assert "Transcribe" in info.prompt_template
    first = get_backend(tiny, device="cpu")
    assert get_backend(tiny, device="cpu") is first
    get_backend.cache_clear()


def test_device_that_is_not_there_is_a_model_error(tiny: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        load_backend(tiny, device="cuda")

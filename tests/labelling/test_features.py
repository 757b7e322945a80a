"""Log-mel features in torch (`common.LogMel`) and the decode modes, against the stock paths.

The features the backend computes on the model's device, over only the frames the encoder reads, must be
the processor's (WhisperFeatureExtractor's numpy path, every clip padded to 30 s): max |difference|
<= 1e-4 for random and real-shaped audio of 1-30 s at every sample rate after resampling to 16 kHz, and
the labels must not move: on the tiny model in fp32, identical transcripts and p_yes within 1e-5 whether
the features come from numpy, the processor or torch. The decode modes (static KV cache, torch.compile)
must give the same greedy output as the default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from labelling_helpers import random_audio, real_shaped

from qwen_tasks.labelling.backends import load_backend
from qwen_tasks.labelling.backends.common import LogMel, plan_units
from qwen_tasks.labelling.backends.qwen2_audio import Qwen2AudioBackend
from qwen_tasks.records import AudioClip, LabelRequest

SR = 16000
ASR = LabelRequest("asr", max_new_tokens=6)
SCORE = LabelRequest("cry")
BOTH = LabelRequest("cry", methods=("score", "generate"), max_new_tokens=4)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Qwen2AudioBackend:
    return load_backend(str(tiny_model_dir), device="cpu")  # type: ignore[return-value]


def numpy_features(extractor, wave: np.ndarray) -> np.ndarray:
    """The processor's numpy path for one clip: padded to 30 s, 3000 frames."""
    padded = np.zeros(extractor.n_samples, dtype=np.float32)
    padded[: len(wave)] = wave[: extractor.n_samples]
    return extractor._np_extract_fbank_features(padded[None, :], "cpu")[0]


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "30s"])
def test_log_mel_matches_the_processors_numpy_path(backend: Qwen2AudioBackend, trim: bool) -> None:
    extractor = backend.processor.feature_extractor
    log_mel = LogMel.from_feature_extractor(extractor)
    assert log_mel is not None
    rates = (8000, 11025, 16000, 22050, 32000, 44100, 48000)
    waves = [real_shaped(1.0 + 29.0 * k / 6, rate, k) for k, rate in enumerate(rates)]
    waves += [random_audio(s, 100 + k) for k, s in enumerate((1.0, 2.7, 9.3, 17.0, 29.99, 30.0))]
    waves.append(np.zeros(SR, dtype=np.float32))  # silence: every frame at the log floor
    lengths = [log_mel.clip_frames(len(w)) for w in waves]
    for batch in (waves, waves[:4], waves[7:9], [waves[1]]):  # the whole mix, short ones, one clip
        batch_lengths = [log_mel.clip_frames(len(w)) for w in batch]
        frames = log_mel.trimmed_frames(batch_lengths) if trim else None
        features, mask = log_mel(batch, "cpu", frames)
        width = features.shape[-1]
        assert width == (frames or 3000) and mask.shape == (len(batch), width)
        assert mask.sum(-1).tolist() == batch_lengths
        for row, wave in enumerate(batch):
            reference = numpy_features(extractor, wave)[:, :width]
            assert np.abs(features[row].numpy() - reference).max() <= 1e-4
    assert max(lengths) == 3000 and min(lengths) == 100


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "30s"])
def test_backend_inputs_match_the_processor(backend: Qwen2AudioBackend, trim: bool) -> None:
    waves = [real_shaped(s, r, k) for k, (s, r) in enumerate([(1.0, 44100), (6.4, 8000), (3.3, 48000)])]
    clips = [AudioClip(audio_id=k + 1, path=f"c{k}", waveform=w) for k, w in enumerate(waves)]
    _, units = plan_units(clips)
    prompt = backend.prompt_text(ASR)
    backend.trim_audio = trim
    try:
        ours = backend._inputs(units, prompt)
    finally:
        backend.trim_audio = True
    stock = backend.processor(
        text=[prompt] * len(units), audio=waves, sampling_rate=SR, return_tensors="pt", padding=True
    )
    assert torch.equal(ours["input_ids"], stock["input_ids"])
    assert torch.equal(ours["attention_mask"], stock["attention_mask"])
    width = ours["input_features"].shape[-1]
    assert torch.equal(ours["feature_attention_mask"], stock["feature_attention_mask"][:, :width].int())
    assert (ours["input_features"] - stock["input_features"][..., :width]).abs().max() <= 1e-4


def _clips(n: int, seed: int = 0) -> list[AudioClip]:
    rng = np.random.default_rng(seed)
    rates = (8000, 22050, 44100, 48000, 16000)
    return [
        AudioClip(
            audio_id=i + 1, path=f"c{i}", waveform=real_shaped(0.5 + 6.5 * rng.random(), rates[i % 5], i)
        )
        for i in range(n)
    ]


def _label_with_numpy_features(backend: Qwen2AudioBackend, clips: list[AudioClip], request: LabelRequest):
    """p_yes / texts with the processor's inputs but numpy log-mel features (padded 30 s, stock encoder
    run trimmed as shipped): the path the issue measured."""
    extractor = backend.processor.feature_extractor
    _, units = plan_units(clips)
    prompt = backend.prompt_text(request)
    inputs = backend.processor(
        text=[prompt] * len(units), audio=[u.waveform for u in units], sampling_rate=SR,
        return_tensors="pt", padding=True,
    )  # fmt: skip
    inputs["input_features"] = torch.from_numpy(
        np.stack([numpy_features(extractor, u.waveform) for u in units])
    )
    return backend._infer(units, prompt, request, inputs)


@pytest.mark.parametrize("request_", [ASR, SCORE, BOTH], ids=["asr", "cry-score", "cry-both"])
def test_labels_do_not_change_with_torch_features(backend: Qwen2AudioBackend, request_: LabelRequest) -> None:
    clips = _clips(12)
    backend.features = "processor"
    try:
        stock = backend.label(clips, request_)
    finally:
        backend.features = "torch"
    ours = backend.label(clips, request_)
    by_numpy = _label_with_numpy_features(backend, clips, request_)
    for a, b in zip(stock, ours, strict=True):
        assert a.error is None and b.error is None
        assert a.text == b.text
        if request_.task == "cry":
            assert abs(a.p_yes - b.p_yes) <= 1e-5
    # units are single windows here, in clip order: compare with the numpy-feature outputs
    for out, b in zip(by_numpy, ours, strict=True):
        assert out.text == b.text
        if request_.task == "cry":
            assert abs(out.p_yes - b.p_yes) <= 1e-5
    if request_.task == "cry":
        assert len({round(r.p_yes, 6) for r in ours}) > 6  # the p_yes really differ between clips


@pytest.mark.parametrize("mode", ["static", "compile"])
def test_decode_modes_give_the_same_greedy_output(tiny_model_dir: Path, mode: str) -> None:
    """Static KV cache (and torch.compile of the decode step, here on the CPU) vs the default dynamic
    cache: identical transcripts and answers, p_yes within 1e-5, trimmed and stock encoder."""
    clips = _clips(6, seed=3)
    default = load_backend(str(tiny_model_dir), device="cpu")
    other = Qwen2AudioBackend(str(tiny_model_dir), device="cpu", decode=mode)
    for request in (LabelRequest("asr", max_new_tokens=8), BOTH):
        a, b = default.label(clips, request), other.label(clips, request)
        assert [r.text for r in a] == [r.text for r in b]
        if request.task == "cry":
            assert max(abs(x.p_yes - y.p_yes) for x, y in zip(a, b, strict=True)) <= 1e-5

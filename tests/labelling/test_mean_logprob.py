"""transcription.mean_logprob (0015): the mean log-probability of the tokens greedy decoding generated,
read at labelling time, recomputed here by a teacher-forced forward pass of the tiny model over the prompt
and the generated ids (the stock processor path, not the backend's trimmed encoder); and greedy output
unchanged by recording it (the backend's text equals a plain `generate` without the processor)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from labelling_helpers import ingest_clips
from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs, worker
from qwen_tasks.labelling.backends import get_backend, model_info
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.backends.common import decode
from qwen_tasks.records import AudioClip, LabelRequest
from qwen_tasks.store import schema

SR = 16000
ASR = LabelRequest("asr", max_new_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Backend:
    return get_backend(str(tiny_model_dir), device="cpu")


def _clip(seed: int, seconds: float) -> AudioClip:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.2 * np.sin(2 * np.pi * (180 + 300 * rng.random()) * t) + 0.05 * rng.standard_normal(len(t))
    return AudioClip(audio_id=seed + 1, path=f"/audio/{seed}.wav", waveform=wave.astype(np.float32))


def _recomputed(backend, clip: AudioClip, budget: int) -> tuple[str, float]:
    """(greedy text, mean log-prob of its tokens up to and including the first stop) by the stock path:
    the processor's 30 s features, a plain generate, then one forward pass over prompt + generated ids."""
    inputs = backend.processor(
        text=[backend.prompt_text(ASR)], audio=[clip.waveform], sampling_rate=SR, return_tensors="pt"
    )
    with torch.inference_mode():
        out = backend.model.generate(
            **inputs, max_new_tokens=budget, do_sample=False, num_beams=1,
            eos_token_id=backend.eos_ids, pad_token_id=backend.pad_id,
        )  # fmt: skip
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:].tolist()
        n = next((k + 1 for k, t in enumerate(new) if t in backend.eos_ids), len(new))
        ids = out[:, : prompt_len + n]
        logits = backend.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
        ).logits
    logprobs = torch.log_softmax(logits[0, prompt_len - 1 : prompt_len + n - 1].float(), dim=-1)
    chosen = logprobs.gather(-1, ids[0, prompt_len:, None]).squeeze(-1)
    return decode(backend.tokenizer, new, backend.eos_ids), float(chosen.mean())


def test_mean_logprob_is_the_mean_of_the_generated_tokens_log_probs(backend) -> None:
    clips = [_clip(seed, seconds) for seed, seconds in ((0, 1.0), (1, 2.5), (2, 4.0))]
    batched = backend.label(clips, ASR)  # batched with padding, as the worker runs it
    for clip, result in zip(clips, batched, strict=True):
        text, expected = _recomputed(backend, clip, ASR.max_new_tokens)
        assert result.error is None
        assert result.text == text  # greedy output unchanged by recording the log-probs
        assert result.mean_logprob is not None and result.mean_logprob < 0.0
        assert math.isclose(result.mean_logprob, expected, abs_tol=1e-4), (result.mean_logprob, expected)
    assert len({round(r.mean_logprob, 4) for r in batched}) == len(batched)  # really per clip


def test_cry_answers_do_not_report_it(backend) -> None:
    (result,) = backend.label([_clip(3, 1.0)], LabelRequest("cry", methods=("generate",), max_new_tokens=3))
    assert result.mean_logprob is None and result.text is not None


def test_worker_stores_mean_logprob_per_transcription(engine: Engine, backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0, 3.0])
    planned = jobs.plan_run(engine, jobs.RunRequest(
        task="asr", model_info=model_info(backend, ASR), request=ASR, batch_size=2,
        max_batch_seconds=60.0,
    ))  # fmt: skip
    summary = worker.work(
        engine, planned.run_id, worker.WorkerOptions(lease_seconds=30), backend_factory=lambda run: backend
    )
    assert summary.labelled == 3
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.select(schema.transcription.c.audio_id, schema.transcription.c.mean_logprob)
            ).all()
        )
    assert set(stored) == set(ids.values())
    import soundfile as sf

    for path, audio_id in ids.items():
        wave, _ = sf.read(path, dtype="float32")
        (direct,) = backend.label([AudioClip(audio_id=audio_id, path=str(path), waveform=wave)], ASR)
        assert math.isclose(stored[audio_id], direct.mean_logprob, abs_tol=1e-5)


def test_a_windowed_clip_averages_over_all_its_tokens() -> None:
    """Windows of a long clip: the mean over every generated token, not the mean of window means; a
    window that did not report them makes the clip's value unknown."""
    from qwen_tasks.labelling.backends.common import UnitOut, mean_logprob

    two = [UnitOut(text="a", token_logprobs=(-1.0, -2.0)), UnitOut(text="b", token_logprobs=(-3.0,))]
    assert mean_logprob(two) == pytest.approx(-2.0)
    assert mean_logprob([*two, UnitOut(text="c")]) is None
    assert mean_logprob([UnitOut(text="", token_logprobs=())]) is None


def test_reading_logits_gives_the_models_log_probs_where_generate_masks_the_scores(backend) -> None:
    """`TokenLogprobs.reading_logits`, which the original Qwen-Audio backend uses because its greedy config
    has `min_new_tokens=1` (the stop ids' scores are -inf at the first step), checked here on the tiny
    Qwen2-Audio model so CI runs it (the Qwen-Audio check needs its remote code: test_qwen_audio.py).
    With an LM head biased towards the first stop id, a real `generate` with `min_new_tokens=1` forces one
    token the model gives little probability, then stops: the values read from the LM head equal the
    teacher-forced forward pass's log-softmax, where a recorder of the scores alone (in the same list)
    reads the masked, renormalised first step."""
    from transformers import LogitsProcessorList

    from qwen_tasks.labelling.backends.common import TokenLogprobs

    model, stop = backend.model, backend.eos_ids[0]
    inputs = backend.processor(
        text=[backend.prompt_text(ASR)], audio=[_clip(4, 1.5).waveform], sampling_rate=SR, return_tensors="pt"
    )
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[stop] = 20.0
    from_head, from_scores = TokenLogprobs(), TokenLogprobs()
    model.lm_head = biased
    try:
        with torch.inference_mode(), from_head.reading_logits(model.lm_head):
            out = model.generate(
                **inputs, max_new_tokens=4, min_new_tokens=1, do_sample=False, num_beams=1,
                eos_token_id=backend.eos_ids, pad_token_id=backend.pad_id,
                logits_processor=LogitsProcessorList([from_head, from_scores]),
            )  # fmt: skip
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:].tolist()
        with torch.inference_mode():
            logits = model(
                input_ids=out,
                attention_mask=torch.ones_like(out),
                input_features=inputs["input_features"],
                feature_attention_mask=inputs["feature_attention_mask"],
            ).logits
    finally:
        model.lm_head = head
    assert len(new) == 2 and new[0] not in backend.eos_ids and new[1] == stop  # one forced token, then stop
    logprobs = torch.log_softmax(logits[0, prompt_len - 1 : -1].float(), dim=-1)
    expected = logprobs.gather(-1, out[0, prompt_len:, None]).squeeze(-1).tolist()
    rows = [(new, False)]
    (read,), (masked,) = from_head.rows(rows, backend.eos_ids), from_scores.rows(rows, backend.eos_ids)
    assert read == pytest.approx(expected, abs=1e-4)
    assert masked[0] > read[0] + 5.0 and masked[1] == pytest.approx(read[1], abs=1e-4)

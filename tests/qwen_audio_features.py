"""The original Qwen-Audio backend's torch features against the remote code's own path, on a checkpoint.

Run by the Qwen-Audio environment's interpreter (the remote code needs transformers 4.x), from
tests/labelling/test_qwen_audio.py, which asserts on the one JSON object it prints:

    .venv-qwen-audio/bin/python tests/qwen_audio_features.py ./tiny-qwen-audio

1. Inputs, window by window: each window, rounded to 16 bits (`qwen_audio.pcm16`), is written to a 16-bit
   WAV and read back by the remote tokenizer's `process_audio` (ffmpeg, 30 s, one clip at a time), as
   features="remote" does; the same windows in one batch through `backend.audio_info` (torch, on the
   device, over the encoder's frames). Compared: the `<audio>` spans, the encoder lengths, the token ids
   and the log-mel over each window's encoder frames (max |difference|).
2. Labels: the same clips labelled with features="remote" and "torch" (ASR, cry score, cry both): how
   many transcripts / answers are identical and the largest |p_yes difference|, with each side's seconds.
Nothing is asserted here: the test does that on the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labelling_helpers import random_audio, real_shaped  # noqa: E402

from qwen_tasks.labelling import prompts  # noqa: E402
from qwen_tasks.labelling.backends import load_backend  # noqa: E402
from qwen_tasks.labelling.backends.qwen_audio import _zero_past_length, pcm16  # noqa: E402
from qwen_tasks.records import AudioClip, LabelRequest  # noqa: E402

SR = 16000
RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000)
# window lengths in samples where the frame arithmetic turns: whole frames, one past, odd encoder lengths
EDGES = (800, 16000, 16001, 16080, 16150, 16159, 16160, 479999, 480000)
REQUESTS = {
    "asr": LabelRequest("asr", max_new_tokens=12),
    "cry-score": LabelRequest("cry", methods=("score",)),
    "cry-both": LabelRequest("cry", methods=("score", "generate"), max_new_tokens=6),
}


def windows() -> list[np.ndarray]:
    """Real-shaped audio at every sample rate after resampling and random audio, 1-30 s, plus edges."""
    waves = [real_shaped(1.0 + 29.0 * k / 6, rate, k) for k, rate in enumerate(RATES)]
    waves += [random_audio(s, 100 + k) for k, s in enumerate((1.0, 2.7, 9.3, 17.0, 29.99, 30.0))]
    waves += [random_audio(n / SR, 200 + k)[:n] for k, n in enumerate(EDGES)]
    return waves


def compare_inputs(backend, waves: list[np.ndarray]) -> dict:
    spec = prompts.qwen_audio_spec(REQUESTS["asr"], backend.style)
    with tempfile.TemporaryDirectory(prefix="qwen_audio_features_") as tmp:
        paths = []
        for k, wave in enumerate(waves):
            paths.append(str(Path(tmp) / f"{k}.wav"))
            sf.write(paths[-1], pcm16(wave), SR, subtype="PCM_16")  # on the 16-bit grid: written exactly
        texts = [prompts.qwen_audio_prompt(spec, p) for p in paths]
        start = time.perf_counter()
        stock = [backend.tokenizer.process_audio(t) for t in texts]
        remote_s = time.perf_counter() - start
    _zero_past_length(stock)
    start = time.perf_counter()
    ours = backend.audio_info(waves, paths)
    torch_s = time.perf_counter() - start
    width = ours["input_audios"].shape[-1]
    diffs = [
        float((ours["input_audios"][row].cpu() - info["input_audios"][0, :, :width]).abs().max())
        for row, info in enumerate(stock)
    ]
    ids_stock = backend.tokenizer(texts, padding="longest", audio_info=stock)["input_ids"]
    spans = [{"audio_span_tokens": [s]} for s in ours["audio_span_tokens"]]
    ids_ours = backend.tokenizer(texts, padding="longest", audio_info=spans)["input_ids"]
    return {
        "windows": len(waves),
        "seconds": [len(w) / SR for w in waves],
        "max_abs_diff": max(diffs),
        "spans_equal": ours["audio_span_tokens"] == [i["audio_span_tokens"][0] for i in stock],
        "lengths_equal": ours["input_audio_lengths"].tolist()
        == [i["input_audio_lengths"][0].tolist() for i in stock],
        "ids_equal": ids_stock == ids_ours,
        "width": width,
        "remote_s": remote_s,
        "torch_s": torch_s,
    }


def compare_labels(backend, clips: list[AudioClip]) -> dict:
    out = {}
    for name, request in REQUESTS.items():
        results, seconds = {}, {}
        for features in ("remote", "torch"):
            backend.features = features
            start = time.perf_counter()
            results[features] = backend.label(clips, request)
            seconds[features] = time.perf_counter() - start
        pairs = list(zip(results["remote"], results["torch"], strict=True))
        out[name] = {
            "clips": len(pairs),
            "errors": [r.error for pair in pairs for r in pair if r.error],
            "identical_text": sum(a.text == b.text for a, b in pairs),
            "texts": sum(bool(b.text) for _, b in pairs),
            "max_dp_yes": max(
                (abs(a.p_yes - b.p_yes) for a, b in pairs if a.p_yes is not None), default=None
            ),
            "distinct_p_yes": len({round(b.p_yes, 6) for _, b in pairs if b.p_yes is not None}),
            "remote_s": seconds["remote"],
            "torch_s": seconds["torch"],
        }
    backend.features = "torch"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Qwen-Audio checkpoint (tests/qwen_audio_tiny.py builds one)")
    args = parser.parse_args()
    backend = load_backend(args.model, device="cpu")
    waves = windows()
    clips = [AudioClip(audio_id=k + 1, path=f"c{k}", waveform=w) for k, w in enumerate(waves[:13])]
    clips.append(AudioClip(audio_id=99, path="long", waveform=real_shaped(33.0, 44100, 7)))  # two windows
    report = {"default_features": backend.features, "inputs": compare_inputs(backend, waves)}
    report["labels"] = compare_labels(backend, clips)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The original Qwen-Audio backend's `mean_logprob` against a teacher-forced forward pass, on a checkpoint.

Run by the Qwen-Audio environment's interpreter (the remote code needs transformers 4.x), from
tests/labelling/test_qwen_audio.py, which asserts on the one JSON object it prints:

    .venv-qwen-audio/bin/python tests/qwen_audio_logprob.py ./tiny-qwen-audio

Clips of 1-4 s are transcribed in one batch by the backend (torch features, the log-prob recorder on);
then each clip alone by the stock path: the remote tokenizer's `process_audio` of its 16-bit WAV (ffmpeg,
30 s), a plain `generate` with the backend's greedy config and no processor or hook of ours, and one forward
pass of the model over the prompt and the generated ids up to and including the first stop, whose
log-softmax at the chosen ids gives the mean the backend should have recorded.

Twice: with the checkpoint as it is, and with an LM head that favours the end-of-document token by a bias
of +20 (a checkpoint with a biased head, not a hook). There greedy decoding would stop at once, but the
generation config's `min_new_tokens=1` sets the stop ids' scores to -inf at the first step, so the first
token is one the model gives about e^-19 (the tiny model's other logits are near 0): the case where the
scores generate hands a processor are not the model's log-probabilities. `renormalised` is what reading
them from those scores would give (measured: -5.6 where the model's mean is -9.6).
Nothing is asserted here: the test does that on the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labelling_helpers import random_audio  # noqa: E402

from qwen_tasks.labelling import prompts  # noqa: E402
from qwen_tasks.labelling.backends import load_backend  # noqa: E402
from qwen_tasks.labelling.backends.qwen_audio import pcm16  # noqa: E402
from qwen_tasks.records import AudioClip, LabelRequest  # noqa: E402

SR = 16000
ASR = LabelRequest("asr", max_new_tokens=8)
SECONDS = (1.0, 2.5, 4.0)
EOD_BIAS = 20.0


def recompute(backend, wave: np.ndarray, tmp: Path) -> dict:
    """The stock path for one clip: plain greedy text, and the mean log-prob of its tokens by a forward
    pass (`renormalised`: the same with the stop ids left out of the first step's softmax)."""
    import torch

    path = tmp / "clip.wav"
    sf.write(path, pcm16(wave), SR, subtype="PCM_16")
    text = prompts.qwen_audio_prompt(prompts.qwen_audio_spec(ASR, backend.style), str(path))
    audio_info = backend.tokenizer.process_audio(text)
    tokens = backend.tokenizer([text], return_tensors="pt", audio_info=[audio_info])
    prompt_len = tokens.input_ids.shape[1]
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
            generation_config=backend._greedy(ASR, ASR.max_new_tokens), audio_info=audio_info,
        )  # fmt: skip
        new = out.sequences[0, prompt_len:].tolist()
        n = next((k + 1 for k, t in enumerate(new) if t in backend.stop_ids), len(new))
        ids = out.sequences[:, : prompt_len + n]
        logits = (
            backend.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), audio_info=audio_info, use_cache=False
            )
            .logits[0, prompt_len - 1 : prompt_len + n - 1]
            .float()
        )
    chosen = ids[0, prompt_len:, None]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chosen).squeeze(-1)
    masked = logits.clone()
    masked[0, sorted(backend.stop_ids)] = -float("inf")  # what min_new_tokens leaves of the first step
    renormalised = torch.log_softmax(masked, dim=-1).gather(-1, chosen).squeeze(-1)
    return {
        "plain_text": backend._decode(new[: ASR.max_new_tokens]),
        "ids": new[:n],
        "recomputed": float(logprobs.mean()),
        "renormalised": float(renormalised.mean()),
    }


def compare(backend, clips: list[AudioClip]) -> list[dict]:
    batched = backend.label(clips, ASR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen_audio_logprob_") as tmp:
        for clip, result in zip(clips, batched, strict=True):
            row = {"error": result.error, "text": result.text, "mean_logprob": result.mean_logprob}
            rows.append({**row, **recompute(backend, clip.waveform, Path(tmp))})
    return rows


def favour_eod(backend, bias: float) -> None:
    """Give the model an LM head with a bias of `bias` on the end-of-document token (same weights)."""
    import torch

    head = backend.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[backend.eod_id] = bias
    backend.model.lm_head = biased.to(head.weight.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    backend = load_backend(str(args.checkpoint), device="cpu")
    clips = [
        AudioClip(audio_id=k + 1, path=f"/audio/{k}.wav", waveform=random_audio(s, 300 + k))
        for k, s in enumerate(SECONDS)
    ]
    report = {"stock": compare(backend, clips)}
    favour_eod(backend, EOD_BIAS)
    report["eod_favoured"] = compare(backend, clips)
    report["eod_id"] = backend.eod_id
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

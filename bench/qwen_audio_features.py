"""The original Qwen-Audio backend's log-mel features of one batch, before and after (issue 24).

Run by the Qwen-Audio environment's interpreter (its remote code needs transformers 4.x);
bench/inference.py runs it when that environment exists and prints its figures beside Qwen2-Audio's:

    .venv-qwen-audio/bin/python bench/qwen_audio_features.py --model ./tiny-qwen-audio
    QWEN_AUDIO_CODE_DIR=/tmp/Qwen-Audio .venv-qwen-audio/bin/python bench/qwen_audio_features.py

- before (features="remote"): what the backend did per sub-batch before the model: each window written
  to a 16-bit WAV, read back by the remote tokenizer's `process_audio` (the ffmpeg CLI, padded to 30 s,
  Whisper's log-mel one window at a time on the CPU), stacked;
- after (features="torch", the default): `QwenAudioBackend.audio_info`, the whole batch at once with
  `common.LogMel` on the model's device, over only the frames the encoder reads.
Same clips as bench/inference.py's features section (the first `--batch` of its 0.5-7 s synthetic
clips), best of `--repeat`. The max |difference| of the two over the encoder's frames, twice: as run
(the WAV rounds samples down to 16 bits, libsndfile's rule; ffmpeg's, which `pcm16` follows, rounds to
nearest: this moves the mel bins that sit at the 16-bit noise floor) and with the WAV written from
`pcm16`'s samples (same input: the log-mel arithmetic alone). Without --model
it builds the tiny checkpoint (tests/qwen_audio_tiny.py) from QWEN_AUDIO_CODE_DIR in a temp dir.
Prints one line to stderr and one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

SR = 16000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a Qwen-Audio checkpoint (default: build the tiny one)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import soundfile as sf
    import torch
    from inference import synth_clips  # bench/inference.py: the same clips

    from qwen_tasks.labelling import prompts
    from qwen_tasks.labelling.backends import load_backend
    from qwen_tasks.labelling.backends.qwen_audio import _zero_past_length, pcm16
    from qwen_tasks.records import LabelRequest

    tmp = tempfile.TemporaryDirectory(prefix="qwen_audio_features_")
    model = args.model
    if not model:
        code = os.environ.get("QWEN_AUDIO_CODE_DIR", "")
        if not code:
            raise SystemExit("no --model and QWEN_AUDIO_CODE_DIR is not set (docs/models.md)")
        from qwen_audio_tiny import build  # tests/qwen_audio_tiny.py

        model = str(build(Path(code).expanduser().resolve(), Path(tmp.name) / "tiny_qwen_audio"))
    backend = load_backend(model, device=args.device)
    waves = [c.waveform for c in synth_clips(args.batch)]
    spec = prompts.qwen_audio_spec(LabelRequest("cry", methods=("score",)), backend.style)
    paths = [str(Path(tmp.name) / f"{k}.wav") for k in range(len(waves))]

    def sync() -> None:
        if str(backend.device).startswith("cuda"):
            torch.cuda.synchronize()

    def before(rounded: bool = False) -> list[dict]:
        info = []
        for wave, path in zip(waves, paths, strict=True):
            samples = pcm16(wave) if rounded else np.clip(wave, -1.0, 1.0)  # the backend's old WAV
            sf.write(path, samples, SR, subtype="PCM_16")
            info.append(backend.tokenizer.process_audio(prompts.qwen_audio_prompt(spec, path)))
        _zero_past_length(info)
        return info

    def after() -> dict:
        out = backend.audio_info(waves, paths)
        sync()
        return out

    times = {}
    for name, fn in (("remote_30s", before), ("torch_trimmed", after)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    ours = after()
    width = ours["input_audios"].shape[-1]

    def max_diff(stock: list[dict]) -> float:
        return max(
            float((ours["input_audios"][row].float().cpu() - info["input_audios"][0, :, :width]).abs().max())
            for row, info in enumerate(stock)
        )

    stock = before()
    diff, same_input = max_diff(stock), max_diff(before(rounded=True))
    report = {
        "batch": len(waves),
        "audio_s": sum(len(w) for w in waves) / SR,
        "device": backend.device,
        **times,
        "speedup": times["remote_30s"] / times["torch_trimmed"],
        "encoder_frames": width,
        "max_abs_diff": diff,
        "max_abs_diff_same_input": same_input,
        "same_spans": ours["audio_span_tokens"] == [i["audio_span_tokens"][0] for i in stock],
    }
    print(
        f"qwen-audio features, batch of {report['batch']} ({report['audio_s']:.0f} s audio): remote "
        f"(WAV + ffmpeg + 30 s, per clip) {times['remote_30s'] * 1e3:.1f} ms, torch on {backend.device} "
        f"trimmed {times['torch_trimmed'] * 1e3:.1f} ms -> {report['speedup']:.1f}x; max |diff| {diff:.1e} "
        f"({same_input:.1e} on the same 16-bit samples)",
        file=sys.stderr,
    )
    print(json.dumps(report))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

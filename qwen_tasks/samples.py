"""Generated sample audio for the demo, the benchmarks and the tests (no downloads needed).

The clips are synthetic (tones, chirps, noise), so labels produced on them are only useful to show the
pipeline working; the mix of formats, rates, channel counts and lengths is what real folders look like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class SampleSet:
    root: Path
    clips: list[Path]
    asr_manifest: Path
    aqa_manifest: Path
    bad: list[Path]


def synth_clip(seconds: float, rate: int, seed: int, channels: int = 1, cry: bool = False) -> np.ndarray:
    """A deterministic clip: a wailing chirp (cry=True) or a hum with noise; float32, shape (n, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    if cry:  # 350-550 Hz wail with a 2 Hz sob rhythm, roughly how an infant cry looks on a spectrogram
        f0 = 450 + 100 * np.sin(2 * np.pi * 0.7 * t)
        signal = np.sin(2 * np.pi * np.cumsum(f0) / rate) * (0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 2 * t)))
    else:
        signal = 0.3 * np.sin(2 * np.pi * (120 + 40 * rng.random()) * t)
    signal = 0.4 * signal + 0.02 * rng.standard_normal(len(t))
    data = np.repeat(signal[:, None], channels, axis=1) if channels > 1 else signal[:, None]
    return data.astype(np.float32)


def write_sample_set(root: Path, n: int = 12, long_seconds: float = 45.0, seed: int = 0) -> SampleSet:
    """Write `n` clips (wav/flac/ogg, 8-48 kHz, mono and stereo, 1-7 s), one long clip, one duplicate,
    two broken files, and both manifest formats users already have. Existing files are left alone (the
    Vorbis encoder gives every .ogg a random stream serial, so rewriting one would change its bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested").mkdir(exist_ok=True)
    formats = [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")]
    rates = [16000, 8000, 22050, 44100, 48000]
    clips: list[Path] = []
    for i in range(n):
        ext, subtype = formats[i % len(formats)]
        rate = rates[i % len(rates)]
        seconds = 1.0 + (i * 0.53) % 6.0
        channels = 2 if i % 4 == 3 else 1
        folder = root / "nested" if i % 3 == 2 else root
        path = folder / f"clip_{i:03d}.{ext}"
        if not path.exists():
            data = synth_clip(seconds, rate, seed + i, channels, cry=i % 2 == 0)
            sf.write(path, data, rate, subtype=subtype)
        clips.append(path)
    long_path = root / "long_recording.wav"
    if not long_path.exists():
        sf.write(long_path, synth_clip(long_seconds, 16000, seed + 999, cry=True), 16000)
    clips.append(long_path)
    dup = root / "nested" / "copy of clip_000.wav"
    dup.write_bytes(clips[0].read_bytes())
    bad = [root / "broken.wav", root / "empty.flac"]
    bad[0].write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    bad[1].write_bytes(b"")

    asr = root / "asr.jsonl"
    aqa = root / "cry.jsonl"
    with asr.open("w", encoding="utf-8") as f:
        for i, path in enumerate(clips[:6]):
            text = "the quick brown fox jumps over the lazy dog" if i % 2 else "今天天气很好"
            f.write(
                json.dumps({"audio": path.relative_to(root).as_posix(), "text": text}, ensure_ascii=False)
            )
            f.write("\n")
    with aqa.open("w", encoding="utf-8") as f:
        for i, path in enumerate(clips):
            gold = "yes" if (i % 2 == 0 or path == long_path) else "no"
            row = {
                "question": "Is there a baby crying in this audio?",
                "audio": str(path),
                "gt": gold,
                "source": "synthetic",
            }
            f.write(json.dumps(row) + "\n")
    return SampleSet(root=root, clips=clips, asr_manifest=asr, aqa_manifest=aqa, bad=bad)

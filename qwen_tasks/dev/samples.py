"""Generated sample audio for the demo, the benchmarks and the tests (no downloads needed).

The clips are synthetic (tones, chirps, noise), so labels produced on them are only useful to show the
pipeline working; the mix of formats, rates, channel counts and lengths is what real folders look like.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
    import soundfile as sf  # only for writing files: the GPU benchmark uses the generators alone

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


# --- learnable synthetic sets (fine-tuning) -------------------------------------------------------------
# A random-init model cannot say anything true about real audio, but it can *learn* a task whose classes
# differ in the signal. These sets prove the fine-tune loop on CPU: the base tiny model is near chance on
# them, a LoRA fine-tune is not (docs/finetune.md has the figures).

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# DTMF-like pairs (low, high) Hz, one per digit word; 2-5 digits per clip, 0.25 s tone + 0.1 s silence.
_DIGIT_TONES = tuple((697 + 70 * (d % 4), 1209 + 130 * (d // 4)) for d in range(10))


def synth_cry_example(seconds: float, rate: int, rng: np.random.Generator, cry: bool) -> np.ndarray:
    """'cry': a harmonic tone, f0 380-560 Hz, vibrato 4-7 Hz of +-3 %, in on/off bursts. 'not cry': one
    of noise, a low hum (80-200 Hz) or a square-wave buzz (100-250 Hz). Mono float32."""
    t = np.arange(int(seconds * rate)) / rate
    if cry:
        f0 = rng.uniform(380, 560) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 7) * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        signal = sum(np.sin(k * phase) / k for k in (1, 2, 3))
        period = rng.uniform(0.5, 0.9)  # bursts: on for 60-80 % of each period
        signal = signal * (np.mod(t, period) < rng.uniform(0.6, 0.8) * period)
    else:
        kind = int(rng.integers(3))
        if kind == 0:
            signal = rng.standard_normal(len(t))
        elif kind == 1:
            f = rng.uniform(80, 200)
            signal = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)
        else:
            signal = np.sign(np.sin(2 * np.pi * rng.uniform(100, 250) * t))
    signal = signal / (np.abs(signal).max() + 1e-9)
    return (rng.uniform(0.2, 0.5) * signal + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def synth_digit_example(digits: list[int], rate: int, rng: np.random.Generator) -> np.ndarray:
    """Dual tones for each digit (0.25 s on, 0.1 s off), slightly detuned per clip. Mono float32."""
    parts = []
    detune = rng.uniform(0.98, 1.02)
    for d in digits:
        t = np.arange(int(0.25 * rate)) / rate
        low, high = _DIGIT_TONES[d]
        parts.append(0.3 * (np.sin(2 * np.pi * low * detune * t) + np.sin(2 * np.pi * high * detune * t)))
        parts.append(np.zeros(int(0.1 * rate)))
    signal = np.concatenate(parts)
    return (signal + 0.01 * rng.standard_normal(len(signal))).astype(np.float32)


def write_cry_training_set(root: Path, n: int = 240, seed: int = 0, rate: int = 16000) -> Path:
    """`n` clips of 1-4 s, half 'cry', half not, and an AQA manifest with their gold labels; returns the
    manifest. Deterministic for a given seed; existing files are rewritten identically."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = root / "cry_train.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i in range(n):
            cry = i % 2 == 0
            wave = synth_cry_example(float(rng.uniform(1.0, 4.0)), rate, rng, cry)
            name = f"cry_{i:04d}.wav"
            sf.write(root / name, wave, rate, subtype="PCM_16")
            row = {"question": "Is there a baby crying in this audio?", "audio": name,
                   "gt": "yes" if cry else "no", "source": "synthetic-learnable"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return manifest


def write_digit_training_set(root: Path, n: int = 240, seed: int = 0, rate: int = 16000) -> Path:
    """`n` clips of 2-5 dual-tone digits and an ASR manifest whose reference is the digit words
    ("three one four"); returns the manifest."""
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = root / "digits_train.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i in range(n):
            digits = [int(d) for d in rng.integers(0, 10, size=int(rng.integers(2, 6)))]
            name = f"digits_{i:04d}.wav"
            sf.write(root / name, synth_digit_example(digits, rate, rng), rate, subtype="PCM_16")
            text = " ".join(DIGIT_WORDS[d] for d in digits)
            f.write(json.dumps({"audio": name, "text": text, "language": "en"}) + "\n")
    return manifest

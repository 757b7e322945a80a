"""Inference benchmark: seed-style batch 1 vs our batching, score vs generate, pipeline overhead.

Run from the project root (builds the `bench` preset model in a temp dir unless --model is given):

    .venv/bin/python bench/inference.py                 # CPU, N=24 clips, 32 new tokens
    .venv/bin/python bench/inference.py --preset 7b --device cuda --n 64   # on a GPU

All sections use the same N synthetic clips (0.5-7 s) and the same loaded model, in one process:
1. seed-style (batch 1, generate, stock 30 s encoder, like the original scripts) vs ours
   (duration-sorted batches from jobs.make_batches, trimmed encoder), ASR; plus batch 1 as shipped;
2. cry detection: `score` (one forward pass) vs `generate` (N new tokens), batched;
3. log-mel features of one batch: numpy (30 s), the processor (30 s), ours (torch, on the device); the
   same for the original Qwen-Audio backend, before (its remote per-clip path: WAV, ffmpeg, 30 s) and
   after (torch, batched), when its environment exists (bench/qwen_audio_features.py, run there);
   pipeline: worker.label (the code behind `qwen-tasks label`: audio decode + resampling, windowing,
   database) before (processor features, serial) and after (torch features, overlapped worker) vs a bare
   `processor` + `model.generate` loop over the same batches, with the share of wall time the model
   was busy;
4. the audio encoder over 30 s (stock) vs only up to the batch's longest clip (our default).
Outputs are also compared (batch 1 vs batched must be identical: batch invariance).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tasks.records import AudioClip, LabelRequest  # noqa: E402

SR = 16000


@dataclass
class Timing:
    name: str
    seconds: float
    clips: int
    audio_s: float

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.seconds

    @property
    def rtf(self) -> float:
        return self.seconds / self.audio_s

    def row(self) -> str:
        return f"{self.name:<44} {self.seconds:8.2f} s  {self.clips_per_s:7.2f} clips/s  RTF {self.rtf:.4f}"

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "clips_per_s": self.clips_per_s, "rtf": self.rtf}


def synth_clips(n: int, seed: int = 0) -> list[AudioClip]:
    """n clips of 0.5-7 s (tone + noise, a few 'cry' chirps), deterministic."""
    from qwen_tasks.dev.samples import synth_clip

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        seconds = float(0.5 + 6.5 * rng.random())
        wave = synth_clip(seconds, SR, seed + i, cry=i % 3 == 0)[:, 0]
        clips.append(AudioClip(audio_id=i + 1, path=f"clip_{i:03d}.wav", waveform=wave))
    return clips


def batches_of(clips: list[AudioClip], batch_size: int, max_batch_seconds: float) -> list[list[AudioClip]]:
    from qwen_tasks.labelling.jobs import make_batches

    by_id = {c.audio_id: c for c in clips}
    plan = make_batches([(c.audio_id, c.duration_s) for c in clips], batch_size, max_batch_seconds)
    return [[by_id[a] for a, _ in batch] for batch in plan]


def timed(name: str, fn, clips: list[AudioClip]) -> tuple[Timing, object]:
    start = time.perf_counter()
    out = fn()
    return Timing(name, time.perf_counter() - start, len(clips), sum(c.duration_s for c in clips)), out


def same_outputs(a, b, tol: float = 1e-4) -> tuple[int, float]:
    """(number of clips with identical text, max |p_yes difference|)."""
    same = sum(x.text == y.text for x, y in zip(a, b, strict=True))
    diffs = [abs(x.p_yes - y.p_yes) for x, y in zip(a, b, strict=True) if x.p_yes is not None]
    return same, max(diffs, default=0.0)


# --- 3. bare loop -----------------------------------------------------------------------------------


def bare_loop(
    backend,
    batches: list[list[np.ndarray]],
    prompt: str,
    max_new_tokens: int,
    busy: list[float] | None = None,
) -> list[str]:
    """What a hand-written script does: processor + model.generate per batch, nothing else (`busy` gets
    the seconds spent in model.generate)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=backend.eos_ids,
        pad_token_id=backend.pad_id,
    )
    texts: list[str] = []
    for waves in batches:
        inputs = backend.processor(
            text=[prompt] * len(waves), audio=waves, sampling_rate=SR, return_tensors="pt", padding=True
        ).to(backend.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = backend.model.generate(**inputs, generation_config=config)
        if busy is not None:
            busy.append(time.perf_counter() - start)
        texts.extend(
            backend.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return texts


PIPELINES = {  # name -> (backend features, overlapped worker)
    "before": ("processor", False),  # the processor's CPU features over 30 s, one stage after the other
    "after": ("torch", True),  # torch features on the model's device, overlapped stages
}


def pipeline_section(args, backend, clips: list[AudioClip], request: LabelRequest) -> dict:
    """worker.label end to end on files in a throwaway database, before and after, vs the bare loop on
    the same batches; all with the stock 30 s encoder pass (like for like with the bare loop), then the
    'after' pipeline once more as shipped (trimmed encoder). The model's busy share = seconds inside
    model calls / wall seconds."""
    import soundfile as sf

    from qwen_tasks.ingest.register import ingest
    from qwen_tasks.labelling import worker
    from qwen_tasks.labelling.options import LabelOptions
    from qwen_tasks.store import database as db

    admin_url = args.admin_url or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres"
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in PIPELINES}}
    busy: dict[str, list[float]] = {k: [] for k in times}
    with db.scratch_database(admin_url, prefix="qwen_tasks_bench") as url:
        engine = db.get_engine(url)
        with tempfile.TemporaryDirectory(prefix="qwen_bench_audio_") as tmp:
            # half at 44.1 kHz stereo so the pipeline pays for decoding *and* resampling, like real folders
            for i, clip in enumerate(clips):
                if i % 2:
                    import soxr

                    wave = soxr.resample(clip.waveform, SR, 44100)
                    sf.write(Path(tmp) / f"clip_{i:03d}.flac", np.stack([wave, wave], axis=1), 44100)
                else:
                    sf.write(Path(tmp) / f"clip_{i:03d}.wav", clip.waveform, SR, subtype="PCM_16")
            ingest(engine, [Path(tmp)])
            summary = None
            batches: list[list[np.ndarray]] = []
            shipped = (backend.trim_audio, backend.features, os.environ.get("QWEN_TASKS_OVERLAP"))
            n_run = 0

            def run_pipeline(name: str, trim: bool) -> tuple[float, float]:
                nonlocal summary, n_run
                backend.trim_audio = trim
                backend.features, overlap = PIPELINES[name]
                os.environ["QWEN_TASKS_OVERLAP"] = "1" if overlap else "0"
                model_s = backend.model_seconds
                start = time.perf_counter()
                opts = LabelOptions.from_mapping(
                    {"tasks": [request.task], "model": backend.model_id, "device": args.device,
                     "batch_size": args.batch_size, "max_batch_seconds": args.max_batch_seconds,
                     "relabel": n_run > 0, "max_new_tokens": request.max_new_tokens,
                     "language": request.language, "question": request.question}
                )  # fmt: skip
                summary = worker.label(engine, opts, backend_factory=lambda run: backend)
                elapsed = time.perf_counter() - start
                n_run += 1
                if summary.labelled != len(clips):
                    raise RuntimeError(f"pipeline labelled {summary.labelled}/{len(clips)}: {summary.errors}")
                return elapsed, (backend.model_seconds - model_s) / elapsed

            for _ in range(args.repeat):  # interleaved, so load from other processes hits all of them
                for name in PIPELINES:
                    elapsed, share = run_pipeline(name, trim=False)
                    times[name].append(elapsed)
                    busy[name].append(share)
                    if not batches:
                        batches = _job_batches(engine, summary.run_id)
                backend.trim_audio, backend.features = False, "processor"
                spent: list[float] = []
                start = time.perf_counter()
                bare_loop(backend, batches, backend.prompt_text(request), request.max_new_tokens, spent)
                elapsed = time.perf_counter() - start
                times["bare"].append(elapsed)
                busy["bare"].append(sum(spent) / elapsed)
            trimmed_s, trimmed_busy = run_pipeline("after", trim=True)
            backend.trim_audio, backend.features = shipped[0], shipped[1]
            if shipped[2] is None:
                os.environ.pop("QWEN_TASKS_OVERLAP", None)
            else:
                os.environ["QWEN_TASKS_OVERLAP"] = shipped[2]
    best = {k: min(range(len(v)), key=v.__getitem__) for k, v in times.items()}
    out = {f"{k}_s": times[k][best[k]] for k in times}
    out.update({f"{k}_busy": busy[k][best[k]] for k in times})
    out.update({f"{k}_all_s": times[k] for k in times})
    bare_s = out["bare_s"]
    out.update({
        "before_vs_bare": out["before_s"] / bare_s,
        "after_vs_bare": out["after_s"] / bare_s,
        "after_trimmed_s": trimmed_s,
        "after_trimmed_busy": trimmed_busy,
        "jobs": len(batches),
        "labelled": summary.labelled if summary else 0,
    })  # fmt: skip
    return out


def features_section(backend, clips: list[AudioClip], batch: int, repeat: int = 3) -> dict:
    """Log-mel features of one batch: the numpy path (per clip, 30 s), the processor as it runs here
    (WhisperFeatureExtractor.__call__: torch on the CPU when torch is installed, 30 s), and ours (LogMel on
    the model's device: trimmed to the longest clip as shipped, and over 30 s). Best of `repeat`."""
    import torch

    from qwen_tasks.labelling.backends.common import LogMel

    extractor = backend.processor.feature_extractor
    log_mel = LogMel.from_feature_extractor(extractor)
    waves = [c.waveform for c in clips[:batch]]
    lengths = [log_mel.clip_frames(len(w)) for w in waves]

    def sync() -> None:
        if str(backend.device).startswith("cuda"):
            torch.cuda.synchronize()

    def numpy_path():
        padded = np.zeros((len(waves), extractor.n_samples), dtype=np.float32)
        for row, w in enumerate(waves):
            padded[row, : len(w)] = w
        return extractor._np_extract_fbank_features(padded, "cpu")

    def processor_path():
        return extractor(waves, sampling_rate=SR, return_attention_mask=True, return_tensors="pt")

    def ours(frames):
        out = log_mel(waves, backend.device, frames)
        sync()
        return out

    cases = {
        "numpy_30s": numpy_path,
        "processor_30s": processor_path,
        "torch_trimmed": lambda: ours(log_mel.trimmed_frames(lengths)),
        "torch_30s": lambda: ours(None),
    }
    out: dict = {"batch": len(waves), "audio_s": sum(len(w) for w in waves) / SR}
    for name, fn in cases.items():
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = best
    reference = numpy_path()
    got, _ = ours(None)
    out["max_abs_diff_vs_numpy"] = float(np.abs(got.cpu().numpy() - reference).max())
    out["speedup_vs_numpy"] = out["numpy_30s"] / out["torch_trimmed"]
    out["speedup_vs_processor"] = out["processor_30s"] / out["torch_trimmed"]
    return out


def qwen_audio_features(args, batch: int) -> dict | str:
    """The original Qwen-Audio backend's features of one batch, before and after: bench/qwen_audio_features.py
    run by the Qwen-Audio environment's interpreter on --qwen-audio-model (else the tiny checkpoint built
    from QWEN_AUDIO_CODE_DIR); a line saying why not when it cannot run here."""
    import subprocess

    from qwen_tasks.labelling import environments

    python = environments.interpreter()
    if not python.exists():
        return f"skipped: no Qwen-Audio environment at {python} (make install-qwen-audio)"
    if not args.qwen_audio_model and not os.environ.get("QWEN_AUDIO_CODE_DIR"):
        return "skipped: no --qwen-audio-model and QWEN_AUDIO_CODE_DIR is not set (docs/models.md)"
    command = [str(python), str(ROOT / "bench" / "qwen_audio_features.py"), "--batch", str(batch),
               "--device", args.device]  # fmt: skip
    if args.qwen_audio_model:
        command += ["--model", args.qwen_audio_model]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {proc.returncode}): {last}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _job_batches(engine, run_id: int) -> list[list[np.ndarray]]:
    """The run's jobs as batches of decoded audio (decoded here, outside any timing)."""
    import sqlalchemy as sa

    from qwen_tasks.ingest.audio_files import load_waveform
    from qwen_tasks.store.schema import audio_file, label_job, label_job_item

    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(label_job.c.seq, audio_file.c.path)
            .select_from(label_job_item)
            .join(label_job, label_job.c.id == label_job_item.c.job_id)
            .join(audio_file, audio_file.c.audio_id == label_job_item.c.audio_id)
            .where(label_job.c.run_id == run_id, audio_file.c.status == "ok")
            .order_by(label_job.c.seq, label_job_item.c.audio_id)
        ).all()
    groups: dict[int, list[np.ndarray]] = {}
    for seq, path in rows:
        groups.setdefault(seq, []).append(load_waveform(path))
    return [groups[k] for k in sorted(groups)]


# --- 4. encoder only up to the longest clip -----------------------------------------------------------


def trim_section(backend, batches: list[list[AudioClip]], score: LabelRequest, asr: LabelRequest) -> dict:
    """Stock 30 s encoder pass vs the trimmed one (backend.trim_audio), same batches, same model."""
    clips = [c for b in batches for c in b]
    out: dict = {}
    for name, request in (("score", score), ("asr", asr)):
        runs = {}
        for trim in (False, True):
            backend.trim_audio = trim
            runs[trim] = timed(
                name, lambda r=request: [x for b in batches for x in backend.label(b, r)], clips
            )
        (full_t, full), (trim_t, trimmed) = runs[False], runs[True]
        same, p_diff = same_outputs(full, trimmed)
        out[name] = {
            "full_s": full_t.seconds,
            "trimmed_s": trim_t.seconds,
            "saving_pct": 100 * (1 - trim_t.seconds / full_t.seconds),
            "identical_text": same,
            "max_abs_p_yes_diff": p_diff,
        }
    backend.trim_audio = True
    return out  # leaves the backend trimmed, as shipped


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint dir or hub id (default: build --preset in a temp dir)")
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench", "7b"])
    parser.add_argument("--n", type=int, default=24, help="number of clips (default 24)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-seconds", type=float, default=240.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip section 3 (needs PostgreSQL)")
    parser.add_argument("--skip-seed", action="store_true", help="skip the slow batch-1 baseline")
    parser.add_argument("--no-trim", action="store_true", help="sections 1-3 with the stock 30 s encoder")
    parser.add_argument("--repeat", type=int, default=2, help="pipeline vs bare repetitions (min is kept)")
    parser.add_argument("--admin-url", help="PostgreSQL admin URL for the throwaway bench database")
    parser.add_argument("--qwen-audio-model", help="Qwen-Audio checkpoint for its features row (default: "
                        "built from QWEN_AUDIO_CODE_DIR; the row needs .venv-qwen-audio)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch

    from qwen_tasks.dev.tiny_model import make_tiny_model
    from qwen_tasks.labelling.backends import load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="qwen_bench_model_")
    model = args.model or str(make_tiny_model(Path(tmp.name) / args.preset, args.preset))
    t0 = time.perf_counter()
    backend = load_backend(model, device=args.device, trim_audio=not args.no_trim)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in backend.model.parameters())
    clips = synth_clips(args.n)
    audio_s = sum(c.duration_s for c in clips)
    batches = batches_of(clips, args.batch_size, args.max_batch_seconds)
    asr = LabelRequest("asr", max_new_tokens=args.max_new_tokens)
    score = LabelRequest("cry", methods=("score",))
    gen = LabelRequest("cry", methods=("generate",), max_new_tokens=args.max_new_tokens)
    backend.label(clips[:2], asr)  # warm-up (allocator, kernels)

    report: dict = {
        "model": model if args.model else f"{args.preset} preset (random init)",
        "params_m": n_params / 1e6,
        "device": backend.device,
        "dtype": backend.dtype,
        "torch_threads": torch.get_num_threads(),
        "host": platform.processor() or platform.machine(),
        "load_avg_start": os.getloadavg()[0],
        "n_clips": len(clips),
        "audio_seconds": audio_s,
        "batches": [len(b) for b in batches],
        "max_new_tokens": args.max_new_tokens,
        "model_load_s": load_s,
    }
    print(
        f"model: {report['model']}, {n_params / 1e6:.1f}M params, {backend.device}/{backend.dtype}, "
        f"{report['torch_threads']} threads, load avg {report['load_avg_start']:.2f}"
    )
    print(
        f"{len(clips)} clips, {audio_s:.1f} s audio, batches {report['batches']}, "
        f"{args.max_new_tokens} new tokens\n"
    )

    ordered = [c for b in batches for c in b]
    ours_t, ours = timed(
        "ours: duration-sorted batches, generate",
        lambda: [r for b in batches for r in backend.label(b, asr)],
        ordered,
    )
    print(ours_t.row())
    report["asr_batched"] = ours_t.to_dict()
    if not args.skip_seed:
        shipped = backend.trim_audio
        backend.trim_audio = False  # the seed scripts run the stock forward: 30 s of encoder per clip
        seed_t, seed = timed(
            "seed-style: batch 1, generate, stock encoder",
            lambda: [backend.label([c], asr)[0] for c in ordered],
            ordered,
        )
        backend.trim_audio = shipped
        one_t, one = timed(
            "batch 1, generate, as shipped", lambda: [backend.label([c], asr)[0] for c in ordered], ordered
        )
        print(seed_t.row())
        print(one_t.row())
        same, _ = same_outputs(seed, ours)
        same_one, _ = same_outputs(one, ours)
        speedup = seed_t.seconds / ours_t.seconds
        print(
            f"  -> ours vs seed-style {speedup:.2f}x; batching alone (batch 1 vs batched, both as shipped) "
            f"{one_t.seconds / ours_t.seconds:.2f}x; identical transcripts: "
            f"{same}/{len(ordered)} (seed-style), {same_one}/{len(ordered)} (batch 1)"
        )
        report["asr_batch1_seed"] = seed_t.to_dict()
        report["asr_batch1_shipped"] = one_t.to_dict()
        report["asr_speedup_vs_seed"] = speedup
        report["asr_speedup_batching_alone"] = one_t.seconds / ours_t.seconds
        report["asr_identical"] = min(same, same_one)

    score_t, scored = timed(
        "cry score (1 forward pass), batched",
        lambda: [r for b in batches for r in backend.label(b, score)],
        ordered,
    )
    gen_t, generated = timed(
        f"cry generate ({args.max_new_tokens} tokens), batched",
        lambda: [r for b in batches for r in backend.label(b, gen)],
        ordered,
    )
    print(score_t.row())
    print(gen_t.row())
    _, p_diff = same_outputs(scored, generated)
    print(
        f"  -> score {gen_t.seconds / score_t.seconds:.2f}x faster than generate; "
        f"max |p_yes(score) - p_yes(first generate step)| = {p_diff:.2e}"
    )
    report["cry_score"] = score_t.to_dict()
    report["cry_generate"] = gen_t.to_dict()
    report["score_speedup"] = gen_t.seconds / score_t.seconds
    report["score_vs_generate_p_diff"] = p_diff

    feats = features_section(backend, clips, 16)  # as drawn (not duration-sorted): 0.5-7 s mixed
    print(
        f"\nlog-mel features, batch of {feats['batch']} ({feats['audio_s']:.0f} s audio): "
        f"numpy 30 s {feats['numpy_30s'] * 1e3:.1f} ms, "
        f"processor 30 s {feats['processor_30s'] * 1e3:.1f} ms, "
        f"torch on {backend.device} trimmed {feats['torch_trimmed'] * 1e3:.1f} ms "
        f"(30 s {feats['torch_30s'] * 1e3:.1f} ms) -> {feats['speedup_vs_numpy']:.1f}x vs numpy, "
        f"{feats['speedup_vs_processor']:.1f}x vs processor; max |diff| {feats['max_abs_diff_vs_numpy']:.1e}"
    )
    report["features"] = feats
    qa = qwen_audio_features(args, 16)
    if isinstance(qa, str):
        print(f"qwen-audio backend features: {qa}")
    else:
        print(
            f"qwen-audio backend features, same batch: remote (WAV + ffmpeg, 30 s, per clip) "
            f"{qa['remote_30s'] * 1e3:.1f} ms, torch on {qa['device']} trimmed "
            f"{qa['torch_trimmed'] * 1e3:.1f} ms -> {qa['speedup']:.1f}x; "
            f"max |diff| {qa['max_abs_diff_same_input']:.1e} on the same 16-bit samples"
        )
    report["qwen_audio_features"] = qa

    if args.skip_pipeline:
        print("\npipeline overhead: skipped (--skip-pipeline)")
    else:
        pipe = pipeline_section(args, backend, clips, asr)
        print(f"\npipeline vs bare loop, {pipe['jobs']} batches, stock 30 s encoder (best of {args.repeat}):")
        rows = (
            ("bare loop: processor + model.generate", "bare"),
            ("pipeline before: processor features, serial", "before"),
            ("pipeline after: torch features, overlapped", "after"),
        )
        for label, key in rows:
            ratio = pipe[f"{key}_s"] / pipe["bare_s"]
            print(
                f"  {label:<46} {pipe[f'{key}_s']:7.2f} s  {ratio:5.2f}x bare  "
                f"model busy {100 * pipe[f'{key}_busy']:5.1f} %"
            )
        print(
            f"  pipeline after, as shipped (trimmed encoder)   {pipe['after_trimmed_s']:7.2f} s  "
            f"model busy {100 * pipe['after_trimmed_busy']:5.1f} %"
        )
        report["pipeline"] = pipe

    trim = trim_section(backend, batches, score, asr)
    for name, t in trim.items():
        print(
            f"\nencoder up to the longest clip ({name}): {t['trimmed_s']:.2f} s vs {t['full_s']:.2f} s "
            f"over 30 s -> saving {t['saving_pct']:.1f} %, "
            f"identical text {t['identical_text']}/{len(clips)}, "
            f"max |p_yes diff| {t['max_abs_p_yes_diff']:.2e}"
        )
    report["encoder_trim"] = trim
    report["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()

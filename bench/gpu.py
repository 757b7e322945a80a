"""GPU validation on real Qwen2-Audio-7B shapes (random weights): throughput, memory, OOM back-off, LoRA.

One script, one run, figures side by side (issue 16). On a GPU machine:

    python bench/gpu.py --preset 7b --device cuda --json gpu.json

and on the CPU, to check the script itself on the `bench` preset:

    .venv/bin/python bench/gpu.py --preset bench --device cpu --batches 1,4,8 --n-min 8 --lora-batch 2

Sections (each runs on the same synthetic 5-s clips and the same loaded model):
1. the model: `make_tiny_model(preset)` built on this machine (nothing big is copied here), then loaded
   through the shipped path (`load_backend`, bf16 on CUDA);
2. batch sweep: clips/s, RTF and peak GPU memory (`torch.cuda.max_memory_allocated`) per batch size,
   for ASR (`--max-new-tokens`, default 32) and cry `score`, up to the largest batch that fits without
   out-of-memory back-off; transcripts and p_yes are compared with batch 1 (batch invariance);
3. encoder trimming: trimmed encoder pass vs the stock 30-s pass on the same batches, same outputs;
4. OOM back-off: memory capped (`torch.cuda.set_per_process_memory_fraction`) so a large batch cannot
   fit; the backend halves the batch until it does, and the labels must equal the uncapped ones;
5. LoRA: one-step timings and peak memory of the fine-tune trainer (`qwen_tasks.finetune.trainer`) at batch
   `--lora-batch` with gradient checkpointing, on 5-s and 30-s clips.
6. engine: log-mel features of a batch (numpy / processor / torch on the device), cry score with the
   processor's features vs ours and the model's busy share, the decode modes (QWEN_TASKS_COMPILE_DECODE:
   off / static / compile, CUDA only) on ASR, and with --admin-url the pipeline before/after vs the bare
   loop (bench/inference.py's section). Not run on a GPU yet (docs/gpu.md).
Targets (issue 16): batched >= 8x batch 1 and RTF <= 0.005 on 5-s clips; the seed's stock scripts ran
at RTF ~0.6 on 8xA100.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tasks.records import AudioClip, LabelRequest  # noqa: E402

SR = 16000


def synth(n: int, seconds: float, seed: int = 0) -> list[AudioClip]:
    """n deterministic clips of `seconds` (half cry-like harmonic tones, half noise/hum/buzz)."""
    from qwen_tasks.dev.samples import synth_cry_example

    rng = np.random.default_rng(seed)
    return [
        AudioClip(
            audio_id=i + 1, path=f"clip_{i:04d}", waveform=synth_cry_example(seconds, SR, rng, i % 2 == 0)
        )
        for i in range(n)
    ]


class OomCounter(logging.Handler):
    """Counts the backend's out-of-memory back-offs (logged by qwen_tasks.labelling.backends.backoff)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "out of memory" in record.getMessage():
            self.count += 1


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return None


def run_batches(backend, clips: list[AudioClip], request: LabelRequest, batch: int) -> tuple[float, list]:
    """Label `clips` in consecutive batches of `batch` (max_batch too, so the backend does not re-split)."""
    backend.max_batch = batch
    sync(backend.device)
    start = time.perf_counter()
    out = []
    for i in range(0, len(clips), batch):
        out.extend(backend.label(clips[i : i + batch], request))
    sync(backend.device)
    return time.perf_counter() - start, out


def compare(a: list, b: list) -> dict:
    same = sum(x.text == y.text for x, y in zip(a, b, strict=False))
    diffs = [abs(x.p_yes - y.p_yes) for x, y in zip(a, b, strict=False) if x.p_yes is not None]
    errors = sum(1 for x in (*a, *b) if x.error)
    return {"identical_text": same, "n": min(len(a), len(b)), "max_p_yes_diff": max(diffs, default=0.0),
            "errors": errors}  # fmt: skip


def section(report: dict, name: str, fn, args) -> None:
    """Run one section; a failure is recorded and printed, and the other sections still run."""
    print(f"\n== {name} ==", flush=True)
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    report.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint dir (default: build --preset in a temp dir here)")
    parser.add_argument("--preset", default="7b", choices=["tiny", "bench", "7b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batches", default="1,8,32,64,128,256,512", help="batch sizes to sweep")
    parser.add_argument("--n-min", type=int, default=16, help="clips per batch size: max(n-min, 2 x batch)")
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--trim-batch", type=int, default=64, help="batch size of the trimming section")
    parser.add_argument("--oom-batch", type=int, default=256, help="batch that must back off under the cap")
    parser.add_argument("--lora-batch", type=int, default=4)
    parser.add_argument("--lora-steps", type=int, default=3, help="steps per clip length (first is warm-up)")
    parser.add_argument("--engine-batches", default="32,128", help="batch sizes of the engine section")
    parser.add_argument("--admin-url", help="PostgreSQL admin URL: engine section also runs the pipeline")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: sweep,trim,oom,lora,engine"
    )
    parser.add_argument("--json", help="write the figures to this JSON file (after every section)")
    args = parser.parse_args()

    import torch
    import transformers

    from qwen_tasks.dev.tiny_model import make_tiny_model
    from qwen_tasks.labelling.backends import load_backend

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    counter = OomCounter()
    logging.getLogger("qwen_tasks.labelling.backends.backoff").addHandler(counter)
    cuda = args.device.startswith("cuda")
    report: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "host": platform.node(),
        "argv": sys.argv,
    }
    print(json.dumps(report))

    tmp = tempfile.TemporaryDirectory(prefix="qwen_gpu_bench_")
    t0 = time.perf_counter()
    model = args.model or str(make_tiny_model(Path(tmp.name) / args.preset, args.preset))
    report["build_s"] = time.perf_counter() - t0
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the builder's copy of the weights is gone: give its memory back
    t0 = time.perf_counter()
    backend = load_backend(model, device=args.device, dtype=args.dtype)
    sync(backend.device)
    report["load_s"] = time.perf_counter() - t0
    report["params_b"] = sum(p.numel() for p in backend.model.parameters()) / 1e9
    report["dtype"] = backend.dtype
    report["weights_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else None
    print(
        f"model {args.preset}: {report['params_b']:.2f} B params, {backend.dtype}, "
        f"build {report['build_s']:.1f} s, load {report['load_s']:.1f} s, "
        f"weights {report['weights_gib']} GiB",
        flush=True,
    )

    asr = LabelRequest("asr", max_new_tokens=args.max_new_tokens)
    score = LabelRequest("cry", methods=("score",))
    sizes = [int(b) for b in args.batches.split(",")]
    n_all = max(min(max(args.n_min, 2 * b), max(b, 512)) for b in sizes)
    clips = synth(max(n_all, args.oom_batch, args.trim_batch), args.clip_seconds)
    backend.label(clips[:2], asr)  # warm-up: kernels, allocator
    backend.label(clips[:2], score)
    reference: dict[str, list] = {}

    def sweep() -> dict:
        rows = []
        for b in sizes:
            n = min(max(args.n_min, 2 * b), max(b, 512))  # two batches each, one for the very large
            row: dict = {"batch": b, "clips": n}
            for name, request in (("asr", asr), ("score", score)):
                backend.label(clips[: min(b, 4)], request)  # warm-up at this shape family
                peak_reset(backend.device)
                before = counter.count
                seconds, out = run_batches(backend, clips[:n], request, b)
                audio = n * args.clip_seconds
                backed_off = counter.count > before
                row[name] = {"seconds": seconds, "clips_per_s": n / seconds, "rtf": seconds / audio,
                             "peak_gib": peak_gib(backend.device), "oom_backoff": backed_off}  # fmt: skip
                if b == 1:
                    reference[name] = out
                else:
                    row[name]["vs_batch1"] = compare(reference[name], out)
                r = row[name]
                print(
                    f"batch {b:4d} {name:5s} {seconds:8.2f} s {r['clips_per_s']:9.2f} clips/s "
                    f"RTF {r['rtf']:.5f} peak {r['peak_gib']} GiB backoff={backed_off} "
                    f"{r.get('vs_batch1', '')}",
                    flush=True,
                )
                if name == "asr":
                    reference.setdefault(f"asr_{b}", out)
            rows.append(row)
            if row["asr"]["oom_backoff"] or row["score"]["oom_backoff"]:
                print(f"batch {b} needed out-of-memory back-off: the largest batch that fits is smaller")
                break
        one = {name: rows[0][name]["clips_per_s"] for name in ("asr", "score")}
        best = {name: max(r[name]["clips_per_s"] for r in rows) for name in ("asr", "score")}
        return {"rows": rows, "speedup_best_vs_batch1": {k: best[k] / one[k] for k in one},
                "best_rtf": {k: min(r[k]["rtf"] for r in rows) for k in one}}  # fmt: skip

    def trim() -> dict:
        b = args.trim_batch
        part = clips[:b]
        out = {}
        for name, request in (("asr", asr), ("score", score)):
            runs = {}
            for flag in (False, True):
                backend.trim_audio = flag
                runs[flag] = run_batches(backend, part, request, b)
            backend.trim_audio = True
            (full_s, full), (trim_s, trimmed) = runs[False], runs[True]
            out[name] = {
                "full_s": full_s,
                "trimmed_s": trim_s,
                "speedup": full_s / trim_s,
                **compare(full, trimmed),
            }
            print(f"{name}: stock 30-s encoder vs trimmed: {out[name]}", flush=True)
        return out

    def oom() -> dict:
        if not cuda:
            return {"skipped": "needs CUDA"}
        b = args.oom_batch
        part = clips[:b]
        backend.max_batch = None
        peak_reset(backend.device)
        t0 = time.perf_counter()
        free_run = backend.label(part, score)
        sync(backend.device)
        free_s = time.perf_counter() - t0
        need = torch.cuda.max_memory_allocated()
        weights = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = weights + 0.3 * (need - weights)  # room for about a third of the batch's activations
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        before = counter.count
        try:
            t0 = time.perf_counter()
            capped = backend.label(part, score)
            sync(backend.device)
            capped_s = time.perf_counter() - t0
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        res = {
            "batch": b,
            "uncapped_s": free_s,
            "uncapped_peak_gib": need / 2**30,
            "cap_gib": cap / 2**30,
            "capped_s": capped_s,
            "oom_backoffs": counter.count - before,
            **compare(free_run, capped),
        }
        labels_free = [r.p_yes is not None and r.p_yes >= 0.5 for r in free_run]
        labels_cap = [r.p_yes is not None and r.p_yes >= 0.5 for r in capped]
        res["identical_labels"] = labels_free == labels_cap
        print(res, flush=True)
        return res

    def lora() -> dict:
        import torch

        from qwen_tasks.finetune import trainer
        from qwen_tasks.finetune.trainer import Example, TrainConfig, train

        out = {}
        prompt = backend.prompt_text(LabelRequest("cry"))
        b = args.lora_batch
        cases = [(args.clip_seconds, True, b), (30.0, True, b), (30.0, False, b), (30.0, True, 2 * b)]
        shipped_loss = trainer.answer_loss
        saved: list[int] = []

        def counted_loss(*a, **k):  # bytes autograd keeps for backward: what checkpointing saves
            total = [0]

            def pack(t):
                total[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = shipped_loss(*a, **k)
            saved.append(total[0])
            return loss

        trainer.answer_loss = counted_loss
        try:
            for seconds, ckpt, batch in cases:
                part = synth(batch * args.lora_steps, seconds, seed=7)
                examples = [
                    Example(c.audio_id, c.waveform, "yes" if i % 2 == 0 else "no") for i, c in enumerate(part)
                ]
                step_times: list[float] = []
                last = [time.perf_counter()]

                def tick(p, step_times=step_times, last=last) -> None:
                    now = time.perf_counter()
                    step_times.append(now - last[0])
                    last[0] = now

                saved.clear()
                peak_reset(backend.device)
                config = TrainConfig(epochs=1, batch_size=batch, gradient_checkpointing=ckpt)
                peft_model, result = train(backend, prompt, examples, config, progress=tick)
                backend.model = peft_model.unload()  # drop the adapter again: the next case starts clean
                row = {
                    "clip_s": seconds,
                    "batch": batch,
                    "checkpointing": ckpt,
                    "steps": result.steps,
                    "s_per_step_after_first": float(np.mean(step_times[1:])) if len(step_times) > 1 else None,
                    "first_step_s": step_times[0] if step_times else None,
                    "saved_for_backward_gib": max(saved) / 2**30 if saved else None,
                    "losses": result.losses,
                    "trainable_m": result.trainable_params / 1e6,
                    "peak_gib": (result.peak_memory_bytes or 0) / 2**30 if cuda else None,
                }
                print(row, flush=True)
                out[f"{int(seconds)}s_b{batch}{'' if ckpt else '_no_checkpointing'}"] = row
        finally:
            trainer.answer_loss = shipped_loss
        return out

    def engine() -> dict:
        """Keeping the accelerator busy: log-mel features (numpy / processor / torch on the device), cry
        score with the processor's features vs ours and the model's busy share (seconds in model calls
        / wall), the decode modes (QWEN_TASKS_COMPILE_DECODE) on ASR, and, with --admin-url, the
        pipeline before/after vs the bare loop (bench/inference.py's section, same code)."""
        sys.path.insert(0, str(ROOT / "bench"))
        import inference  # bench/inference.py

        out: dict = {"features": inference.features_section(backend, clips, 16)}
        out["features_b128"] = inference.features_section(backend, clips, 128)
        print(out["features"], "\n", out["features_b128"], flush=True)
        shipped = backend.features
        for batch in [int(b) for b in args.engine_batches.split(",")]:
            for features in ("processor", "torch"):
                backend.features = features
                backend.label(clips[:batch], score)  # warm-up at this shape
                busy0 = backend.model_seconds
                seconds, _ = run_batches(backend, clips, score, batch)
                row = {"clips_per_s": len(clips) / seconds, "busy": (backend.model_seconds - busy0) / seconds}
                out[f"score_b{batch}_{features}"] = row
                print(f"score batch {batch} features {features}: {row}", flush=True)
        backend.features = shipped
        if cuda:
            shipped_mode = backend.decode_mode
            batch = min(64, len(clips))
            for mode in ("off", "static", "compile"):
                backend.decode_mode = mode
                backend.label(clips[:batch], asr)  # warm-up (compilation happens here)
                seconds, results = run_batches(backend, clips[: 2 * batch], asr, batch)
                out[f"asr_b{batch}_decode_{mode}"] = {"clips_per_s": 2 * batch / seconds}
                reference.setdefault("decode", results)
                out[f"asr_b{batch}_decode_{mode}"].update(compare(reference["decode"], results))
                print(mode, out[f"asr_b{batch}_decode_{mode}"], flush=True)
            backend.decode_mode = shipped_mode
        else:
            out["decode_modes"] = (
                "CUDA only (torch.compile on the CPU is checked by tests/labelling/test_features.py)"
            )
        if args.admin_url:
            bench_args = argparse.Namespace(
                admin_url=args.admin_url, device=args.device, batch_size=16, max_batch_seconds=240.0, repeat=2
            )
            out["pipeline"] = inference.pipeline_section(bench_args, backend, inference.synth_clips(48), asr)
            print(out["pipeline"], flush=True)
        return out

    for name, fn in (("sweep", sweep), ("trim", trim), ("oom", oom), ("lora", lora), ("engine", engine)):
        if name not in skip:
            section(report, name, fn, args)
    report["oom_backoffs_total"] = counter.count
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "sweep"}, default=str)[:4000])
    tmp.cleanup()


if __name__ == "__main__":
    main()

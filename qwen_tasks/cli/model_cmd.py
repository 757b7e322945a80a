"""`qwen-tasks make-tiny-model`: write a random-init Qwen2-Audio checkpoint for tests, demo and benchmarks."""

from __future__ import annotations

from pathlib import Path

import typer

from qwen_tasks.cli.common import app, console, fail
from qwen_tasks.errors import ConfigError


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Path = typer.Argument(..., help="Directory to write the checkpoint to (created if missing)."),
    preset: str = typer.Option(
        "tiny",
        "--preset",
        help="tiny (tests, ~1 MB) | bench (~100M params, CPU benchmark) | 7b (real shapes, GPU).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for the weights (same seed, same checkpoint)."),
    base: bool = typer.Option(False, "--base", help="Write no chat template: behaves like the base model."),
) -> None:
    """Build a random-init Qwen2-Audio model + offline tokenizer/processor, saved with save_pretrained.

    Its outputs are meaningless: it exists to run the real model code without downloading weights.
    Point --model at it: qwen-tasks label --task cry --model DIR
    """
    from qwen_tasks.dev.tiny_model import PRESETS, make_tiny_model

    if preset not in PRESETS:
        raise fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "7b":
        import torch

        if not torch.cuda.is_available():
            raise fail("preset 7b allocates ~16 GB of random weights; run it on a machine with a CUDA GPU")
    try:
        path = make_tiny_model(out_dir, preset, seed=seed, instruct=not base)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # writing the files: disk full, permission denied
        raise fail(f"{out_dir}: cannot write the checkpoint: {exc.strerror or exc}") from None
    console.print(f"wrote {preset} Qwen2-Audio checkpoint (seed {seed}) to {path}")

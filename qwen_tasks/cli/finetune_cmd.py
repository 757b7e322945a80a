"""`qwen-tasks finetune` and `qwen-tasks models [promote|retire]`: thin wrappers over finetune, registry."""

from __future__ import annotations

from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from qwen_tasks.cli.common import announce, app, console, open_database, print_json
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.progress import ProgressLog, log_to_stderr
from qwen_tasks.records import ModelVersionStatus

_D = FinetuneOptions()  # defaults shown in --help come from the options object itself


@app.command("finetune")
def finetune(
    task: str = typer.Option(..., "--task", help="cry or asr."),
    base: str = typer.Option(None, "--base", help="Base model: hub id or path (default: QWEN_TASKS_MODEL)."),
    revision: str = typer.Option("", "--revision", help="Pinned revision of the base model."),
    name: str = typer.Option(None, "--name", help="Version name (default: <task>-<UTC time>)."),
    epochs: int = typer.Option(_D.epochs, "--epochs", min=1, help="Passes over the training part."),
    lr: float = typer.Option(_D.lr, "--lr", min=0.0, help="AdamW learning rate."),
    rank: int = typer.Option(_D.rank, "--rank", min=1, help="LoRA rank."),
    alpha: int = typer.Option(_D.alpha, "--alpha", min=1, help="LoRA alpha."),
    targets: str = typer.Option(
        ",".join(_D.targets), "--targets", help="LoRA on: lm (attention + MLP), projector, audio (encoder)."
    ),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", min=1, help="Clips per optimiser step."),
    max_clips: int = typer.Option(None, "--max-clips", min=2, help="Train on at most N clips (stratified)."),
    datasets: list[str] = typer.Option(  # noqa: B008 - typer's idiom
        None, "--dataset", help="Train on this train dataset only (repeat; default: all train datasets)."
    ),
    test_datasets: list[str] = typer.Option(  # noqa: B008 - typer's idiom
        None,
        "--test-dataset",
        help="Also evaluate on this test dataset (repeat; default: every labelled test dataset of the task).",
    ),
    min_clips: int = typer.Option(_D.min_clips, "--min-clips", min=1, help="Refuse with fewer per class."),
    heldout: float = typer.Option(_D.heldout_fraction, "--heldout-fraction", help="Share held out (stored)."),
    min_improvement: float = typer.Option(
        _D.min_improvement, "--min-improvement", min=0.0, help="Gate margin over the base on held-out audio."
    ),
    promote: bool = typer.Option(False, "--promote", help="Promote the version if it passes the gate."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default: QWEN_TASKS_DEVICE)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: per device)."),
    question: str = typer.Option(_D.question, "--question", help="cry: the question the version answers."),
    language: str = typer.Option(_D.language, "--language", help="asr: language of the transcripts."),
    eval_method: str = typer.Option(
        _D.eval_method, "--eval-method", help="cry held-out runs: score or both."
    ),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed for the adapter init and the batch order."),
    calibration: str = typer.Option(
        _D.calibration,
        "--calibration",
        help="cry: map p_yes before the threshold: none, platt (default; safe with few labels) or isotonic.",
    ),
    target_precision: float = typer.Option(
        None,
        "--target-precision",
        help="cry: the lowest threshold reaching this held-out precision (default: the max-F1 threshold).",
    ),
    out: str = typer.Option("", "--out", help="Adapter directory (default: $QWEN_TASKS_HOME/models/NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Fine-tune a LoRA adapter on reviewed labels, evaluate base vs candidate on held-out audio, register it.

    Training rows: human labels first, then manifest gold / references, from the train datasets in scope
    and never from a clip of any test dataset; a stored, content-based train / held-out split. Ends with
    two real labelling runs over the held-out audio (base, candidate) and the gate: the version is
    `candidate` if it beats the base by --min-improvement, else `rejected`; the same two runs on each test
    dataset are reported side by side (the gate stays on the held-out split).
    Example: qwen-tasks finetune --task cry --base ./tiny --epochs 2 --device cpu --test-dataset eval
    """
    from qwen_tasks.config import get_settings
    from qwen_tasks.finetune.run import run_finetune

    settings = get_settings()
    options = FinetuneOptions(
        task=task, base=base or "", base_revision=revision, name=name or "", epochs=epochs, lr=lr, rank=rank,
        alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()), batch_size=batch_size,
        max_clips=max_clips, datasets=tuple(datasets or ()), test_datasets=tuple(test_datasets or ()),
        min_clips=min_clips, heldout_fraction=heldout, min_improvement=min_improvement,
        promote=promote, device=device or settings.device, dtype=dtype, question=question, language=language,
        eval_method=eval_method, seed=seed, out_dir=out, calibration=calibration,
        target_precision=target_precision,
    )  # fmt: skip
    engine = open_database()
    bar = _TrainBar()

    def prepared(p: Any) -> None:
        console.print(
            f"training on {sum(p.train.values())} clips {p.train} of {', '.join(p.datasets)}, held out "
            f"{sum(p.heldout.values())} {p.heldout}; left out {p.skipped}; sources {p.sources}; test "
            f"datasets: {', '.join(p.test_datasets) or 'none'}",
            highlight=False,
            soft_wrap=True,
        )

    try:
        summary = run_finetune(engine, options, progress=bar, on_prepared=prepared, on_step=bar.done)
    finally:
        bar.done()
    if as_json:
        print_json(summary.to_dict())
    for line in summary.gate.get("reasons", []):
        console.print(f"  {line}", highlight=False)
    _wide(console).print(evaluation_table(summary.task, _evaluations(summary)))
    own = summary.calibration
    for asked, rule in [("its question", own), *(own.get("questions") or {}).items()]:
        _print_rule(asked, rule)
    state = ModelVersionStatus.PROMOTED if summary.promoted else summary.status
    console.print(
        f"{summary.name}: {state} ({summary.steps} steps in {summary.train_seconds:.1f} s; held-out runs "
        f"{summary.base_run_id} (base) and {summary.candidate_run_id} (candidate)); "
        f"adapter {summary.adapter_path}",
        highlight=False,
        soft_wrap=True,
    )


def _print_rule(asked: str, rule: dict[str, Any]) -> None:
    """One line per decision rule `finetune` stored (the version's own question, then each manifest
    question its held-out clips ask)."""
    if not rule.get("id"):
        if rule.get("error"):
            console.print(f"no decision rule for {asked}: {rule['error']}", highlight=False)
        return
    h = rule["heldout"]
    console.print(
        f"decision rule {rule['id']} for {asked}: {rule['method']}, threshold {rule['threshold']:.4f} "
        f"({rule['objective']}); held-out accuracy {h['accuracy']:.3f} (at 0.5: {h['accuracy_at_0.5']:.3f})"
        + (f"; {rule['note']}" if rule.get("note") else ""),
        highlight=False,
    )


def _evaluations(summary: Any) -> list[dict[str, Any]]:
    """Held-out and test-set figures of a FinetuneSummary in the shape of registry.evaluations()."""

    def row(name: str, base: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
        keys = {"roc_auc": "score.roc_auc", "f1": "score.f1", "accuracy": "score.accuracy"}
        keys["error_rate"] = "error_rate"
        return {
            "evaluated_on": name,
            "n_gold": base.get("n_gold"),
            "n_reference": base.get("n_reference"),
            "base": {k: base.get(v) for k, v in keys.items()},
            "candidate": {k: candidate.get(v) for k, v in keys.items()},
        }

    out = [row("heldout (gate)", summary.base, summary.candidate)]
    out += [row(name, t["base"], t["candidate"]) for name, t in summary.test.items()]
    return out


def evaluation_table(task: str, evaluations: list[dict[str, Any]], version: str | None = None) -> Table:
    """Base vs candidate side by side per evaluation set (held-out split, then each test dataset): AUC,
    F1 and accuracy of `score` for cry, the error rate (WER/CER) for asr."""
    cry = (("roc_auc", "AUC"), ("f1", "F1"), ("accuracy", "accuracy"))
    figures = cry if task == "cry" else (("error_rate", "WER/CER"),)
    table = Table(title="base vs fine-tuned, side by side" + (f": {version}" if version else ""))
    table.add_column("evaluated on")
    table.add_column("clips", justify="right")
    for _, label in figures:
        table.add_column(f"{label} base", justify="right")
        table.add_column(f"{label} tuned", justify="right")
    for e in evaluations:
        n = e.get("n_gold") if task == "cry" else e.get("n_reference")
        cells = [e["evaluated_on"], "-" if n is None else str(int(n))]
        for key, _ in figures:
            cells += [_figure(e["base"].get(key)), _figure(e["candidate"].get(key))]
        table.add_row(*cells)
    return table


def _wide(out: Any) -> Any:
    """`out`, or a 200-column console on the same stream when it is not a terminal (tables stay whole)."""
    return out if out.is_terminal else type(out)(file=out.file, width=200)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class _TrainBar:
    """Progress on stderr: optimiser steps with the loss, clips/s and time left. A rich bar on a terminal;
    otherwise (a log file, a pipe) a `ProgressLog` line every QWEN_TASKS_PROGRESS_SECONDS (30 s), and the
    held-out evaluation runs' lines too."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.log: ProgressLog | None = None
        self.task: Any = None
        if not console.is_terminal:
            log_to_stderr()

    def __call__(self, p: Any) -> None:
        figures = {"epoch": p.epoch, "loss": f"{p.loss:.4f}", "clips/s": f"{p.clips_per_s:.1f}"}
        if not console.is_terminal:
            if self.log is None:
                self.log = ProgressLog("training", p.total_steps, unit="steps").__enter__()
            self.log.update(p.step, **figures)
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "steps  epoch {task.fields[epoch]}  loss {task.fields[loss]}  {task.fields[rate]}"
                ),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=p.total_steps, epoch=1, loss="", rate="")
        self.progress.update(
            self.task,
            completed=p.step,
            epoch=p.epoch,
            loss=figures["loss"],
            rate=f"{p.clips_per_s:.1f} clips/s",
        )

    def done(self, message: str | None = None) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.log is not None:
            self.log.__exit__()
            self.log = None
        if message:
            console.print(message, highlight=False)


models_app = typer.Typer(
    help="Fine-tuned model versions: list them, promote one for the nightly run, retire one.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(
    ctx: typer.Context,
    task: str = typer.Option(None, "--task", help="Only cry or asr versions."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list on stdout."),
) -> None:
    """List model versions (newest first) with base vs candidate on their held-out audio."""
    if ctx.invoked_subcommand is not None:
        return
    from qwen_tasks.labelling.registry import list_versions

    rows = list_versions(open_database(), task)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no model versions yet (make one with: qwen-tasks finetune --task cry)")
        return
    table = Table(title="model versions (newest first)")
    for col in ("name", "task", "status", "train", "held out", "base", "candidate", "gate", "created"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], r["task"], r["status"] + (" (forced)" if r["forced"] else ""), _counts(r["train"]),
            _counts(r["heldout"]), _headline(r["task"], r["base"]), _headline(r["task"], r["candidate"]),
            {True: "passed", False: "failed"}.get(r["gate_passed"], "-"), str(r["created_at"])[:16],
        )  # fmt: skip
    out = _wide(type(console)())
    out.print(table)
    for r in rows:
        if len(r["evaluations"]) > 1:  # evaluated on test datasets too: held-out and each, side by side
            out.print(evaluation_table(r["task"], r["evaluations"], r["name"]))


def _counts(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items()) or "-"


def _headline(task: str, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    keys = ("score.roc_auc", "score.f1") if task == "cry" else ("error_rate",)
    names = {"score.roc_auc": "AUC", "score.f1": "F1", "error_rate": "WER/CER"}
    return ", ".join(f"{names[k]} {metrics[k]:.3f}" for k in keys if metrics.get(k) is not None) or "-"


@models_app.command("promote")
def promote(
    name: str = typer.Argument(..., help="Version name (see: qwen-tasks models)."),
    force: bool = typer.Option(False, "--force", help="Promote even if it did not beat the base (recorded)."),
) -> None:
    """Make NAME the version the nightly run uses for its task (the previous one is retired).

    With QWEN_TASKS_AIRFLOW_URL set, an asset event (qwen_tasks://model/TASK) then starts a relabelling
    run of the task's datasets with NAME in Airflow at once."""
    from qwen_tasks.labelling.registry import promote as do_promote
    from qwen_tasks.orchestration.assets import model_uri

    version = do_promote(open_database(), name, force=force)
    note = " (forced: it did not pass the gate)" if version.forced else ""
    console.print(f"{name} is now the promoted {version.task} model{note}", highlight=False)
    extra = {"task": version.task, "version": version.name, "revision": version.revision,
             "source": "qwen-tasks models promote"}  # fmt: skip
    announce(
        model_uri(version.task), extra,
        starts=f"qwen_audio_labelling labels the {version.task} datasets with {name} now",
        otherwise=f"to label with it now: qwen-tasks label --task {version.task} (or trigger "
        "qwen_audio_labelling); the nightly run uses it anyway",
    )  # fmt: skip


@models_app.command("retire")
def retire(name: str = typer.Argument(..., help="Version name.")) -> None:
    """Stop using NAME for the nightly run (it stays in the registry, its labels stay)."""
    from qwen_tasks.labelling.registry import retire as do_retire

    version = do_retire(open_database(), name)
    console.print(f"{name} ({version.task}) is retired", highlight=False)

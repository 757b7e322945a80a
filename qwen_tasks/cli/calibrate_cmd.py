"""`qwen-tasks calibrate`: fit and store the decision rule of a model on reviewed / gold labels.

Thin: picks the run (the model's latest production cry run, or a version's held-out evaluation run) and
calls `quality.calibration.calibrate_run`. Its flags are generated from `quality.calibration.
CalibrateOptions` (the calibration method and target precision: the Specs `finetune` uses too).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import typer
from sqlalchemy.engine import Engine

from qwen_tasks.cli.common import app, console, fail, open_database, print_json
from qwen_tasks.cli.flags import generated_flags, given
from qwen_tasks.quality.calibration import CalibrateOptions


@app.command("calibrate")
@generated_flags(CalibrateOptions)  # --task, --model, --version, --run, --calibration, ...: one per option
def calibrate(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    **flags: Any,
) -> None:
    """Choose a decision threshold (and a probability calibration) on held-out reviewed / gold labels.

    Fits on the `score` answers of the model's latest production cry run (for --version: the version's
    held-out evaluation run) whose clips have a human or manifest gold label and were never a fine-tune
    training clip; stores the rule (table decision_calibration). Later `label` runs of that model decide
    with it (an explicit --threshold still wins) and record it on every label.
    Example: qwen-tasks calibrate --task cry --model ./tiny --target-precision 0.95 --json
    """
    from qwen_tasks.ingest import datasets as ds
    from qwen_tasks.quality.calibration import calibrate_run

    options = CalibrateOptions.from_flags(given(flags))
    engine = open_database()
    dataset = options.dataset
    dataset_id = ds.resolve(engine, (dataset,), what="--dataset")[0].id if dataset else None
    run_id, version_id = _run_to_fit(engine, options, dataset_id)
    rule, fitted = calibrate_run(
        engine, run_id, method=options.calibration, target_precision=options.target_precision,
        model_version_id=version_id, dataset_id=dataset_id,
    )  # fmt: skip
    if as_json:
        print_json({
            "calibration_id": rule.id, "run_id": run_id, "model_version": options.version, "dataset": dataset,
            "method": rule.method, "params": rule.params, "threshold": rule.threshold,
            "objective": fitted.choice.objective, "note": fitted.choice.note, "n_labels": fitted.n_labels,
            "n_yes": fitted.n_yes, "heldout": fitted.heldout,
        })  # fmt: skip
    h = fitted.heldout
    console.print(
        f"calibration {rule.id} from run {run_id} ({fitted.n_labels} labels, {fitted.n_yes} yes): "
        f"{rule.method}, threshold {rule.threshold:.4f} ({fitted.choice.objective}); on these labels "
        f"accuracy {h['accuracy']:.3f} (at 0.5: {h['accuracy_at_0.5']:.3f}), F1 {h['f1']:.3f}, "
        f"ECE {h['ece_raw']:.3f} -> {h['ece_calibrated']:.3f}",
        highlight=False,
    )
    if fitted.choice.note:
        console.print(fitted.choice.note, highlight=False)


def _run_to_fit(engine: Engine, options: CalibrateOptions, dataset_id: int | None) -> tuple[int, int | None]:
    """(run id, model version id): the version's held-out evaluation run (--version), else the base
    model's latest production cry run (or --run) covering --dataset."""
    from qwen_tasks.labelling import registry
    from qwen_tasks.store.schema import label_run, run_dataset

    if options.version:
        found = registry.require_version(engine, options.version)
        if found.task != "cry" or found.candidate_run_id is None:
            raise fail(
                f"model version {options.version!r} has no held-out cry evaluation run to calibrate on"
            )
        return found.candidate_run_id, found.id
    choice = registry.model_for(engine, "cry", options.model, options.revision, promoted=False)
    if choice.version:  # --model NAME of a version
        raise fail(f"{choice.version} is a fine-tuned version: use --version {choice.version}")
    r, run = label_run.c, options.run
    query = (
        sa.select(r.id)
        .where(r.task == "cry", r.purpose == "label", r.model == choice.model)
        .where(sa.true() if run is None else r.id == run)
        .where(r.params["adapter"].astext.is_(None))
        .order_by(r.id.desc())
        .limit(1)
    )
    if dataset_id is not None:
        query = query.where(
            r.id.in_(sa.select(run_dataset.c.run_id).where(run_dataset.c.dataset_id == dataset_id))
        )
    with engine.connect() as conn:
        run_id = conn.execute(query).scalar_one_or_none()
    if run_id is None:
        where = (f" with id {run}" if run is not None else "") + (
            f" covering dataset {options.dataset}" if options.dataset else ""
        )
        raise fail(
            f"no cry labelling run of {choice.model}{where} to calibrate (run: qwen-tasks label --task cry)"
        )
    return run_id, None

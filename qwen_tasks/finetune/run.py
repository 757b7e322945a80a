"""The whole fine-tune loop behind `qwen-tasks finetune` (`run_finetune`) and its summary.

1. `data.prepare`, once: the labelled clips in scope and the stored train / held-out split;
2. `train.train_version` on exactly that training part: LoRA, the adapter saved and registered;
3. `evaluate.evaluate_version` on that held-out part (and each test dataset): base vs candidate, the gate;
4. promotion, when asked and the gate passed.
The `qwen_audio_finetune` DAG runs the same steps as tasks (`orchestration.finetune_steps`); only ids,
names and counts go between them there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.finetune.data import Prepared, prepare
from qwen_tasks.finetune.evaluate import evaluate_version
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.finetune.train import clear_interrupted, train_version
from qwen_tasks.labelling import registry


@dataclass
class FinetuneSummary:
    """`qwen-tasks finetune --json`."""

    name: str
    task: str
    status: str
    adapter_path: str
    revision: str
    train: dict[str, int]
    heldout: dict[str, int]
    skipped: dict[str, int]
    train_seconds: float
    steps: int
    final_loss: float | None
    base_run_id: int | None = None
    candidate_run_id: int | None = None
    base: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    # test dataset name -> {"dataset_id", "base_run_id", "candidate_run_id", "base": {..}, "candidate": {..}}
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    # cry: the stored decision rule {"id", "method", "threshold", "objective", "note", "heldout": {...}}
    calibration: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)  # the train datasets in scope
    promoted: bool = False
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_finetune(
    engine: Engine,
    options: FinetuneOptions,
    *,
    progress: Callable[[Any], None] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FinetuneSummary:
    """The whole loop: prepare (once: training and evaluation take its result), train, register, evaluate
    base and candidate, gate, promote if asked."""
    started = time.perf_counter()
    options = options.resolved()
    clear_interrupted(engine, options.name)  # a taken name is refused before anything is stored
    data = prepare(engine, options)
    if on_prepared is not None:
        on_prepared(data.prepared)
    trained = train_version(engine, options, data, progress=progress)
    if on_step is not None:
        tests = "".join(f", then on test dataset {n}" for n in trained.prepared.test_datasets)
        on_step(
            f"adapter saved to {trained.adapter_path}; evaluating base and candidate on held-out audio{tests}"
        )
    evaluation = evaluate_version(engine, trained.name, options, data)
    promoted = False
    if options.promote and evaluation["gate"]["passed"]:
        registry.promote(engine, trained.name)
        promoted = True
    version = registry.require_version(engine, trained.name)
    return FinetuneSummary(
        name=trained.name,
        task=options.task,
        status=str(version.status),
        adapter_path=trained.adapter_path,
        revision=trained.revision,
        train=trained.prepared.train,
        heldout=trained.prepared.heldout,
        skipped=trained.prepared.skipped,
        train_seconds=trained.result.seconds,
        steps=trained.result.steps,
        final_loss=trained.result.epoch_losses[-1] if trained.result.epoch_losses else None,
        base_run_id=evaluation["base_run_id"],
        candidate_run_id=evaluation["candidate_run_id"],
        base=evaluation["base"],
        candidate=evaluation["candidate"],
        gate=evaluation["gate"],
        test=evaluation["test"],
        calibration=evaluation["calibration"],
        datasets=trained.prepared.datasets,
        promoted=promoted,
        wall_seconds=time.perf_counter() - started,
    )

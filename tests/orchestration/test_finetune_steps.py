"""The fine-tune DAG's steps as plain functions (qwen_tasks.orchestration.finetune_steps), without Airflow:
the real database, real ingest, the real trainer on the tiny model and real evaluation runs. Each step takes
params and names and returns a small JSON-able dict (what goes into XCom), never rows or audio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.dev.samples import write_cry_training_set
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import registry
from qwen_tasks.orchestration import finetune_steps
from qwen_tasks.orchestration.assets import TASKS, Event
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


def _small(out: dict) -> dict:
    """A step's result is what XCom carries: JSON, ids and counts only."""
    assert len(json.dumps(out)) < 2000, out
    return out


def test_the_finetune_steps_pass_names_ids_and_counts(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_TASKS_HOME", str(tmp_path / "home"))
    url = engine.url.render_as_string(hide_password=False)
    manifest = write_cry_training_set(tmp_path / "cry", n=48)
    ingest(engine, [manifest.parent], manifests=[(manifest, "aqa")], dataset="cry-train")
    params = {"task": "cry", "base": str(tiny_model_dir), "device": "cpu", "epochs": 3,
              "auto_promote": True, "min_improvement": 0.0, "datasets": ["cry-train"], "test_datasets": [],
              "name": None}  # fmt: skip
    run = "manual__2026-01-01T00:00:00"

    # a manual run always goes on; a reviews event with too few new reviewed labels does not
    manual = finetune_steps.enough_new_reviews_step([], TASKS, database_url=url)
    assert manual == {"task": None, "why": "manual"}
    reviews = [Event("qwen_tasks://reviews/cry", {"reviewed": 3})]
    assert finetune_steps.enough_new_reviews_step(reviews, TASKS, database_url=url) == {}

    with pytest.raises(ConfigError, match="--dataset 'nope': no such dataset"):
        finetune_steps.prepare_step({**params, "datasets": ["nope"]}, run_name=run, database_url=url)
    prepared = _small(finetune_steps.prepare_step(params, run_name=run, database_url=url))
    assert prepared["train"] == {"no": 16, "yes": 16} and prepared["heldout"] == {"no": 8, "yes": 8}
    assert prepared["datasets"] == ["cry-train"]

    trained = _small(finetune_steps.train_step(params, run_name=run, prepared=prepared, database_url=url))
    name = "cry-manual__2026-01-01T00-00-00"  # <task>-<DAG run id>
    assert trained["name"] == name and trained["train"] == prepared["train"] and trained["steps"] == 12
    assert Path(trained["adapter_path"]) == tmp_path / "home" / "models" / name

    evaluation = _small(finetune_steps.evaluate_step(params, name, run_name=run, database_url=url))
    keys = {"name", "base_run_id", "candidate_run_id", "test_runs", "gate_passed", "status"}
    assert set(evaluation) == keys
    assert evaluation["gate_passed"] and evaluation["status"] == "candidate"
    with engine.connect() as conn:
        heldout = set(
            conn.execute(
                sa.select(schema.finetune_split.c.audio_id).where(schema.finetune_split.c.part == "heldout")
            ).scalars()
        )
        answered = set(
            conn.execute(
                sa.select(schema.cry_answer.c.audio_id).where(
                    schema.cry_answer.c.run_id == evaluation["candidate_run_id"]
                )
            ).scalars()
        )
    assert answered == heldout and len(heldout) == 16

    kept = _small(finetune_steps.promote_step({**params, "auto_promote": False}, evaluation, run_name=run,
                                              database_url=url))  # fmt: skip
    assert kept == {"name": name, "status": "candidate", "not_promoted": "auto_promote is off"}
    promoted = _small(finetune_steps.promote_step(params, evaluation, run_name=run, database_url=url))
    version = registry.require_version(engine, name)
    assert version.status is ModelVersionStatus.PROMOTED
    assert promoted == {
        "name": name,
        "status": "promoted",
        "event": {
            "uri": "qwen_tasks://model/cry",
            "extra": {"task": "cry", "version": name, "revision": version.revision},
        },
    }

    report = _small(finetune_steps.report_step(name, run_name=run, database_url=url))
    path = Path(report["report"])
    assert path.is_file() and path.parent == tmp_path / "home" / "reports" / "manual__2026-01-01T00_00_00"

"""The fine-tune DAG end to end with `dag.test()`, then the nightly DAG labelling with what it promoted.

Real Airflow, the real local PostgreSQL (reached only through AIRFLOW_CONN_QWEN_TASKS_DB), the tiny model
and the learnable synthetic cry set (plus a test dataset, never trained on and evaluated beside the
held-out split): prepare → train → evaluate → promote → report; then the labelling
DAG picks the promoted version for cry (its runs carry the version's revision), and `promoted: false`
labels with the base model again. A refusal that retrying cannot change (no labelled clips) fails the
DAG run at once, without Airflow's retry a minute later.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DATA_TABLES
from sqlalchemy.engine import make_url

from qwen_tasks.dev.airflow_local import run_dag_test
from qwen_tasks.dev.samples import write_cry_training_set
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import registry
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import dataset_audio, finetune_split, label_run, model_version_test

pytestmark = pytest.mark.slow


def test_finetune_dag_promotes_and_the_nightly_dag_uses_the_version(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    engine = db.get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    work = tmp_path_factory.mktemp("finetune-dag")
    model = tiny_model_dir
    manifest = write_cry_training_set(work / "cry", n=48)
    ingest(engine, [manifest.parent], manifests=[(manifest, "aqa")], dataset="cry-train")
    test_set = write_cry_training_set(work / "cry-eval", n=12, seed=1)
    ingest(engine, [test_set.parent], manifests=[(test_set, "aqa")], dataset="cry-eval", split="test")
    env: dict[str, str | None] = {
        "AIRFLOW_CONN_QWEN_TASKS_DB": make_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False),
        "QWEN_TASKS_DATABASE_URL": None,
        "QWEN_TASKS_HOME": str(work / "home"),
    }
    home = work / "airflow-home"
    conf = {"task": "cry", "base": str(model), "device": "cpu", "epochs": 3, "auto_promote": True,
            "min_improvement": 0.0, "name": "dag-cry", "datasets": ["cry-train"],
            "test_datasets": ["cry-eval"]}  # fmt: skip
    result = run_dag_test(conf, home=home, extra_env=env, dag_id="qwen_audio_finetune", timeout=1200)
    states = {t["task_id"]: t["state"] for t in result.tasks}
    # started by hand: enough_new_reviews lets it go on whatever the count
    tasks = ("enough_new_reviews", "prepare", "train", "evaluate", "promote", "report")
    assert states == dict.fromkeys(tasks, "success")
    assert result.xcom["train"] == "dag-cry"  # only the name, ids and counts cross XCom
    evaluation = result.xcom["evaluate"]
    assert set(evaluation) == {
        "name",
        "base_run_id",
        "candidate_run_id",
        "test_runs",
        "gate_passed",
        "status",
    }
    assert result.xcom["prepare"]["datasets"] == ["cry-train"]
    assert result.xcom["prepare"]["test_datasets"] == ["cry-eval"]
    version = registry.require_version(engine, "dag-cry")
    assert version.status is ModelVersionStatus.PROMOTED and evaluation["gate_passed"]
    with engine.connect() as conn:
        tests = conn.execute(sa.select(model_version_test)).all()
        test_clips = set(conn.execute(sa.select(dataset_audio.c.audio_id).where(
            dataset_audio.c.dataset_id == tests[0].dataset_id)).scalars())  # fmt: skip
        split = set(conn.execute(sa.select(finetune_split.c.audio_id)).scalars())
    runs = evaluation["test_runs"]["cry-eval"]
    assert [(t.base_run_id, t.candidate_run_id) for t in tests] == [
        (runs["base_run_id"], runs["candidate_run_id"])
    ]
    assert len(test_clips) == 12 and test_clips.isdisjoint(split)  # never on either side of the split
    assert version.metrics["test"]["cry-eval"]["candidate"]["n_gold"] == 12
    assert Path(result.xcom["report"]["report"]).is_file()

    nightly = {"tasks": ["cry"], "model": str(model), "device": "cpu", "report_dir": str(work / "reports")}
    run_dag_test(nightly, home=home, extra_env=env)
    run_dag_test({**nightly, "promoted": False}, home=home, extra_env=env)
    with engine.connect() as conn:
        production = conn.execute(
            sa.select(label_run.c.revision, label_run.c.n_labelled, label_run.c.params)
            .where(label_run.c.purpose == "label")
            .order_by(label_run.c.id)
        ).all()
    # the nightly run labels every dataset of the task, the test set too (labelling is not training)
    assert [(r.revision, r.n_labelled) for r in production] == [(version.revision, 60), ("", 60)]
    assert production[0].params["model_version"] == "dag-cry"


def test_a_refusal_fails_at_once_without_a_retry(database_url: str, tmp_path: Path) -> None:
    engine = db.get_engine(database_url)
    with engine.begin() as conn:  # no labelled clips at all
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    env: dict[str, str | None] = {
        "AIRFLOW_CONN_QWEN_TASKS_DB": make_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False),
        "QWEN_TASKS_DATABASE_URL": None,
        "QWEN_TASKS_HOME": str(tmp_path / "home"),
    }
    conf = {"task": "cry", "base": "no/model-needed", "device": "cpu"}
    result = run_dag_test(
        conf, home=tmp_path / "airflow-home", extra_env=env, dag_id="qwen_audio_finetune", timeout=600,
        check=False,
    )  # fmt: skip
    assert result.state == "failed"
    (prepare,) = [t for t in result.tasks if t["task_id"] == "prepare"]
    assert (prepare["state"], prepare["try_number"]) == ("failed", 1)  # the DAG has retries=1: not used
    assert result.states("train") == ["upstream_failed"]
    log = Path(result.log_file).read_text(errors="replace")
    assert "cannot fine-tune cry: no train dataset is labelled for cry" in log  # an empty database

"""Event-driven runs on a real, distributed Airflow (qwen_tasks/dev/airflow_stack.py: api-server, scheduler,
dag-processor, triggerer, a Celery worker), with NO trigger call anywhere:

1. 5 new audio objects land in a watched bucket prefix (a real S3 server, tests/s3_server.py; nothing of
   them on local disk): the ingest DAG (every minute here) lists them and emits an asset event for that
   dataset; the labelling DAG starts on it by itself and labels the 5 clips (both
   tasks), and its plan log says why it ran;
2. `qwen-tasks models promote` (with QWEN_TASKS_AIRFLOW_URL) posts a model asset event through the REST
   API: a labelling run of the cry datasets with the new version's revision starts by itself;
3. an event for imported reviews starts the fine-tune DAG, which finds too few new reviewed labels and
   skips the rest of the run (the run succeeds; no task fails).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import DATA_TABLES
from labelling_helpers import write_clips
from s3_server import S3Server, new_bucket_name
from services import require_redis

from qwen_tasks.dev.airflow_stack import DAG_ID, AirflowStack, wait_until
from qwen_tasks.dev.samples import write_cry_training_set
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.finetune.train import train_version
from qwen_tasks.ingest import sources
from qwen_tasks.ingest.register import ingest
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import cry_answer, label_run, transcription

pytestmark = pytest.mark.slow
INGEST_DAG, FINETUNE_DAG = "qwen_audio_ingest", "qwen_audio_finetune"


@pytest.fixture(scope="module")
def stack(
    admin_url: str,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    s3_server: S3Server,  # its AWS_* variables reach the stack's processes through the environment
) -> Any:  # Iterator[tuple[AirflowStack, str, Any]]
    require_redis()
    engine = db.get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    work = tmp_path_factory.mktemp("assets-stack")
    # a cry version to promote later, trained before Airflow competes for the CPUs
    manifest = write_cry_training_set(work / "cry-train", n=12)
    ingest(engine, [manifest.parent], manifests=[(manifest, "aqa")], dataset="cry-train")
    options = FinetuneOptions(task="cry", base=str(tiny_model_dir), device="cpu", min_clips=4, epochs=1,
                              out_dir=str(work / "adapter"), name="cry-v2", eval_method="score")  # fmt: skip
    version = train_version(engine, options)
    bucket = new_bucket_name()
    sources.filesystem(f"s3://{bucket}").mkdir(bucket)
    watched = f"s3://{bucket}/watched"
    st = AirflowStack(
        home=work / "home",
        admin_url=admin_url,
        labels_url=database_url,
        workers=1,
        env_extra={
            "QWEN_TASKS_MODEL": str(tiny_model_dir),
            "QWEN_TASKS_DEVICE": "cpu",
            "QWEN_TASKS_AUDIO_DIRS": watched,
            "QWEN_TASKS_INGEST_SCHEDULE": "* * * * *",  # the shortest cron: every minute
            "QWEN_TASKS_LEASE_SECONDS": "30",
        },
    )
    st.start()
    try:
        st.wait_for_dag(INGEST_DAG)
        st.wait_for_dag(FINETUNE_DAG)
        yield st, watched, version
    finally:
        st.stop()


def _asset_runs(st: AirflowStack, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
    return [r for r in st.dag_runs(dag_id) if r["run_type"] == "asset_triggered"]


def _plan_log(st: AirflowStack, run_id: str) -> str:
    return "\n".join(st.task_logs(run_id, "plan").values())


def test_new_audio_in_a_watched_bucket_prefix_is_labelled_with_no_trigger_call(
    stack: tuple[AirflowStack, str, Any], database_url: str, tmp_path: Path
) -> None:
    st, watched, _ = stack
    for clip in write_clips(tmp_path / "new", [1.0] * 5, seed=3):
        sources.filesystem(watched).put_file(str(clip), f"{watched}/{clip.name}")
        clip.unlink()  # the clips exist only in the bucket
    run = wait_until("an asset-triggered labelling run", lambda: _asset_runs(st), timeout=300, interval=2)[0]
    assert st.wait_for_run(run["run_id"], timeout=600) == "success", st.task_instances(run["run_id"])
    engine = db.get_engine(database_url)
    with engine.connect() as conn:
        runs = conn.execute(
            sa.select(label_run).where(label_run.c.params["airflow_dag_run"].astext == run["run_id"])
        ).all()
        labelled = {
            "asr": conn.execute(sa.select(sa.func.count()).select_from(transcription)).scalar_one(),
            "cry": conn.execute(sa.select(sa.func.count(sa.distinct(cry_answer.c.audio_id)))).scalar_one(),
        }
    assert {r.task for r in runs} == {"asr", "cry"}
    assert all(r.n_labelled == 5 and r.params["datasets"] == ["watched"] for r in runs), runs
    assert labelled == {"asr": 5, "cry": 5}  # only the new dataset: cry-train was not labelled
    (why,) = [line for line in _plan_log(st, run["run_id"]).splitlines() if "why this run" in line]
    assert "why this run: asset events: dataset watched: 5 new clip(s) (from qwen_audio_ingest/" in why
    assert why.count("dataset watched") == 1, why  # one event, listed once
    listed = "\n".join(st.task_logs(run["run_id"], "ingest").values())
    assert "started by asset events: the sources are listed by qwen_audio_ingest" in listed
    ingest_runs = st.dag_runs(INGEST_DAG)
    assert ingest_runs and all(r["run_type"] == "scheduled" for r in ingest_runs)


def test_a_promotion_from_the_cli_starts_a_relabelling_run_by_itself(
    stack: tuple[AirflowStack, str, Any], database_url: str
) -> None:
    st, _, version = stack
    before = {r["run_id"] for r in _asset_runs(st)}
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": database_url, "QWEN_TASKS_AIRFLOW_URL": st.base_url,
           "QWEN_TASKS_AIRFLOW_USERNAME": "admin", "QWEN_TASKS_AIRFLOW_PASSWORD": st.password}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "models", "promote", version.name, "--force"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "posted asset event" in out.stderr and "qwen_tasks://model/cry" in out.stderr, out.stderr
    assert st.password not in out.stderr + out.stdout

    def relabel_run() -> list[dict[str, Any]]:
        return [r for r in _asset_runs(st) if r["run_id"] not in before]

    (run,) = wait_until("the relabelling run", relabel_run, timeout=300, interval=2)
    assert st.wait_for_run(run["run_id"], timeout=600) == "success", st.task_instances(run["run_id"])
    with db.get_engine(database_url).connect() as conn:
        relabels = conn.execute(
            sa.select(label_run).where(label_run.c.params["airflow_dag_run"].astext == run["run_id"])
        ).all()
    # cry only (one run per question: the watched folder's default one, the training manifest's own)
    assert {(r.task, r.revision, r.status) for r in relabels} == {("cry", version.revision, "done")}
    assert sum(r.n_labelled for r in relabels) == 5 + 12  # every cry dataset, again, with the new version
    assert f"cry model {version.name} promoted (from qwen-tasks models promote)" in _plan_log(
        st, run["run_id"]
    )


def test_imported_reviews_start_the_fine_tune_which_skips_with_too_few(
    stack: tuple[AirflowStack, str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwen_tasks.orchestration.airflow_api import post_asset_event

    st, _, version = stack
    monkeypatch.setenv("QWEN_TASKS_AIRFLOW_URL", st.base_url)
    monkeypatch.setenv("QWEN_TASKS_AIRFLOW_USERNAME", "admin")
    monkeypatch.setenv("QWEN_TASKS_AIRFLOW_PASSWORD", st.password)
    posted = post_asset_event("qwen_tasks://reviews/cry", {"task": "cry", "reviewed": 3, "source": "test"})
    assert posted.event_id > 0
    run = wait_until("the fine-tune run", lambda: _asset_runs(st, FINETUNE_DAG), timeout=300, interval=2)[0]
    finished = wait_until(
        "the fine-tune run to finish",
        lambda: next(
            (r["state"] for r in st.dag_runs(FINETUNE_DAG) if r["state"] in ("success", "failed")), None
        ),
        timeout=300,
        interval=2,
    )
    assert finished == "success"
    with st.meta().connect() as conn:
        states = dict(
            conn.execute(
                sa.text("SELECT task_id, state FROM task_instance WHERE dag_id = :d AND run_id = :r"),
                {"d": FINETUNE_DAG, "r": run["run_id"]},
            ).all()
        )
    assert states.pop("enough_new_reviews") == "success"
    assert set(states.values()) == {"skipped"}, states  # skipped, not failed
    log = "\n".join(st.task_logs(run["run_id"], "enough_new_reviews").values())
    # 0 new: the labels counted are those newer than the version the test before promoted
    assert f"cry: 0 reviewed label(s) newer than {version.name} (" in log, log[-3000:]
    assert "minimum 200 (QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED): not enough to fine-tune yet" in log

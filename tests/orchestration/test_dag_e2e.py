"""The DAG end to end with `dag.test()`: real Airflow, the real local PostgreSQL, the tiny model, generated
audio with broken files. Three DAG runs in a row, as a user would see them:

1. first night: everything is ingested (bad files quarantined), both tasks labelled, metrics and a
   report written;
2. second night, nothing new: 0 jobs planned, label_batch skipped (no model loaded), no new run;
3. a manual run whose trigger conf overrides Params (only cry, relabel, limit 2, score only);
4. `workers=external` with two worker slots' worth of jobs: the DAG only plans and waits (deferred, a
   trigger polling the runs) while a `qwen-tasks work --follow` process labels them; SIGTERM then stops
   that worker (exit 143).

The DAG reaches the labels database only through the Airflow connection AIRFLOW_CONN_QWEN_TASKS_DB
(QWEN_TASKS_DATABASE_URL is removed from its environment), in a project-local AIRFLOW_HOME under tmp.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import DATA_TABLES
from labelling_helpers import CLI
from sqlalchemy.engine import make_url

from qwen_tasks.dev.airflow_local import DagRunFailed, DagTestResult, run_dag_test
from qwen_tasks.dev.samples import SampleSet, write_sample_set
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import audio_file, cry_answer, label_job, label_run, run_metric, transcription

pytestmark = pytest.mark.slow

OVERRIDE = {"tasks": ["cry"], "relabel": True, "limit": 2, "method": "score"}
EXTERNAL = {"tasks": ["cry"], "relabel": True, "limit": 3, "method": "score", "batch_size": 1,
            "workers": "external"}  # fmt: skip


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """What the database holds, in the terms the assertions need."""
    with engine.connect() as conn:
        runs = [dict(r._mapping) for r in conn.execute(sa.select(label_run).order_by(label_run.c.id))]
        return {
            "runs": runs,
            "jobs": conn.execute(sa.select(sa.func.count()).select_from(label_job)).scalar_one(),
            "transcriptions": conn.execute(
                sa.select(transcription.c.run_id, sa.func.count()).group_by(transcription.c.run_id)
            ).all(),
            "cry": conn.execute(
                sa.select(cry_answer.c.run_id, cry_answer.c.method, sa.func.count()).group_by(
                    cry_answer.c.run_id, cry_answer.c.method
                )
            ).all(),
            "metric_runs": set(conn.execute(sa.select(run_metric.c.run_id).distinct()).scalars()),
            "quarantined": dict(
                conn.execute(
                    sa.select(audio_file.c.path, audio_file.c.reason).where(
                        audio_file.c.status == "quarantined"
                    )
                ).all()
            ),
            "ok_audio": conn.execute(
                sa.select(sa.func.count(sa.distinct(audio_file.c.audio_id))).where(
                    audio_file.c.status == "ok"
                )
            ).scalar_one(),
        }


@pytest.fixture(scope="module")
def nights(
    database_url: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Run the DAG three times (see module docstring); results and database snapshots after each."""
    engine = db.get_engine(database_url)
    with engine.begin() as conn:  # other modules share this database: start from empty tables
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    work = tmp_path_factory.mktemp("dag-e2e")
    samples: SampleSet = write_sample_set(work / "audio", n=4, long_seconds=32.0)
    conf = {
        "audio_dirs": [str(samples.root)],
        "asr_manifests": [str(samples.asr_manifest)],
        "aqa_manifests": [str(samples.aqa_manifest)],
        "tasks": ["asr", "cry"],
        "model": str(tiny_model_dir),
        "device": "cpu",
        "method": "both",
        "max_new_tokens": 8,
        "report_dir": str(work / "reports"),
    }
    env: dict[str, str | None] = {
        "AIRFLOW_CONN_QWEN_TASKS_DB": make_url(database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False),
        "QWEN_TASKS_DATABASE_URL": None,
        "QWEN_TASKS_RETRY_DELAY_SECONDS": "1",  # a failure shows up in seconds, not minutes
        "QWEN_TASKS_WAIT_POLL_SECONDS": "1",
    }
    home = work / "airflow-home"
    out: dict[str, Any] = {"samples": samples, "home": home, "work": work}
    for name, run_conf in (("first", conf), ("second", conf), ("override", {**conf, **OVERRIDE})):
        out[name] = run_dag_test(run_conf, home=home, extra_env=env, timeout=900)
        out[f"{name}_db"] = snapshot(engine)
    # an external worker fleet of one: it keeps the model loaded and serves every new run of it
    logs = work / "follow.err"
    follower = subprocess.Popen(
        [*CLI, "work", "--follow", "--model", str(tiny_model_dir), "--device", "cpu", "--poll-seconds", "1",
         "--worker-id", "fleet-1", "--json"],
        stdout=subprocess.PIPE, stderr=logs.open("wb"), text=True,
        env={**os.environ, "QWEN_TASKS_DATABASE_URL": database_url},
    )  # fmt: skip
    try:
        out["external"] = run_dag_test({**conf, **EXTERNAL}, home=home, extra_env=env, timeout=900)
        out["external_db"] = snapshot(engine)
    finally:
        follower.send_signal(signal.SIGTERM)
        stdout, _ = follower.communicate(timeout=120)
    out["follower"] = {
        "code": follower.returncode,
        "summary": json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {},
        "stderr": logs.read_text(errors="replace"),
    }
    out["bad_conf"] = _expect_failure(
        lambda: run_dag_test({**conf, "batch_size": 0}, home=home, extra_env=env)
    )
    return out


def _expect_failure(fn: Any) -> str:
    try:
        fn()
    except DagRunFailed as exc:
        return str(exc)
    return ""


def states(result: DagTestResult) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in result.tasks:
        out.setdefault(t["task_id"], []).append(t["state"])
    return out


def test_first_run_labels_both_tasks(nights: dict[str, Any]) -> None:
    first: DagTestResult = nights["first"]
    assert first.state == "success"
    got = states(first)
    assert got["label_batch"] and set(got["label_batch"]) == {"success"}
    # a Qwen2-Audio model: no slot of the Qwen-Audio environment is mapped (labelling/test_qwen_audio.py)
    assert got["qwen_audio_slots"] == ["success"] and got["label_batch_qwen_audio"] == ["skipped"]
    for task in ("ingest", "plan", "metrics", "report"):
        assert got[task] == ["success"], task
    names = [t["name"] for t in first.tasks if t["task_id"] == "label_batch"]
    # one slot (the gpu pool size) did every job of both runs, and its name in the UI says so
    assert len(names) == 1 and names[0].startswith("worker 1/1: asr run") and "cry run" in names[0]

    snap = nights["first_db"]
    runs = {r["task"]: r for r in snap["runs"]}
    assert set(runs) == {"asr", "cry"} and all(r["status"] == "done" for r in runs.values())
    n_audio = snap["ok_audio"]
    assert n_audio == len(nights["samples"].clips)  # the duplicate file shares its twin's audio row
    assert dict((run_id, n) for run_id, n in snap["transcriptions"]) == {runs["asr"]["id"]: n_audio}
    by_method = {method: n for run_id, method, n in snap["cry"] if run_id == runs["cry"]["id"]}
    assert by_method == {"score": n_audio, "generate": n_audio}
    assert runs["asr"]["params"]["airflow_dag_run"] == first.dag_run_id  # the run is traceable to Airflow


def test_first_run_quarantines_bad_files(nights: dict[str, Any]) -> None:
    quarantined = nights["first_db"]["quarantined"]
    for bad in nights["samples"].bad:
        path = str(bad)
        assert path in quarantined and quarantined[path], f"{bad.name} not quarantined with a reason"
    ingest = nights["first"].xcom["ingest"]
    assert ingest["quarantined"] == len(nights["samples"].bad)
    assert ingest["duplicate"] == 1


def test_first_run_stores_metrics_and_writes_report(nights: dict[str, Any]) -> None:
    run_ids = {r["id"] for r in nights["first_db"]["runs"]}
    assert nights["first_db"]["metric_runs"] == run_ids
    report = nights["first"].xcom["report"]
    assert set(report["run_ids"]) == run_ids
    path = Path(report["report"])
    assert path.is_file() and path.stat().st_size > 1000
    assert path.is_relative_to(nights["work"] / "reports")  # the report_dir param


def test_xcom_carries_only_ids_and_counts(nights: dict[str, Any]) -> None:
    first = nights["first"]
    job_ids = first.xcom["plan"]
    assert isinstance(job_ids, list) and all(isinstance(j, int) for j in job_ids)
    assert sorted(first.xcom["plan.run_ids"]) == sorted(r["id"] for r in nights["first_db"]["runs"])
    assert all(isinstance(v, int) for v in first.xcom["ingest"].values())


def test_second_run_finds_nothing_new_and_loads_no_model(nights: dict[str, Any]) -> None:
    second: DagTestResult = nights["second"]
    assert second.state == "success"
    assert second.xcom["plan"] == []
    assert states(second)["label_batch"] == ["skipped"]  # mapped over nothing: no task ran, no model
    assert nights["second_db"]["runs"] == nights["first_db"]["runs"]
    assert nights["second_db"]["jobs"] == nights["first_db"]["jobs"]
    assert second.xcom["ingest"]["new"] == 0
    # the nightly report still exists: it shows the latest runs
    assert second.xcom["report"]["new"] is False and Path(second.xcom["report"]["report"]).is_file()


def test_trigger_conf_overrides_params(nights: dict[str, Any]) -> None:
    override: DagTestResult = nights["override"]
    assert override.state == "success"
    before, after = nights["second_db"], nights["override_db"]
    new_runs = [r for r in after["runs"] if r["id"] not in {b["id"] for b in before["runs"]}]
    assert len(new_runs) == 1
    run = new_runs[0]
    assert (run["task"], run["n_planned"], run["status"]) == ("cry", 2, "done")
    assert run["params"]["request"]["methods"] == ["score"]
    assert run["params"]["relabel"] is True and run["params"]["limit"] == 2
    new_cry = {method: n for run_id, method, n in after["cry"] if run_id == run["id"]}
    assert new_cry == {"score": 2}
    assert after["transcriptions"] == before["transcriptions"]  # asr was not requested


def test_invalid_trigger_conf_is_refused_before_anything_runs(nights: dict[str, Any]) -> None:
    message = nights["bad_conf"]
    assert message, "a DAG run with batch_size=0 must not be created"
    assert "batch_size" in message


def test_external_workers_label_while_the_dag_waits_deferred(nights: dict[str, Any]) -> None:
    external: DagTestResult = nights["external"]
    assert external.state == "success"
    got = states(external)
    assert got["label_batch"] == ["skipped"]  # no Airflow slot held a GPU
    assert got["wait_for_workers"] == ["success"]
    before, after = nights["override_db"], nights["external_db"]
    (run,) = [r for r in after["runs"] if r["id"] not in {b["id"] for b in before["runs"]}]
    assert (run["status"], run["n_planned"], run["n_labelled"]) == ("done", 3, 3)
    follower = nights["follower"]
    assert follower["code"] == 143, follower["stderr"][-2000:]
    assert follower["summary"]["jobs_done"] == 3 and run["id"] in follower["summary"]["run_ids"]
    assert "Traceback" not in follower["stderr"]


def test_the_airflow_home_pins_no_absolute_path(nights: dict[str, Any]) -> None:
    cfg = (nights["home"] / "airflow.cfg").read_text()
    assert str(nights["home"]) not in cfg and str(Path(__file__).resolve().parents[2]) not in cfg
    assert "${AIRFLOW_HOME}/airflow.db" in cfg

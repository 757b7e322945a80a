"""The DAG's steps as plain functions (qwen_tasks.orchestration.steps), without Airflow, on the real database,
real ingest and the tiny model: options validation, job budgets, resuming unfinished jobs, worker slots,
taking over a dead slot's job, attempts."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, write_clips
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling import environments, jobs
from qwen_tasks.labelling.backends import get_backend
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.orchestration import steps
from qwen_tasks.orchestration.steps import JobFailed
from qwen_tasks.store import schema

# --- params --------------------------------------------------------------------------------------------


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_TASKS_MODEL", "/models/q2a")
    monkeypatch.setenv("QWEN_TASKS_BATCH_SIZE", "4")
    monkeypatch.setenv("QWEN_TASKS_AUDIO_DIRS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    p = LabelOptions.from_mapping({})
    assert (p.model, p.batch_size) == ("/models/q2a", 4)
    assert p.audio_dirs == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert p.tasks == ("asr", "cry")
    assert LabelOptions.from_mapping({"method": "both"}).methods == ("score", "generate")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"tasks": ["translate"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"max_batch_seconds": -1}, "max_batch_seconds"),
        ({"limit": 0}, "limit"),
        ({"method": "vote"}, "method"),
        ({"yes_threshold": 1.2}, "yes_threshold"),
        ({"language": "English"}, "language"),
        ({"relabel": "true"}, "relabel"),
        ({"model": "  "}, "model"),
        ({"audio_dirs": [""]}, "audio_dirs"),
        ({"dtype": "int4"}, "dtype"),
    ],
)
def test_bad_params_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"param '{field}'"):
        LabelOptions.from_mapping({"model": "m", **raw})


def test_null_means_the_default_like_a_missing_cli_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_TASKS_MODEL_REVISION", "v2")
    monkeypatch.setenv("QWEN_TASKS_GPU_POOL_SLOTS", "3")
    cleared = {"revision": None, "report_dir": "", "limit": None, "slots": None, "asr_manifests": None}
    assert LabelOptions.from_mapping({"model": "m", **cleared}) == LabelOptions.from_mapping({"model": "m"})
    got = LabelOptions.from_mapping({"model": "m", **cleared})
    assert (got.revision, got.slots, got.limit, got.asr_manifests) == ("v2", 3, None, ())
    with pytest.raises(ConfigError, match="param 'model'"):
        LabelOptions.from_mapping({"model": None})  # not optional: null is an error, not a default


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("QWEN_TASKS_BATCH_SIZE", "abc", "QWEN_TASKS_BATCH_SIZE must be an integer, got 'abc'"),
        ("QWEN_TASKS_MAX_BATCH_SECONDS", "-1", "QWEN_TASKS_MAX_BATCH_SECONDS must be a number > 0"),
        ("QWEN_TASKS_LEASE_SECONDS", "soon", "QWEN_TASKS_LEASE_SECONDS must be a number"),
        ("QWEN_TASKS_DEVICE", "gpu", "QWEN_TASKS_DEVICE must be one of auto, cpu, cuda, got 'gpu'"),
    ],
)
def test_a_bad_environment_value_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        LabelOptions.from_mapping({"model": "m"})


def test_unknown_keys_are_ignored_and_values_normalised() -> None:
    p = LabelOptions.from_mapping(
        {"model": "m", "audio_dirs": "/one/folder", "tasks": ["cry", "cry"], "limit": None, "x": 1}
    )
    assert p.audio_dirs == ("/one/folder",) and p.tasks == ("cry",) and p.limit is None
    assert LabelOptions.from_mapping(p.as_dict()) == p  # what the DAG uses as Param defaults


# --- steps on the database -----------------------------------------------------------------------------


def _params(model: Path, **over: object) -> dict:
    return {"model": str(model), "device": "cpu", "max_new_tokens": 4, "batch_size": 1, **over}


def test_ingest_step_returns_counts_only(engine: Engine, tmp_path: Path, database_url: str) -> None:
    write_clips(tmp_path / "audio", [1.0, 1.5])
    (tmp_path / "audio" / "bad.wav").write_bytes(b"RIFF....WAVEnope")
    out = steps.ingest_step(
        {"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url
    )
    assert out["new"] == 2 and out["quarantined"] == 1
    assert all(isinstance(v, int | float) for v in out.values())  # XCom: no path lists
    with pytest.raises(ConfigError, match="no-such-folder"):
        steps.ingest_step(
            {"model": "m", "audio_dirs": [str(tmp_path / "no-such-folder")]}, database_url=database_url
        )


def test_plan_respects_the_job_budget_then_resumes_unfinished_jobs(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0, 1.2, 1.4, 1.6])
    steps.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir)
    first = steps.plan_step(params, max_jobs=3, database_url=database_url)
    assert len(first["job_ids"]) == 3  # max_map_length: 3 jobs in total, not per task
    assert first["per_task"]["asr"]["jobs"] == 3 and first["per_task"]["asr"]["left_over"] == 1
    assert first["per_task"]["cry"]["jobs"] == 0

    # next night (the first night's workers never ran): its 3 pending jobs come first, then new work
    second = steps.plan_step(params, database_url=database_url)
    assert second["job_ids"][:3] == first["job_ids"]
    assert second["per_task"]["asr"]["resumed_jobs"] == 3
    assert second["per_task"]["asr"]["items"] == 1  # the clip left over last time
    assert second["per_task"]["cry"]["items"] == 4
    assert len(second["job_ids"]) == 3 + 1 + 4
    assert len(set(second["job_ids"])) == len(second["job_ids"])


def test_slots_label_every_job_once_and_load_the_model_only_when_there_is_work(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0, 1.2, 1.4, 2.0])
    steps.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir, tasks=["cry"], slots=2)
    planned = steps.plan_step(params, database_url=database_url)
    assert planned["jobs"] == 4 and planned["slots"] == 2  # min(jobs, slots)
    assert (planned["qwen_audio_slots"], planned["qwen_audio_run_ids"]) == (0, [])  # no Qwen-Audio slot
    names: list[str] = []
    first = steps.work_step(
        params, planned["run_ids"], slot=0, slots=2, database_url=database_url, on_name=names.append
    )
    # one slot alone drains the run (the other slot, started later, finds nothing to do)
    assert first["jobs_done"] == 4 and first["labelled"] == 4
    assert names == [f"worker 1/2: cry run {planned['run_ids'][0]} batches 0,1,2,3 (4 clips)"]
    assert count(engine, schema.cry_answer) == 4
    loads = get_backend.cache_info()
    second = steps.work_step(params, planned["run_ids"], slot=1, slots=2, database_url=database_url)
    assert second["jobs_done"] == 0 and second["model_load_seconds"] == 0
    assert get_backend.cache_info() == loads  # nothing to claim: the model was not even looked up
    assert jobs.get_run(engine, planned["run_ids"][0]).status == "done"

    metrics = steps.metrics_step(planned["run_ids"], database_url=database_url)
    assert metrics["runs"] == 1 and metrics["metrics"][str(planned["run_ids"][0])]
    report = steps.report_step(
        [], {**params, "report_dir": str(tmp_path / "r")}, name="a:b/c", database_url=database_url
    )
    assert report["run_ids"] == planned["run_ids"] and report["new"] is False  # latest runs
    assert Path(report["report"]).is_file() and Path(report["report"]).parent.name == "a_b_c"
    external = steps.plan_step({**params, "workers": "external", "relabel": True}, database_url=database_url)
    assert external["jobs"] == 4 and external["slots"] == 0  # no Airflow slot: the fleet labels these
    assert steps.runs_progress(external["run_ids"], database_url=database_url)["finished"] is False


@pytest.mark.skipif(environments.runs_here(), reason="this interpreter is the Qwen-Audio environment")
def test_runs_of_an_original_qwen_audio_model_get_slots_of_their_own(
    engine: Engine, tmp_path: Path, database_url: str
) -> None:
    """Planned here (no model is loaded to plan), labelled by the Qwen-Audio environment's slots: the
    main environment's slots leave those runs alone, without claiming a job."""
    model = tmp_path / "qwen-audio-local"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen"}', encoding="utf-8")
    write_clips(tmp_path / "audio", [1.0, 1.2, 1.4])
    steps.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = {"model": str(model), "tasks": ["asr", "cry"], "batch_size": 1, "slots": 4, "device": "cpu"}
    planned = steps.plan_step(params, database_url=database_url)
    assert planned["jobs"] == 6 and (planned["slots"], planned["qwen_audio_slots"]) == (0, 4)
    assert planned["qwen_audio_run_ids"] == planned["run_ids"] and len(planned["run_ids"]) == 2
    out = steps.work_step(params, planned["run_ids"], database_url=database_url)  # a label_batch slot
    assert out["jobs_done"] == 0
    with engine.connect() as conn:
        states = conn.execute(sa.select(schema.label_job.c.status, schema.label_job.c.attempts)).all()
    assert sorted(set(states)) == [("pending", 0)]
    external = steps.plan_step({**params, "workers": "external"}, database_url=database_url)
    assert (external["slots"], external["qwen_audio_slots"]) == (0, 0)  # the fleet labels these


def test_a_retried_slot_takes_free_jobs_before_waiting_out_a_dead_lease(
    engine: Engine,
    tmp_path: Path,
    database_url: str,
    tiny_model_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QWEN_TASKS_PROGRESS_SECONDS", "0.5")  # the task log's progress lines (30 s)
    write_clips(tmp_path / "audio", [1.0, 1.2, 1.4])
    steps.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir, tasks=["cry"])
    planned = steps.plan_step(params, database_url=database_url)
    dead = jobs.claim_job(engine, planned["run_ids"], "dead-slot", lease_seconds=4.0)  # killed holding it
    assert dead is not None
    caplog.set_level("INFO", logger="qwen_tasks")
    out = steps.work_step(params, planned["run_ids"], database_url=database_url, worker="retry")
    assert out["jobs_done"] == 3
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                schema.label_job.c.id, schema.label_job.c.finished_at, schema.label_job.c.attempts
            ).order_by(schema.label_job.c.finished_at)
        ).all()
    assert [r.id for r in rows][-1] == dead.id  # the free jobs first, the dead worker's job last
    assert rows[-1].attempts == 2
    assert (rows[1].finished_at - rows[0].finished_at).total_seconds() < 3  # no lease wait in between
    logged = caplog.text
    assert "model" in logged and "loaded in" in logged  # what the task log shows
    assert "held by dead-slot" in logged and "waiting to take over" in logged
    assert f"job {dead.id} (cry run" in logged and "jobs finished" in logged
    # progress lines while the slot works (and waits out the lease) and when it ends: done/total, rate, RTF
    run = planned["run_ids"][0]
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen_tasks.progress"]
    assert any(f"worker 1/1 runs {run}: " in x and "ETA" in x for x in lines[:-1]), lines
    assert lines[-1].startswith(f"worker 1/1 runs {run}: 3/3 clips (100%), ") and "RTF" in lines[-1]
    # a plan with nothing to do says why in the log
    caplog.clear()
    assert steps.plan_step(params, database_url=database_url)["jobs"] == 0
    assert "cry: nothing to label: every clip of audio already has a label for cry" in caplog.text


def test_job_errors_are_retried_then_fail_the_slot_for_good(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0, 2.0])
    steps.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir, tasks=["cry"])
    planned = steps.plan_step(params, database_url=database_url)
    gone = sorted((tmp_path / "audio").glob("*.wav"))[0]
    gone.unlink()  # deleted after ingest: its job errors at job level on every attempt

    with pytest.raises(JobFailed, match="1 job\\(s\\) failed after all attempts"):
        steps.work_step(params, planned["run_ids"], database_url=database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                schema.label_job.c.status, schema.label_job.c.attempts, schema.label_job.c.last_error
            ).order_by(schema.label_job.c.id)
        ).all()
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 1 and failed[0].attempts == jobs.DEFAULT_MAX_ATTEMPTS
    assert "none of the 1 file(s)" in failed[0].last_error
    assert [r.status for r in rows].count("done") == 1  # the other job was labelled all the same
    # a retry of the slot (or a cleared task) has nothing left to do
    assert steps.work_step(params, planned["run_ids"], database_url=database_url)["jobs_done"] == 0


def test_the_airflow_docs_list_every_dag_param() -> None:
    """docs/airflow.md's Params table is written by hand: every LabelOptions field (the DAG's Params come
    from it) must have a row, so a new option cannot ship undocumented."""
    import dataclasses
    import re

    table = (Path(__file__).resolve().parents[2] / "docs" / "airflow.md").read_text(encoding="utf-8")
    first_cells = re.findall(r"^\| ([^|]+)\|", table, flags=re.M)
    names = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    missing = [f.name for f in dataclasses.fields(LabelOptions) if f.name not in names]
    assert not missing, f"docs/airflow.md has no Params row for {missing}"

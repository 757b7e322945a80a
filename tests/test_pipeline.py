"""The DAG's steps as plain functions (qwen_tasks.pipeline), without Airflow, on the real database,
real ingest and the tiny model: params validation, job budgets, resuming unfinished jobs, retries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import build_tiny_model, count, write_clips
from sqlalchemy.engine import Engine

from qwen_tasks import pipeline, schema
from qwen_tasks.backends import get_backend
from qwen_tasks.errors import ConfigError, QwenTasksError
from qwen_tasks.pipeline import JobFailed, PipelineParams


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory)


# --- params --------------------------------------------------------------------------------------------


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_TASKS_MODEL", "/models/q2a")
    monkeypatch.setenv("QWEN_TASKS_BATCH_SIZE", "4")
    monkeypatch.setenv("QWEN_TASKS_AUDIO_DIRS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    p = PipelineParams.from_mapping({})
    assert (p.model, p.batch_size) == ("/models/q2a", 4)
    assert p.audio_dirs == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert p.tasks == ("asr", "cry")
    assert PipelineParams.from_mapping({"method": "both"}).methods == ("score", "generate")


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
        PipelineParams.from_mapping({"model": "m", **raw})


def test_unknown_keys_are_ignored_and_values_normalised() -> None:
    p = PipelineParams.from_mapping(
        {"model": "m", "audio_dirs": "/one/folder", "tasks": ["cry", "cry"], "limit": None, "x": 1}
    )
    assert p.audio_dirs == ("/one/folder",) and p.tasks == ("cry",) and p.limit is None
    assert PipelineParams.from_mapping(p.as_dict()) == p  # what the DAG uses as Param defaults


# --- steps on the database -----------------------------------------------------------------------------


def _params(model: Path, **over: object) -> dict:
    return {"model": str(model), "device": "cpu", "max_new_tokens": 4, "batch_size": 1, **over}


def test_ingest_step_returns_counts_only(engine: Engine, tmp_path: Path, database_url: str) -> None:
    write_clips(tmp_path / "audio", [1.0, 1.5])
    (tmp_path / "audio" / "bad.wav").write_bytes(b"RIFF....WAVEnope")
    out = pipeline.ingest_step(
        {"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url
    )
    assert out["new"] == 2 and out["quarantined"] == 1
    assert all(isinstance(v, int | float) for v in out.values())  # XCom: no path lists
    with pytest.raises(ConfigError, match="no-such-folder"):
        pipeline.ingest_step(
            {"model": "m", "audio_dirs": [str(tmp_path / "no-such-folder")]}, database_url=database_url
        )


def test_plan_respects_the_job_budget_then_resumes_unfinished_jobs(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0, 1.2, 1.4, 1.6])
    pipeline.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir)
    first = pipeline.plan_step(params, max_jobs=3, database_url=database_url)
    assert len(first["job_ids"]) == 3  # max_map_length: 3 jobs in total, not per task
    assert first["per_task"]["asr"]["jobs"] == 3 and first["per_task"]["asr"]["left_over"] == 1
    assert first["per_task"]["cry"]["jobs"] == 0

    # next night (the first night's workers never ran): its 3 pending jobs come first, then new work
    second = pipeline.plan_step(params, database_url=database_url)
    assert second["job_ids"][:3] == first["job_ids"]
    assert second["per_task"]["asr"]["resumed_jobs"] == 3
    assert second["per_task"]["asr"]["items"] == 1  # the clip left over last time
    assert second["per_task"]["cry"]["items"] == 4
    assert len(second["job_ids"]) == 3 + 1 + 4
    assert len(set(second["job_ids"])) == len(second["job_ids"])


def test_label_step_labels_once_and_skips_done_jobs_without_the_model(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0, 2.0])
    pipeline.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir, tasks=["cry"], batch_size=8)
    planned = pipeline.plan_step(params, database_url=database_url)
    (job_id,) = planned["job_ids"]
    out = pipeline.label_step(job_id, params, database_url=database_url)
    assert out["status"] == "done" and out["labelled"] == 2 and out["run_status"] == "done"
    assert count(engine, schema.cry_answer) == 2

    loads = get_backend.cache_info()
    again = pipeline.label_step(job_id, params, database_url=database_url)  # an Airflow retry / clear
    assert again["status"] == "skipped"
    assert get_backend.cache_info() == loads  # the model was not even looked up
    assert count(engine, schema.cry_answer) == 2

    metrics = pipeline.metrics_step(planned["run_ids"], database_url=database_url)
    assert metrics["runs"] == 1 and metrics["metrics"][str(planned["run_ids"][0])]
    report = pipeline.report_step(
        [], {**params, "report_dir": str(tmp_path / "r")}, name="a:b/c", database_url=database_url
    )
    assert report["run_ids"] == planned["run_ids"] and report["new"] is False  # latest runs
    assert Path(report["report"]).is_file() and Path(report["report"]).parent.name == "a_b_c"


def test_job_errors_are_retried_then_fail_for_good(
    engine: Engine, tmp_path: Path, database_url: str, tiny_model_dir: Path
) -> None:
    write_clips(tmp_path / "audio", [1.0])
    pipeline.ingest_step({"model": "m", "audio_dirs": [str(tmp_path / "audio")]}, database_url=database_url)
    params = _params(tiny_model_dir, tasks=["cry"])
    (job_id,) = pipeline.plan_step(params, database_url=database_url)["job_ids"]
    shutil.rmtree(tmp_path / "audio")  # "storage not mounted": a job-level error, worth retrying

    for _ in range(pipeline.LABEL_RETRIES):  # Airflow's tries before the last one
        with pytest.raises(QwenTasksError, match="will be retried") as info:
            pipeline.label_step(job_id, params, database_url=database_url)
        assert not isinstance(info.value, JobFailed)
    with pytest.raises(JobFailed, match="failed after"):
        pipeline.label_step(job_id, params, database_url=database_url)
    with pytest.raises(JobFailed, match="for good"):  # a cleared task fails again, with the reason
        pipeline.label_step(job_id, params, database_url=database_url)
    with engine.connect() as conn:
        status, error = conn.execute(
            sa.select(schema.label_job.c.status, schema.label_job.c.last_error).where(
                schema.label_job.c.id == job_id
            )
        ).one()
    assert status == "failed" and "none of the 1 file(s)" in error

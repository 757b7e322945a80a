"""Event-driven runs, step by step against the real PostgreSQL (the Airflow side is in test_assets_stack.py):

- the ingest DAG's listing (`watch_step`) emits one event per dataset that received new audio, with ids
  and counts only, and none on a listing that finds nothing new;
- the events that start a labelling run decide what it labels (`scope_of`), and two events for the same
  data plan no duplicate work (the planner skips what is labelled or being labelled);
- the automatic fine-tune's gate counts reviewed labels newer than the promoted version;
- `models promote` / `review-import` without QWEN_TASKS_AIRFLOW_URL say that no automatic run was requested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from labelling_helpers import write_clips
from review_seed import add_audio, add_human
from sqlalchemy.engine import Engine

from qwen_tasks.orchestration.assets import (
    Event,
    dataset_uri,
    events_from_airflow,
    model_uri,
    parse_uri,
    reviews_uri,
    safe_location,
    scope_of,
)
from qwen_tasks.orchestration.steps import plan_step, watch_step, work_step
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.review.new_reviews import decide, reviewed_since
from qwen_tasks.store.schema import dataset, human_label, label_job_item, label_run, model_version


def test_a_listing_emits_one_event_per_dataset_with_new_audio_and_none_when_nothing_is_new(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    calls, street = tmp_path / "calls", tmp_path / "street"
    write_clips(calls, [1.0] * 3)
    write_clips(street, [1.0] * 2, seed=1)
    params = {"audio_dirs": [str(calls), str(street)]}

    first = watch_step(params, database_url=database_url)
    with engine.connect() as conn:
        ids = dict(conn.execute(sa.select(dataset.c.name, dataset.c.id)).all())
    assert first["new"] == 5
    assert sorted(first["events"], key=lambda e: e["uri"]) == [
        {"uri": dataset_uri("calls"),
         "extra": {"dataset": "calls", "dataset_id": ids["calls"], "new_clips": 3, "source": str(calls)}},
        {"uri": dataset_uri("street"),
         "extra": {"dataset": "street", "dataset_id": ids["street"], "new_clips": 2, "source": str(street)}},
    ]  # fmt: skip

    again = watch_step(params, database_url=database_url)  # nothing new: no event, no labelling run
    assert again["unchanged"] == 5 and again["events"] == []

    write_clips(calls / "later", [1.5], seed=2)  # one new recording in one source
    third = watch_step(params, database_url=database_url)
    assert [(e["uri"], e["extra"]["new_clips"]) for e in third["events"]] == [(dataset_uri("calls"), 1)]


def test_the_events_decide_what_a_run_labels_and_say_why() -> None:
    new_audio = Event(
        dataset_uri("calls"), {"new_clips": 3, "source": "/data/calls"}, "qwen_audio_ingest/r1/ingest"
    )
    promoted = Event(model_uri("cry"), {"version": "cry-v2", "source": "qwen-tasks models promote"})

    manual = scope_of([], {"tasks": ["asr", "cry"]})
    assert manual.tasks is None and manual.datasets is None and "manual" in manual.reason

    audio = scope_of([new_audio, new_audio], {"tasks": ["asr", "cry"]})  # the same dataset twice: once
    assert audio.datasets == ("calls",) and audio.tasks is None
    assert audio.apply({"tasks": ["cry"], "datasets": None}) == {"tasks": ["cry"], "datasets": ["calls"]}
    assert "dataset calls: 3 new clip(s) (from qwen_audio_ingest/r1/ingest)" in audio.reason

    model = scope_of([promoted], {"tasks": ["asr", "cry"]})
    assert model.tasks == ("cry",) and model.datasets is None
    assert "cry model cry-v2 promoted (from qwen-tasks models promote)" in model.reason

    both = scope_of([new_audio, promoted], {"tasks": ["asr", "cry"]})  # everything, as a cron run
    assert both.tasks is None and both.datasets is None and "calls" in both.reason and "cry-v2" in both.reason

    # Airflow lists an event emitted through an alias under the alias and under its asset: kept once
    ev = SimpleNamespace(asset=SimpleNamespace(uri=dataset_uri("calls")), extra={"new_clips": 3},
                         source_dag_id="qwen_audio_ingest", source_run_id="r1", source_task_id="ingest",
                         timestamp="2026-01-01T00:00:00+00:00")  # fmt: skip
    triggering = {"alias": [ev], "asset": [ev]}
    assert events_from_airflow(triggering) == [
        Event(dataset_uri("calls"), {"new_clips": 3}, "qwen_audio_ingest/r1/ingest")
    ]
    assert events_from_airflow({}) == [] and events_from_airflow(None) == []

    assert parse_uri(reviews_uri("asr")) == ("reviews", "asr") and parse_uri("s3://bucket/x") is None
    assert safe_location("s3://key:secret@bucket/prefix") == "s3://bucket/prefix"


def test_two_events_for_the_same_data_plan_no_duplicate_work(
    engine: Engine, database_url: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    calls, other = tmp_path / "calls", tmp_path / "other"
    write_clips(calls, [1.0] * 3)
    write_clips(other, [1.0] * 2, seed=1)
    params = {"audio_dirs": [str(calls), str(other)], "tasks": ["cry"], "method": "score",
              "model": str(tiny_model_dir), "device": "cpu"}  # fmt: skip
    (event,) = [e for e in watch_step(params, database_url=database_url)["events"] if "calls" in e["uri"]]
    scope = scope_of([Event(event["uri"], event["extra"])], params)

    first = plan_step(scope.apply(params), database_url=database_url, context={"why": scope.reason})
    assert first["items"] == 3  # the changed dataset only, not `other`
    second = plan_step(scope.apply(params), database_url=database_url)  # the same event again, unlabelled
    assert second["run_ids"] == first["run_ids"]  # resumed, not planned again
    work_step(params, first["run_ids"], database_url=database_url)
    third = plan_step(scope.apply(params), database_url=database_url)  # and once labelled
    assert third["jobs"] == 0 and third["run_ids"] == []

    with engine.connect() as conn:
        per_audio = conn.execute(
            sa.select(label_job_item.c.audio_id, sa.func.count()).group_by(label_job_item.c.audio_id)
        ).all()
        (run,) = conn.execute(sa.select(label_run)).all()
    assert len(per_audio) == 3 and {n for _, n in per_audio} == {1}  # each clip planned once
    assert run.status == "done" and run.n_labelled == 3
    assert run.params["why"].startswith("asset events: dataset calls: 3 new clip(s)")  # why it ran, stored


def _add_version(
    engine: Engine,
    name: str,
    task: str,
    created_at: datetime,
    status: str = ModelVersionStatus.PROMOTED.value,
    metrics: dict | None = None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            model_version.insert().values(
                name=name, task=task, base_model="/models/base", adapter_path="/models/a", adapter_sha256="0",
                revision="lora.0", prompt_version="p", request={}, data_digest="d", counts={},
                hyperparams={}, loss_curve=[], train_seconds=1.0, status=status, created_at=created_at,
                metrics=metrics,
            )
        )  # fmt: skip


def test_a_fine_tune_starts_only_with_enough_reviewed_labels_newer_than_the_promoted_version(
    engine: Engine,
) -> None:
    audio = add_audio(engine, 8)
    for audio_id in audio[:5]:
        add_human(engine, audio_id, "cry", label="yes")
    add_human(engine, audio[5], "asr", text="hello")
    none_promoted = decide(engine, "cry", minimum=5)
    assert none_promoted.new_reviewed == 5 and none_promoted.start and none_promoted.since_version is None
    assert "5 reviewed label(s) in all, minimum 5" in none_promoted.reason()

    now = datetime.now(UTC)
    with engine.begin() as conn:  # three labels were reviewed before the version was trained
        conn.execute(
            human_label.update()
            .where(human_label.c.audio_id.in_(audio[:3]))
            .values(created_at=now - timedelta(hours=2))
        )
    _add_version(engine, "cry-v1", "cry", now - timedelta(hours=1))
    after = decide(engine, "cry", minimum=3)
    assert (after.new_reviewed, after.start, after.since_version) == (2, False, "cry-v1")
    assert "not enough to fine-tune yet" in after.reason()
    add_human(engine, audio[6], "cry", label="no")
    assert decide(engine, "cry", minimum=3).start  # the third new one
    assert decide(engine, "asr", minimum=3).new_reviewed == 1  # another task's labels do not count

    assert reviewed_since(engine, now) == {"cry": 1}  # what was written since `now`: one import's labels


def test_promote_and_review_import_say_no_automatic_run_was_requested_without_airflow(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    _add_version(engine, "cry-old", "cry", datetime.now(UTC))
    _add_version(engine, "cry-new", "cry", datetime.now(UTC), "candidate", {"gate": {"passed": True}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_TASKS_AIRFLOW")}
    env["QWEN_TASKS_DATABASE_URL"] = database_url
    out = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "models", "promote", "cry-new"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cry-new is now the promoted cry model" in out.stderr
    assert "no automatic run was requested (QWEN_TASKS_AIRFLOW_URL is not set)" in out.stderr
    assert "qwen-tasks label --task cry" in out.stderr

    env["QWEN_TASKS_AIRFLOW_URL"] = "http://127.0.0.1:1"  # nothing listens: a warning, the promotion stands
    env["QWEN_TASKS_AIRFLOW_PASSWORD"] = "s3cret-value"
    env["QWEN_TASKS_AIRFLOW_USERNAME"] = "admin"
    out = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "models", "promote", "cry-old", "--force"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warning: no asset event posted: POST http://127.0.0.1:1/auth/token: cannot reach" in out.stderr
    assert "s3cret-value" not in out.stderr + out.stdout


def test_a_bad_schedule_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_tasks.config import Settings
    from qwen_tasks.errors import ConfigError

    monkeypatch.setenv("QWEN_TASKS_INGEST_SCHEDULE", "every 5 minutes")
    with pytest.raises(
        ConfigError, match=r"^QWEN_TASKS_INGEST_SCHEDULE must be a cron expression .*'every 5"
    ):
        Settings.from_env()
    for off in ("off", "", "  ", "OFF"):
        monkeypatch.setenv("QWEN_TASKS_INGEST_SCHEDULE", off)
        assert Settings.from_env().ingest_schedule is None
    monkeypatch.delenv("QWEN_TASKS_INGEST_SCHEDULE")
    assert Settings.from_env().ingest_schedule == "*/15 * * * *"

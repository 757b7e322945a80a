"""The worker loop and `label` (`labelling.worker.loop`): retries, refusals, reruns and what a run
records, in-process with the real backend on the tiny model, against the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, ingest_clips, plan_on, work_on
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling import jobs, worker
from qwen_tasks.labelling.backends import get_backend
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.records import LabelRequest
from qwen_tasks.store import schema


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Backend:
    return get_backend(str(tiny_model_dir), device="cpu")


def test_job_whose_files_are_all_gone_fails_after_max_attempts(
    engine: Engine, backend: Backend, tmp_path: Path
) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0, 3.0])
    gone = list(ids)[1]
    gone.unlink()  # deleted after ingest: the job holding only this clip errors at job level every time
    request = LabelRequest(task="cry")
    result = plan_on(engine, backend, request, batch_size=1, max_attempts=2)
    assert result.run_id is not None
    summary = work_on(engine, result.run_id, backend)
    assert (summary.jobs_done, summary.jobs_retried, summary.jobs_failed, summary.labelled) == (2, 1, 1, 2)
    with engine.connect() as conn:
        failed = conn.execute(sa.select(schema.label_job).where(schema.label_job.c.status == "failed")).one()
        run = conn.execute(sa.select(schema.label_run)).one()
    assert (
        failed.attempts == 2
        and "AudioStorageUnavailable" in failed.last_error
        and str(gone) in failed.last_error
    )
    assert run.status == "done" and run.n_labelled == 2 and run.finished_at is not None
    assert count(engine, schema.cry_answer, schema.cry_answer.c.audio_id == ids[gone]) == 0


def test_a_worker_with_another_model_or_prompt_is_refused(
    engine: Engine, backend: Backend, tmp_path: Path
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    request = LabelRequest(task="cry", question="Is a dog barking? Answer yes or no.")
    result = plan_on(engine, backend, request)
    assert result.run_id is not None
    with engine.begin() as conn:
        conn.execute(schema.label_run.update().values(prompt_version="someone-elses-prompt"))
    with pytest.raises(ModelError, match="someone-elses-prompt"):
        work_on(engine, result.run_id, backend)
    state = jobs.job_state(engine, result.job_ids[0])
    assert state["status"] == "pending" and state["attempts"] == 0  # given back, no attempt used


def test_rerun_labels_nothing_and_relabel_keeps_old_labels(
    engine: Engine,
    backend: Backend,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 2.0])

    def label(**kw: object) -> worker.WorkSummary:
        opts = LabelOptions.from_mapping(
            {"tasks": ["cry"], "model": str(tiny_model_dir), "device": "cpu", **kw}
        )
        return worker.label(engine, opts, backend_factory=lambda run: backend)

    first = label()
    assert first.run_id is not None and first.labelled == 2 and first.status == "done"
    assert label().run_id is None  # nothing new: no run, no model work
    again = label(relabel=True)
    assert again.run_id not in (None, first.run_id) and again.labelled == 2
    with engine.connect() as conn:
        per_run = dict(
            conn.execute(
                sa.select(schema.cry_answer.c.run_id, sa.func.count()).group_by(schema.cry_answer.c.run_id)
            ).all()
        )
    assert per_run == {first.run_id: 2, again.run_id: 2}
    # batch invariance across runs: the same clips give the same p_yes in a new run
    with engine.connect() as conn:
        p = conn.execute(
            sa.select(schema.cry_answer.c.run_id, schema.cry_answer.c.audio_id, schema.cry_answer.c.p_yes)
        ).all()
    by_audio: dict[int, list[float]] = {}
    for r in p:
        by_audio.setdefault(r.audio_id, []).append(r.p_yes)
    assert all(abs(a - b) < 1e-4 for a, b in by_audio.values())


def test_truncated_transcripts_and_answers_are_flagged_counted_and_reported(
    engine: Engine, backend: Backend, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`label` with --max-new-tokens 2: every transcript and generated answer of the tiny model hits the cap;
    the flag is stored per row, counted in the run's metrics and shown in the report. The default budget
    is stored as null in the run's request (the task's default per window)."""
    from qwen_tasks.quality.metrics import compute_run_metrics
    from qwen_tasks.quality.report import write_report

    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0, 3.0])

    def label(task: str, **kw: object) -> worker.WorkSummary:
        opts = LabelOptions.from_mapping(
            {"tasks": [task], "model": str(tiny_model_dir), "device": "cpu", "relabel": True, **kw}
        )
        summary = worker.label(engine, opts, backend_factory=lambda run: backend)
        assert summary.status == "done" and summary.labelled == 3
        return summary

    def column(table: sa.Table, run_id: int, *where: object) -> dict[int, bool]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.audio_id, table.c.truncated).where(table.c.run_id == run_id, *where)
            ).all()
        return {r.audio_id: r.truncated for r in rows}

    capped = label("asr", max_new_tokens=2).run_id
    assert column(schema.transcription, capped) == dict.fromkeys(ids.values(), True)
    assert jobs.get_run(engine, capped).params["request"]["max_new_tokens"] == 2
    m = compute_run_metrics(engine, capped)
    assert m["truncated"] == 3
    details = _metric_details(engine, capped, "truncated")
    assert details == {"n": 3, "rate": 1.0}
    page = write_report(engine, [capped], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "3 truncated (100.0%)" in page

    default = label("asr").run_id
    run = jobs.get_run(engine, default)
    assert run.params["request"]["max_new_tokens"] is None and run.request.max_new_tokens is None
    assert compute_run_metrics(engine, default)["truncated"] == sum(
        column(schema.transcription, default).values()
    )

    both = label("cry", method="both", max_new_tokens=2).run_id
    cry = schema.cry_answer
    assert column(cry, both, cry.c.method == "generate") == dict.fromkeys(ids.values(), True)
    assert column(cry, both, cry.c.method == "score") == dict.fromkeys(ids.values(), False)
    m = compute_run_metrics(engine, both)
    assert m["generate.truncated"] == 3 and "truncated" not in m
    assert _metric_details(engine, both, "generate.truncated") == {"n": 3, "rate": 1.0}
    score_only = label("cry").run_id  # nothing generated: no truncation figure at all
    assert "generate.truncated" not in compute_run_metrics(engine, score_only)


def _metric_details(engine: Engine, run_id: int, name: str) -> dict[str, object]:
    from qwen_tasks.quality.metrics import load_run_metrics

    return load_run_metrics(engine, run_id)[name]["details"]


def test_label_resolves_its_model_once_and_the_worker_loads_what_was_planned(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real `qwen-tasks label` (in-process, the tiny model): the model is chosen once (one
    `registry.model_for`, one registry lookup of the name), config.json is read once for the backend kind,
    and the worker loads the backend kind the plan recorded."""
    import json

    from typer.testing import CliRunner

    from qwen_tasks import progress
    from qwen_tasks.cli import app
    from qwen_tasks.labelling import backends, planning, registry

    ingest_clips(engine, tmp_path / "a", [1.0, 1.5])
    calls: dict[str, list[object]] = {"model_for": [], "find_model_version": [], "get_backend": []}

    def spy(name: str, real):  # noqa: ANN001,ANN202 - calls through to the real function
        def counted(*args: object, **kwargs: object) -> object:
            calls[name].append(kwargs.get("backend", args[1:2]))
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(planning, "model_for", spy("model_for", registry.model_for))
    monkeypatch.setattr(
        registry, "find_model_version", spy("find_model_version", registry.find_model_version)
    )
    monkeypatch.setattr(backends, "get_backend", spy("get_backend", backends.get_backend))
    monkeypatch.setattr(progress.log, "handlers", [])  # the CLI's progress handler stays in this test
    monkeypatch.setenv("QWEN_TASKS_DATABASE_URL", database_url)
    backends._model_type.cache_clear()

    args = ["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert out["labelled"] == 2 and out["status"] == "done"
    assert len(calls["model_for"]) == 1 and len(calls["find_model_version"]) == 1
    assert backends._model_type.cache_info().misses == 1  # config.json read once for the backend kind
    assert calls["get_backend"] == ["qwen2-audio"]  # loaded once, as the plan's ModelChoice said
    assert count(engine, schema.cry_answer) == 2

"""The DAG under a real, distributed Airflow: CeleryExecutor with the local Redis as broker, a PostgreSQL
metadata database, api-server, scheduler, dag-processor and two `airflow celery worker` processes on the
`gpu` queue (qwen_tasks/dev/airflow_stack.py starts them all and stops every one of them).

1. The Airflow UI's trigger form, in a real browser (Playwright driving Debian's Chromium): log in, open
   the DAG, open Trigger, submit with the defaults plus one changed Param (`limit`), the run succeeds and
   the change took effect (checked in SQL); invalid values (batch size -5, 0, "abc", threshold 2, limit
   "abc", a language off its pattern) are never changed behind the user's back: each is refused with a
   message naming the field, and no run starts (`EXPECTED_WAYS` records how the form refuses each).
2. Two labelling slots, one per Celery worker; one worker machine is SIGKILLed (its whole process group)
   while it holds a job: the other slot takes the job over once its lease runs out, the killed task's
   Airflow retry finds nothing left, the DAG run succeeds, and every clip is labelled exactly once.
   The model is loaded once per slot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import DATA_TABLES
from labelling_helpers import blocked_pids, writes_blocked
from services import CHROMIUM, require_chromium, require_redis

from qwen_tasks.dev.airflow_stack import DAG_ID, AirflowStack, wait_until
from qwen_tasks.dev.samples import write_sample_set
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import cry_answer, label_job, label_run

pytestmark = pytest.mark.slow
LOADED = re.compile(r"model \S+ \(revision [^)]*\) loaded in [0-9.]+ s")


@pytest.fixture(scope="module")
def stack(
    admin_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Any:  # Iterator[tuple[AirflowStack, SampleSet]]
    require_redis()  # the Celery broker
    engine = db.get_engine(database_url)
    with engine.begin() as conn:  # other modules share the labels database: start from empty tables
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    work = tmp_path_factory.mktemp("airflow-stack")
    samples = write_sample_set(work / "audio", n=4, long_seconds=6.0)
    model = tiny_model_dir
    st = AirflowStack(
        home=work / "home",
        admin_url=admin_url,
        labels_url=database_url,
        env_extra={
            # the Param defaults a first trigger needs: the tiny model and the sample audio
            "QWEN_TASKS_MODEL": str(model),
            "QWEN_TASKS_DEVICE": "cpu",
            "QWEN_TASKS_AUDIO_DIRS": str(samples.root),
            "QWEN_TASKS_GPU_POOL_SLOTS": "2",
            "QWEN_TASKS_LEASE_SECONDS": "6",
        },
    )
    st.start()
    try:
        yield st, samples
    finally:
        st.stop()


# (field, what is typed): out of range, or not a number at all
INVALID = [("batch_size", "-5"), ("batch_size", "0"), ("batch_size", "abc"), ("yes_threshold", "2"),
           ("limit", "abc"), ("language", "English!")]  # fmt: skip
# how Airflow 3.3's form refuses each of them, as observed by this test: "abc" is no JSON number, so the
# field's text box shows "Value must be one of: integer, number" and Trigger stays disabled; a number out
# of range is sent as typed and the API's validation refuses it ("Invalid input for param batch_size:
# -5 is less than the minimum of 1"), shown in the dialog
EXPECTED_WAYS = {case: "form" for case in INVALID}


def _open_form(page: Any, st: AirflowStack) -> Any:
    page.goto(f"{st.base_url}/dags/{DAG_ID}")
    page.get_by_test_id("trigger-dag-button").click()
    return page.get_by_role("dialog")


def _refused(page: Any, st: AirflowStack, shots: Path, field: str, typed: str) -> str:
    """Type `typed` into `field` and try to trigger; return how it was refused: "form" (the field's
    error or the API's message naming the param, and no DAG run) or "run failed at once" (a DAG run
    whose first task failed without a retry, naming the field in its log). Anything else fails."""
    dialog = _open_form(page, st)
    box = dialog.locator(f"[name=element_{field}]")
    box.fill(typed)
    page.keyboard.press("Tab")
    assert box.input_value() == typed, f"the form changed {field} {typed!r} to {box.input_value()!r}"
    submit = dialog.get_by_role("button", name=re.compile("^Trigger$"))
    before = {r["run_id"] for r in st.dag_runs()}
    if submit.is_enabled():
        submit.click()
    name = f"{field}-{re.sub(r'[^a-z0-9]+', '_', typed.lower())}"
    named = re.compile(
        rf"(param {field}\b|Value must be one of|does not match)", re.I
    )  # the API names the param; the field's own error sits under its title

    def outcome() -> str | None:
        if [r for r in st.dag_runs() if r["run_id"] not in before]:
            return "run"
        if dialog.get_by_text(named).first.is_visible():
            return "form"
        return None

    got = wait_until(f"{field}={typed!r} to be refused", outcome, timeout=60)
    page.screenshot(path=str(shots / f"2-{name}.png"), full_page=True)
    if got == "form":
        page.wait_for_timeout(2000)  # and no run appears a moment later
        assert {r["run_id"] for r in st.dag_runs()} == before, f"{field}={typed!r} started a run"
        text = dialog.inner_text()
        if typed == "abc":  # no JSON number: the field's own error, under its title
            assert re.search(r"Value must be one of: (null, )?integer, number", text), text
        else:  # sent as typed; the API's validation names the param and the value
            assert f"Invalid input for param {field}: {typed if field != 'language' else ''}" in text, text
        return "form"
    (run,) = [r for r in st.dag_runs() if r["run_id"] not in before]
    assert run["conf"].get(field) == typed or str(run["conf"].get(field)) == typed, run["conf"]
    assert st.wait_for_run(run["run_id"], timeout=300) == "failed"
    ingest = [t for t in st.task_instances(run["run_id"]) if t["task_id"] == "ingest"]
    assert [(t["state"], t["try_number"]) for t in ingest] == [("failed", 1)], ingest
    logs = "\n".join(st.task_logs(run["run_id"], "ingest").values())
    assert f"param '{field}'" in logs, logs[-3000:]
    return "run failed at once"


def _labels(database_url: str) -> sa.Engine:
    return db.get_engine(database_url)


def _runs_of(database_url: str, dag_run_id: str) -> list[dict[str, Any]]:
    with _labels(database_url).connect() as conn:
        rows = conn.execute(
            sa.select(label_run).where(label_run.c.params["airflow_dag_run"].astext == dag_run_id)
        )
        return [dict(r._mapping) for r in rows]


@pytest.fixture(scope="module")
def sync_api() -> Any:
    """playwright.sync_api, once Chromium is known to be there (before the stack starts: a skip is quick)."""
    return require_chromium()


def test_the_trigger_form_works_with_its_defaults_in_a_real_browser(
    sync_api: Any, stack: tuple[AirflowStack, Any], database_url: str
) -> None:
    st, _ = stack
    shots = st.home / "screenshots"
    shots.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{st.base_url}/")
            page.wait_for_url(re.compile(r".*/auth/login.*"), timeout=60_000)
            page.locator("input[name=username], input#username, input[type=text]").first.fill("admin")
            page.locator("input[type=password]").fill(st.password)
            page.keyboard.press("Enter")
            page.wait_for_url(re.compile(r"^(?!.*auth/login).*$"), timeout=60_000)

            # 1. defaults plus one changed Param
            page.goto(f"{st.base_url}/dags/{DAG_ID}")
            page.get_by_test_id("trigger-dag-button").click()
            dialog = page.get_by_role("dialog")
            limit = dialog.locator("[name=element_limit]")  # a text box: number Params are two-typed
            limit.fill("2")
            page.screenshot(path=str(shots / "1-form.png"), full_page=True)
            submit = dialog.get_by_role("button", name=re.compile("^Trigger$"))
            assert submit.is_enabled(), "Trigger is disabled with the default values"
            before = {r["run_id"] for r in st.dag_runs()}
            submit.click()
            new = wait_until(
                "the DAG run the form created",
                lambda: [r for r in st.dag_runs() if r["run_id"] not in before],
                timeout=60,
            )
            assert len(new) == 1
            run_id = new[0]["run_id"]
            assert st.wait_for_run(run_id, timeout=600) == "success", st.task_instances(run_id)
            runs = _runs_of(database_url, run_id)
            assert {r["task"] for r in runs} == {"asr", "cry"}  # the default tasks
            for r in runs:  # the changed Param took effect, the defaults did too
                assert r["params"]["limit"] == 2 and r["n_planned"] == 2 and r["n_labelled"] == 2
                assert r["revision"] == "" and r["status"] == "done"

            # 2. invalid values are refused, never changed: the form shows the field's error and no run
            #    starts, or (where the form cannot tell) the run's first task fails at once naming the
            #    field. Never a run with a changed value.
            ways = {}
            for field, typed in INVALID:
                ways[(field, typed)] = _refused(page, st, shots, field, typed)
            print("how the form refused each value:", ways)
            assert set(ways.values()) <= {"form", "run failed at once"}, ways
            assert ways == EXPECTED_WAYS, ways
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_a_killed_celery_worker_loses_no_clip_and_labels_none_twice(
    stack: tuple[AirflowStack, Any], database_url: str
) -> None:
    st, samples = stack
    labels = _labels(database_url)
    conf = {"tasks": ["cry"], "relabel": True, "batch_size": 1, "slots": 2, "max_new_tokens": 4}
    run_id = "kill-a-worker"
    with writes_blocked(labels):
        st.airflow("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf))
        # both slots (one per Celery worker) have labelled a job and wait inside its write transaction
        wait_until("both slots inside their write", lambda: len(blocked_pids(labels)) == 2, timeout=600)
        with labels.connect() as conn:
            held = conn.execute(
                sa.select(label_job.c.id, label_job.c.lease_owner).where(label_job.c.status == "running")
            ).all()
        owners = {job_id: owner for job_id, owner in held}
        doomed = [j for j, owner in owners.items() if st.descends_from(int(owner.split(":")[1]), "worker-1")]
        # the overlapped worker holds the job it writes and may hold the next (in the model, prefetched)
        assert 1 <= len(doomed) <= 3, owners
        st.kill_machine("worker-1")  # the machine is gone: celery worker, its pool, supervisor and task
    assert st.wait_for_run(run_id, timeout=600) == "success", st.task_instances(run_id)

    (run,) = _runs_of(database_url, run_id)
    with labels.connect() as conn:
        per_audio = dict(
            conn.execute(
                sa.select(cry_answer.c.audio_id, sa.func.count())
                .where(cry_answer.c.run_id == run["id"])
                .group_by(cry_answer.c.audio_id)
            ).all()
        )
        taken_over = conn.execute(sa.select(label_job).where(label_job.c.id.in_(doomed))).all()
    assert run["status"] == "done" and run["n_planned"] == len(samples.clips)
    assert len(per_audio) == len(samples.clips) and set(per_audio.values()) == {1}  # all, each once
    assert run["n_labelled"] == len(samples.clips)
    for job in taken_over:  # every job the killed machine held was taken over once its lease ran out
        assert job.status == "done" and job.attempts == 2, job
        assert "expired" in job.last_error and job.lease_owner != owners[job.id]

    tis = [t for t in st.task_instances(run_id) if t["task_id"] == "label_batch"]
    assert len(tis) == 2 and all(t["state"] == "success" for t in tis)
    assert any(t["try_number"] >= 2 for t in tis)  # the killed slot was retried by Airflow
    assert all(t["rendered_map_index"].startswith("worker ") for t in tis)
    slot_logs = [
        p.read_text(errors="replace")
        for p in (st.home / "logs").rglob("*.log")
        if f"run_id={run_id}" in str(p) and "task_id=label_batch" in str(p)
    ]
    # one model load per slot (the killed one's included); the retry found nothing and loaded nothing
    assert sum(len(LOADED.findall(text)) for text in slot_logs) == 2, [t[-1500:] for t in slot_logs]

"""Every DAG in dags/ parses cleanly, cheaply and safely, and has the shape the pipeline relies on.

The DAG folder is parsed the way the DAG processor does (DagBag) in a subprocess with a throwaway
AIRFLOW_HOME: importing Airflow writes under AIRFLOW_HOME and reads its configuration once per process,
and tests must never touch a user's ~/airflow. The database URLs given to the probe point at nothing,
so any connection attempt at parse time would show up as an import error or an engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
DAG_ID = "qwen_audio_labelling"

PROBE = r"""
import copy, json, sys, time
start = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
seconds = time.perf_counter() - start
from qwen_tasks.store import database as db
out = {
    "import_errors": {k: str(v)[-800:] for k, v in bag.import_errors.items()},
    "seconds": seconds,
    "heavy_modules": [m for m in sys.argv[3].split(",") if m in sys.modules],
    "engines_created": db._engine_for.cache_info().currsize,
    "dags": {},
}
bad_confs = json.loads(sys.argv[2])
for dag_id, dag in bag.dags.items():
    tasks = {}
    for t in dag.tasks:
        tasks[t.task_id] = {
            "retries": t.retries,
            "pool": t.pool,
            "queue": t.queue,
            "mapped": type(t).__name__.endswith("MappedOperator"),
            "map_index_template": getattr(t, "map_index_template", None),
            "trigger_rule": str(getattr(t.trigger_rule, "value", t.trigger_rule)),
            "backoff": bool(t.retry_exponential_backoff),
            "upstream": sorted(t.upstream_task_ids),
            # a mapped task keeps its operator's arguments in partial_kwargs
            "python": getattr(t, "partial_kwargs", {}).get("python", getattr(t, "python", None)),
            "expect_airflow": getattr(t, "partial_kwargs", {}).get("expect_airflow"),
            "operator": type(t).__name__,
            "outlets": [f"{type(o).__name__}:{o.name}" for o in t.outlets],
        }
    rejected = {}
    for conf in bad_confs:
        params = copy.deepcopy(dag.params)
        try:
            params.update(conf)
            params.validate()
            rejected[json.dumps(conf)] = None
        except Exception as exc:
            rejected[json.dumps(conf)] = type(exc).__name__
    out["dags"][dag_id] = {
        "tags": sorted(dag.tags),
        "schedule": str(dag.schedule),
        "cron": getattr(dag.timetable, "expression", None)
        or getattr(getattr(dag.timetable, "timetable", None), "expression", None),
        "timetable": type(dag.timetable).__name__,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "doc_md": dag.doc_md or "",
        "params": {k: v for k, v in dag.params.dump().items()},
        "schemas": {k: dag.params.get_param(k).schema for k in dag.params},
        "tasks": tasks,
        "rejected": rejected,
    }
print("PROBE " + json.dumps(out, default=str))
"""

BAD_CONFS: list[dict[str, Any]] = [
    {"tasks": ["translate"]},
    {"tasks": []},
    {"batch_size": 0},
    {"max_batch_seconds": 0},
    {"method": "maybe"},
    {"yes_threshold": 1.5},
    {"language": "english"},
    {"limit": 0},
    {"relabel": "yes please"},
    {"device": "tpu"},
    {"slots": 0},
    {"workers": "kubernetes"},
    {"tasks": None},
    {"batch_size": 1.5},
    {"batch_size": "abc"},
    {"batch_size": "16"},
    {"yes_threshold": 2},
    {"limit": "abc"},
]
HEAVY = ("torch", "transformers", "qwen_tasks.labelling.worker", "qwen_tasks.labelling.backends")
# What the trigger form sends when optional fields are left empty or cleared: null must validate.
GOOD_CONFS: list[dict[str, Any]] = [
    {"tasks": ["cry"], "limit": 5, "method": "both"},
    {"limit": None},
    {"revision": None, "report_dir": None, "slots": None},
    {"asr_manifests": None, "aqa_manifests": None, "audio_dirs": None},
    {"workers": "external", "slots": 4},
    {"batch_size": 8, "yes_threshold": 1, "max_batch_seconds": 30},
]


def run_probe(home: Path, **extra_env: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "QWEN_TASKS_SCHEDULE": "30 1 * * *",
        "QWEN_TASKS_MODEL": "/models/my-qwen2-audio",
        "QWEN_TASKS_QWEN_AUDIO_PYTHON": "/opt/qwen-audio-venv/bin/python",
        # nothing listens there: a database access at parse time would fail loudly
        "QWEN_TASKS_DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/none",
        "AIRFLOW_CONN_QWEN_TASKS_DB": "postgresql://nobody@127.0.0.1:1/none",
        **extra_env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(DAGS), json.dumps(BAD_CONFS + GOOD_CONFS), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE ") :])


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_probe(tmp_path_factory.mktemp("airflow-home"))


def test_a_bad_environment_value_is_no_import_error(tmp_path: Path) -> None:
    """QWEN_TASKS_BATCH_SIZE=abc: the DAG still parses (the tasks fail with the one-line error)."""
    got = run_probe(
        tmp_path,
        QWEN_TASKS_BATCH_SIZE="abc",
        QWEN_TASKS_MAX_BATCH_SECONDS="-1",
        QWEN_TASKS_GPU_POOL_SLOTS="x",
        QWEN_TASKS_INGEST_SCHEDULE="every 5 minutes",
        QWEN_TASKS_SCHEDULE="61 * * * *",
    )
    assert got["import_errors"] == {}
    assert got["dags"]["qwen_audio_ingest"]["cron"] == "*/15 * * * *"  # the defaults, until it is fixed
    assert got["dags"][DAG_ID]["cron"] == "0 2 * * *"
    params = got["dags"][DAG_ID]["params"]
    assert (params["batch_size"], params["max_batch_seconds"], params["slots"]) == (16, 240.0, 1)


def test_every_dag_imports_without_errors(probe: dict[str, Any]) -> None:
    assert probe["import_errors"] == {}
    assert DAG_ID in probe["dags"]


def test_parsing_is_cheap_and_touches_no_database_or_model(probe: dict[str, Any]) -> None:
    assert probe["heavy_modules"] == [], "torch/transformers/model code must be imported inside tasks"
    assert probe["engines_created"] == 0, "no database engine may be created at parse time"
    assert probe["seconds"] < 30  # generous: 2 shared CPUs; typically ~2 s including Airflow's import


def test_every_dag_has_tags_retries_and_docs(probe: dict[str, Any]) -> None:
    for dag_id, dag in probe["dags"].items():
        assert dag["tags"], f"{dag_id} has no tags"
        assert dag["doc_md"].strip(), f"{dag_id} has no doc_md"
        for task_id, task in dag["tasks"].items():
            assert task["retries"] >= 1, f"{dag_id}.{task_id} has no retries"


def test_labelling_dag_shape(probe: dict[str, Any]) -> None:
    dag = probe["dags"][DAG_ID]
    # the cron (QWEN_TASKS_SCHEDULE) or an asset event: new audio in any dataset, a promoted model
    assert (dag["timetable"], dag["cron"]) == ("AssetOrTimeSchedule", "30 1 * * *")
    for asset in ("AssetAlias(name='qwen_tasks_new_audio'", "uri='qwen_tasks://model/asr'",
                  "uri='qwen_tasks://model/cry'"):  # fmt: skip
        assert asset in dag["schedule"], dag["schedule"]
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert set(tasks) == {"ingest", "plan", "label_batch", "qwen_audio_slots", "label_batch_qwen_audio",
                          "wait_for_workers", "metrics", "report"}  # fmt: skip
    assert tasks["plan"]["upstream"] == ["ingest"]
    assert tasks["label_batch"]["upstream"] == ["plan"]
    # runs of an original Qwen-Audio model: slots of their own, mapped over qwen_audio_slots' return value
    assert tasks["qwen_audio_slots"]["upstream"] == ["plan"]
    assert tasks["label_batch_qwen_audio"]["upstream"] == ["plan", "qwen_audio_slots"]
    assert tasks["wait_for_workers"]["upstream"] == ["plan"]
    assert tasks["metrics"]["upstream"] == [
        "label_batch",
        "label_batch_qwen_audio",
        "plan",
        "wait_for_workers",
    ]
    assert "metrics" in tasks["report"]["upstream"]
    # a second night with nothing new maps label_batch over [] (skipped): metrics and report still run
    assert tasks["metrics"]["trigger_rule"] == tasks["report"]["trigger_rule"] == "none_failed"


def test_ingest_dag_lists_often_and_announces_new_audio(probe: dict[str, Any]) -> None:
    dag = probe["dags"]["qwen_audio_ingest"]
    assert (dag["cron"], dag["catchup"], dag["max_active_runs"]) == ("*/15 * * * *", False, 1)  # the default
    assert set(dag["tasks"]) == {"ingest"}
    assert dag["tasks"]["ingest"]["outlets"] == ["AssetAlias:qwen_tasks_new_audio"]
    # its sources are the labelling DAG's own Params (one options object)
    for name in ("audio_dirs", "asr_manifests", "aqa_manifests"):
        assert dag["schemas"][name] == probe["dags"][DAG_ID]["schemas"][name]
    assert set(dag["params"]) == {"audio_dirs", "asr_manifests", "aqa_manifests"}


def test_finetune_dag_starts_on_reviews_and_announces_promotions(probe: dict[str, Any]) -> None:
    dag = probe["dags"]["qwen_audio_finetune"]
    assert dag["timetable"] == "AssetTriggeredTimetable"
    for task in ("asr", "cry"):
        assert f"uri='qwen_tasks://reviews/{task}'" in dag["schedule"]
    tasks = dag["tasks"]
    assert tasks["prepare"]["upstream"] == ["enough_new_reviews"]  # skipped, not failed, when too few
    assert tasks["enough_new_reviews"]["operator"] == "_ShortCircuitDecoratedOperator"
    assert tasks["promote"]["outlets"] == ["AssetAlias:qwen_tasks_promoted_model"]


@pytest.mark.parametrize("value", ["off", ""])
def test_schedules_can_be_turned_off(tmp_path: Path, value: str) -> None:
    got = run_probe(tmp_path, QWEN_TASKS_SCHEDULE=value, QWEN_TASKS_INGEST_SCHEDULE=value)
    assert got["import_errors"] == {}
    assert got["dags"]["qwen_audio_ingest"]["schedule"] == "None"  # no automatic listing
    labelling = got["dags"][DAG_ID]
    assert (labelling["timetable"], labelling["cron"]) == ("AssetTriggeredTimetable", None)  # events only


def test_gpu_task_uses_the_gpu_pool_and_queue(probe: dict[str, Any]) -> None:
    gpu_tasks = ("label_batch", "label_batch_qwen_audio")
    for task_id in gpu_tasks:
        label = probe["dags"][DAG_ID]["tasks"][task_id]
        assert label["mapped"] is True
        assert (label["pool"], label["queue"]) == ("gpu", "gpu")
        assert label["retries"] >= 2 and label["backoff"] is True
        assert label["map_index_template"] == "{{ worker_name }}"
    qwen_audio = probe["dags"][DAG_ID]["tasks"]["label_batch_qwen_audio"]
    # labelled by the Qwen-Audio environment's python, which has no Airflow
    assert (qwen_audio["python"], qwen_audio["expect_airflow"]) == ("/opt/qwen-audio-venv/bin/python", False)
    others = [t for tid, t in probe["dags"][DAG_ID]["tasks"].items() if tid not in gpu_tasks]
    assert all(t["pool"] != "gpu" and t["queue"] != "gpu" for t in others), "only labelling holds a GPU"


def test_params_defaults_come_from_the_environment(probe: dict[str, Any]) -> None:
    params = probe["dags"][DAG_ID]["params"]
    assert params["model"] == "/models/my-qwen2-audio"  # QWEN_TASKS_MODEL
    assert params["tasks"] == ["asr", "cry"]
    expected = {
        "audio_dirs", "asr_manifests", "aqa_manifests", "tasks", "model", "revision", "device", "dtype",
        "method", "batch_size", "max_batch_seconds", "limit", "relabel", "question", "yes_threshold",
        "max_new_tokens", "language", "report_dir", "slots", "workers", "adapter", "promoted", "datasets",
    }  # fmt: skip
    assert set(params) == expected


def test_optional_params_default_to_null_not_to_a_required_empty_string(probe: dict[str, Any]) -> None:
    """The form marks a string Param with default "" as required: Trigger would stay disabled."""
    params = probe["dags"][DAG_ID]["params"]
    nullable = ("revision", "report_dir", "limit", "audio_dirs", "asr_manifests", "aqa_manifests", "datasets")
    for name in (*nullable, "question"):
        assert params[name] is None, name
    assert params["slots"] == 1 and params["workers"] == "airflow"


def test_params_form_rejects_bad_values_and_accepts_good_ones(probe: dict[str, Any]) -> None:
    rejected = probe["dags"][DAG_ID]["rejected"]
    for conf in BAD_CONFS:
        assert rejected[json.dumps(conf)] == "ParamValidationError", conf
    for conf in GOOD_CONFS:
        assert rejected[json.dumps(conf)] is None, conf


def test_number_params_are_text_fields_the_form_does_not_clamp(probe: dict[str, Any]) -> None:
    """Airflow's form clamps a single-type number Param to its minimum/maximum on blur and drops
    non-digit keystrokes (batch size -5 became 1, threshold 2 became 1): every number Param of both DAGs
    has two types, which the form renders as a text field that sends what was typed or shows an error."""
    for dag_id in (DAG_ID, "qwen_audio_finetune", "qwen_audio_review_sync"):
        for name, schema in probe["dags"][dag_id]["schemas"].items():
            types = schema.get("type")
            types = types if isinstance(types, list) else [types]
            if {"integer", "number"} & set(types):
                assert {"integer", "number"} <= set(types), (dag_id, name, schema)
                assert "enum" not in schema and "examples" not in schema, (dag_id, name)


def test_review_sync_dag_shape(probe: dict[str, Any]) -> None:
    """Hourly, no catch-up; push then pull, and pull runs even when push failed (answers still come back)."""
    dag = probe["dags"]["qwen_audio_review_sync"]
    assert dag["schedule"] in ("@hourly", "0 * * * *") and dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    tasks = dag["tasks"]
    assert set(tasks) == {"push", "pull"}
    assert tasks["pull"]["upstream"] == ["push"] and tasks["pull"]["trigger_rule"] == "all_done"
    assert dag["params"] == {"tasks": ["cry", "asr"], "datasets": None, "strategy": "uncertainty",
                             "limit": 100, "random_share": 0.1}  # fmt: skip
    assert all(t["pool"] != "gpu" for t in tasks.values()), "review sync holds no GPU"


def test_no_airflow2_leftovers() -> None:
    """`ruff check dags/ --select AIR3` (Airflow 3 migration rules) is clean."""
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run(
        [str(ruff), "check", str(DAGS), "--select", "AIR3", "--no-cache"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Run the labelling DAG on this machine with no scheduler: `dag.test()` in a project-local AIRFLOW_HOME.

Used by `make demo` and the end-to-end test, so both exercise the DAG itself, not a side path.

- The Airflow home defaults to `$QWEN_TASKS_HOME/airflow` (never the user's `~/airflow`); its metadata
  database is SQLite, which is enough for `dag.test()` (one process, no executor). `airflow db migrate`
  runs once (about 5 s) and is skipped afterwards thanks to a marker file keyed by the Airflow version.
- The DAG runs in a child process: Airflow reads its configuration once per process at import time, so a
  clean process is the only reliable way to point it at this home and at `dags/`. The child writes a
  small JSON result (run state, task states, XCom values of the non-mapped tasks) to a file; the full
  Airflow log goes to `<home>/logs/dag_test/`.
- `dag.test()` does not enforce pools (it runs every ready task itself, one at a time), but the `gpu` pool
  is created anyway (QWEN_TASKS_GPU_POOL_SLOTS slots) so the same home also works with `airflow standalone`.
- The home's `airflow.cfg` is written by us before Airflow would write its own, and it pins no absolute
  path: the database is `${AIRFLOW_HOME}/airflow.db` and the DAGs folder comes from the environment, so a
  copied or moved checkout uses its own files (Airflow expands environment variables in the file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_tasks.config import get_settings
from qwen_tasks.errors import ConfigError, QwenTasksError

DAG_ID = "qwen_audio_labelling"
GPU_POOL = "gpu"
SUMMARY_TASKS = ("ingest", "plan", "metrics", "report")


class DagRunFailed(QwenTasksError):
    """The DAG run finished in a state other than success (details in the log file it names)."""


def project_dags_folder() -> Path:
    """`dags/` of this source checkout (the demo and the tests run from a checkout)."""
    folder = Path(__file__).resolve().parents[2] / "dags"
    if not (folder / f"{DAG_ID}.py").is_file():
        raise ConfigError(f"{folder} has no {DAG_ID}.py: run from a source checkout of qwen-audio-labelling")
    return folder


def default_home() -> Path:
    return get_settings().home / "airflow"


def airflow_env(home: Path, dags_folder: Path | None = None, *, quiet: bool = True) -> dict[str, str]:
    """Environment that points Airflow at `home` and our `dags/` (everything else inherited)."""
    home = home.resolve()
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str((dags_folder or project_dags_folder()).resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        }
    )
    if quiet:
        env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    return env


CFG_MARKER = "# qwen_tasks.dev.airflow_local: no absolute paths"
AIRFLOW_CFG = f"""{CFG_MARKER}
# The Airflow home of the qwen-audio-labelling demo and tests. Paths come from the environment when an
# Airflow command runs (Airflow expands ${{...}} here), so this folder can be copied or moved:
#   AIRFLOW_HOME                this folder
#   AIRFLOW__CORE__DAGS_FOLDER  the checkout's dags/ (set by qwen_tasks.dev.airflow_local, or export it)
[core]
load_examples = False
executor = LocalExecutor
# airflow standalone on a laptop: the default (32) starts 32 worker processes, ~2 GB while idle
parallelism = 4

[database]
sql_alchemy_conn = sqlite:///${{AIRFLOW_HOME}}/airflow.db

[logging]
base_log_folder = ${{AIRFLOW_HOME}}/logs
"""


def write_airflow_cfg(home: Path) -> Path:
    """Write the home's airflow.cfg unless it is ours already (an old, path-pinning one is replaced)."""
    cfg = home / "airflow.cfg"
    if cfg.is_file() and cfg.read_text(errors="replace").startswith(CFG_MARKER):
        return cfg
    home.mkdir(parents=True, exist_ok=True)
    cfg.write_text(AIRFLOW_CFG)
    return cfg


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow-core")


def ensure_metadata_db(home: Path, env: dict[str, str]) -> dict[str, Any]:
    """`airflow db migrate` once per home and Airflow version; returns whether it ran and how long."""
    write_airflow_cfg(home)
    marker = home / f".migrated-{_airflow_version()}"
    if marker.exists():
        return {"migrated": False, "seconds": 0.0}
    home.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise ConfigError(f"airflow db migrate failed in {home}:\n{tail}")
    marker.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 2)}) + "\n")
    return {"migrated": True, "seconds": time.perf_counter() - start}


@dataclass
class DagTestResult:
    """What the child process reports about one `dag.test()` run."""

    state: str
    dag_run_id: str
    tasks: list[dict[str, Any]] = field(default_factory=list)  # task_id, map_index, state, name
    xcom: dict[str, Any] = field(default_factory=dict)  # SUMMARY_TASKS' XComs ("plan", "plan.run_ids")
    log_file: str = ""
    seconds: float = 0.0

    def states(self, task_id: str) -> list[str]:
        return [t["state"] for t in self.tasks if t["task_id"] == task_id]


def run_dag_test(
    conf: dict[str, Any],
    *,
    home: Path | None = None,
    dags_folder: Path | None = None,
    extra_env: dict[str, str | None] | None = None,
    timeout: float = 1800,
    check: bool = True,
    dag_id: str = DAG_ID,
) -> DagTestResult:
    """Run a DAG (default: the nightly labelling one) once with `conf` as trigger conf in a child process;
    raise DagRunFailed unless it succeeded (when `check`). `extra_env` adds variables to the child's
    environment (None removes one)."""
    home = (home or default_home()).resolve()
    env = airflow_env(home, dags_folder)
    for key, value in (extra_env or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    ensure_metadata_db(home, env)
    logs = home / "logs" / "dag_test"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_file = logs / f"{stamp}-{os.getpid()}.log"
    result_file = logs / f"{stamp}-{os.getpid()}.json"
    start = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen_tasks.dev.airflow_local",
                "--conf",
                json.dumps(conf),
                "--out",
                str(result_file),
                "--dag-id",
                dag_id,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-15:])
        raise DagRunFailed(f"dag.test() exited with {proc.returncode}; log {log_file}:\n{tail}")
    raw = json.loads(result_file.read_text())
    result_file.unlink()
    result = DagTestResult(**raw, log_file=str(log_file), seconds=time.perf_counter() - start)
    if check and result.state != "success":
        failed = [f"{t['task_id']}[{t['map_index']}]" for t in result.tasks if t["state"] == "failed"]
        raise DagRunFailed(
            f"DAG run {result.dag_run_id} is {result.state} (failed: {failed}); log {log_file}"
        )
    return result


# --- child process -------------------------------------------------------------------------------------


def _child(conf: dict[str, Any], out: Path, dag_id: str = DAG_ID) -> None:
    """In the child: make the pool, parse the DAG like the DAG processor does, run it, write the result."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.pool import Pool
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    Pool.create_or_update_pool(
        GPU_POOL,
        slots=get_settings().gpu_slots,
        description="GPU slots for label_batch (QWEN_TASKS_GPU_POOL_SLOTS)",
        include_deferred=False,
    )
    bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])  # examples are off via LOAD_EXAMPLES
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        raise SystemExit(f"no DAG {dag_id} in {os.environ['AIRFLOW__CORE__DAGS_FOLDER']}")
    dag_run = dag.test(run_conf=conf)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == dag_run.run_id
        )
        tasks = [
            {
                "task_id": ti.task_id,
                "map_index": ti.map_index,
                "state": str(getattr(ti.state, "value", ti.state)),
                "name": ti.rendered_map_index,
                "try_number": ti.try_number,
            }
            for ti in tis
        ]
        rows = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id,
                dag_ids=dag_id,
                task_ids=list(SUMMARY_TASKS) if dag_id == DAG_ID else None,
                map_indexes=-1,
            )
        ).all()
        # "plan" = its return value; "plan.run_ids" = the XCom it pushed under the key run_ids
        xcom = {
            row.task_id
            if row.key == "return_value"
            else f"{row.task_id}.{row.key}": XComModel.deserialize_value(row)
            for row in rows
        }
    state = str(getattr(dag_run.state, "value", dag_run.state))
    tasks.sort(key=lambda t: (t["task_id"], t["map_index"]))
    out.write_text(json.dumps({"state": state, "dag_run_id": dag_run.run_id, "tasks": tasks, "xcom": xcom}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a DAG (qwen_audio_labelling) once with dag.test()")
    parser.add_argument("--conf", default="{}", help="trigger conf as JSON (overrides the DAG's Params)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the JSON result")
    parser.add_argument("--dag-id", default=DAG_ID, help=f"which DAG (default {DAG_ID})")
    args = parser.parse_args(argv)
    _child(json.loads(args.conf), args.out, args.dag_id)


if __name__ == "__main__":
    main()

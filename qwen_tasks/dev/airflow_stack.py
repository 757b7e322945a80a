"""A real, local multi-process Airflow: CeleryExecutor, Redis broker, PostgreSQL metadata.

A development aid (like `airflow_local`, which runs the DAG in one process with `dag.test()`), used by
tests/orchestration/test_airflow_stack.py and by `bench/dag.py --celery`. `AirflowStack` migrates a
throwaway metadata database on the server of `admin_url`, then starts the api-server (UI, REST and the
execution API the task runners talk to), a scheduler, a dag-processor, a triggerer (deferred tasks and
asset watchers) and N `airflow celery worker`
processes (queues default and gpu, concurrency 1), each in its own process group with its log under the
stack's home; the DAGs folder is this checkout's `dags/`. The labels database is `labels_url`, reached by
the DAG through the `qwen_tasks_db` connection. The shared Redis sees every key under a prefix of the
stack's own. `stop()` (also on leaving `with AirflowStack(...) as st:`, and when `start()` fails) ends every
process it started, the task processes they started in sessions of their own included (SIGTERM, then
SIGKILL after a grace period), deletes the stack's Redis keys and drops the metadata database; nothing
else is touched. Failures raise AirflowStackError.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from qwen_tasks.dev.airflow_local import DAG_ID, project_dags_folder
from qwen_tasks.errors import QwenTasksError
from qwen_tasks.store import database as db

AIRFLOW = [sys.executable, "-m", "airflow"]
# The shared Redis and the database-name prefix of the throwaway databases (the stack's metadata database,
# the bench's labels database), overridable for a machine whose Redis db 0 or whose names are taken.
REDIS_URL_VAR, DB_PREFIX_VAR = "QWEN_TASKS_STACK_REDIS_URL", "QWEN_TASKS_STACK_DB_PREFIX"
REDIS_URL = "redis://127.0.0.1:6379/0"


def stack_redis_url() -> str:
    """The Celery broker: QWEN_TASKS_STACK_REDIS_URL, default redis://127.0.0.1:6379/0."""
    return os.environ.get(REDIS_URL_VAR, "").strip() or REDIS_URL


def stack_db_prefix() -> str:
    """Prefix of the throwaway database names: QWEN_TASKS_STACK_DB_PREFIX, default qwen_tasks."""
    prefix = os.environ.get(DB_PREFIX_VAR, "").strip() or "qwen_tasks"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,30}", prefix):
        raise AirflowStackError(
            f"{DB_PREFIX_VAR} must be a lower-case SQL name (a-z, 0-9, _; at most 31), got {prefix!r}"
        )
    return prefix


__all__ = ["DAG_ID", "AirflowStack", "AirflowStackError", "free_port", "stack_db_prefix", "stack_redis_url",
           "wait_until"]  # fmt: skip


class AirflowStackError(QwenTasksError):
    """The stack could not start, one of its processes died, or something it waited for did not happen."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ...] (field 3 on), or None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, with its start time (to tell a reused pid apart later)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != root and _descends(int(entry.name), root):
            stat = _stat(int(entry.name))
            if stat:
                found[int(entry.name)] = stat[19]  # field 22: start time
    return found


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        stat = _stat(pid)
        if stat is None:
            return False
        pid = int(stat[1])  # field 4: the parent's pid
    return False


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AirflowStackError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class AirflowStack:
    home: Path
    admin_url: str
    labels_url: str
    env_extra: dict[str, str] = field(default_factory=dict)
    workers: int = 2
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # one for every process
    port: int = field(default_factory=free_port)
    redis_url: str = field(default_factory=stack_redis_url)
    redis_prefix: str = ""  # default: qwen_stack_<pid>_<port>_
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    meta_url: str = ""
    _scratch: Any = None

    # --- setup -----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        labels = make_url(self.labels_url).set(drivername="postgresql")
        meta = make_url(self.meta_url)
        self.redis_prefix = self.redis_prefix or f"qwen_stack_{os.getpid()}_{self.port}_"
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(project_dags_folder()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta.render_as_string(hide_password=False),
            "AIRFLOW__CELERY__BROKER_URL": self.redis_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+"
            + meta.set(drivername="postgresql").render_as_string(hide_password=False),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # the shared Redis: every key of this stack under its own prefix
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_QWEN_TASKS_DB": labels.render_as_string(hide_password=False),
            "QWEN_TASKS_SCHEDULE": "",  # manual runs only: no catch-up run on unpause
            "QWEN_TASKS_INGEST_SCHEDULE": "",  # no ingest DAG runs unless a test asks for them
            "QWEN_TASKS_HOME": str(self.home / "qwen_tasks"),
            "QWEN_TASKS_RETRY_DELAY_SECONDS": "1",
            "OMP_NUM_THREADS": "1",
            **self.env_extra,
        }
        env.pop("QWEN_TASKS_DATABASE_URL", None)  # the DAG must reach the labels through the connection
        return env

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*AIRFLOW, *args], env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            raise AirflowStackError(f"airflow {' '.join(args)} failed:\n{(out.stderr or out.stdout)[-3000:]}")
        return out

    def start(self) -> AirflowStack:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "passwords.json").write_text(json.dumps({"admin": self.password}))
        self._scratch = db.scratch_database(self.admin_url, prefix=f"{stack_db_prefix()}_airflow_meta")
        self.meta_url = self._scratch.__enter__()
        try:
            self.airflow("db", "migrate", timeout=600)
            self.airflow("pools", "set", "gpu", str(self.workers), "GPU slots")
            self.spawn("api-server", "api-server", "--port", str(self.port))
            self.spawn("scheduler", "scheduler", AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()))
            self.spawn("dag-processor", "dag-processor")
            self.spawn("triggerer", "triggerer", AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()))
            for k in range(1, self.workers + 1):
                self.spawn_worker(k)
            wait_until("the api-server", self._api_up, timeout=240)
            wait_until(f"{DAG_ID} to be parsed", self._dag_serialized, timeout=240, interval=1)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.home / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [*AIRFLOW, *args],
            env={**self.env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def spawn_worker(self, k: int) -> subprocess.Popen[bytes]:
        return self.spawn(
            f"worker-{k}", "celery", "worker", "--queues", "default,gpu", "--concurrency", "1",
            "--celery-hostname", f"w{k}@%h", "--without-mingle", "--without-gossip",
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),  # each its own log server
        )  # fmt: skip

    def _api_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/v2/version", timeout=5) as r:
                return r.status == 200
        except Exception:
            self.check_alive()
            return False

    def meta(self) -> sa.Engine:
        return db.get_engine(self.meta_url)

    def _dag_serialized(self, dag_id: str = DAG_ID) -> bool:
        self.check_alive()
        with self.meta().connect() as conn:
            return bool(
                conn.execute(
                    sa.text("SELECT count(*) FROM serialized_dag WHERE dag_id = :d"), {"d": dag_id}
                ).scalar()
            )

    def wait_for_dag(self, dag_id: str, timeout: float = 240) -> None:
        """Until the dag-processor has parsed `dag_id` (the stack waits for the labelling DAG only)."""
        wait_until(
            f"{dag_id} to be parsed", lambda: self._dag_serialized(dag_id), timeout=timeout, interval=1
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and not name.startswith("killed"):
                tail = (self.home / f"{name}.log").read_text(errors="replace")[-3000:]
                raise AirflowStackError(f"{name} exited with {proc.returncode}:\n{tail}")

    # --- running ---------------------------------------------------------------------------------------

    def dag_runs(self, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        with self.meta().connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT run_id, state, conf, run_type, triggered_by, start_date, end_date FROM dag_run "
                    "WHERE dag_id = :d ORDER BY id"
                ),
                {"d": dag_id},
            )
            return [dict(r._mapping) for r in rows]

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        with self.meta().connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT task_id, map_index, state, try_number, hostname, rendered_map_index, "
                    "start_date, end_date, duration "
                    "FROM task_instance WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index"
                ),
                {"d": DAG_ID, "r": run_id},
            )
            return [dict(r._mapping) for r in rows]

    def wait_for_run(self, run_id: str, timeout: float) -> str:
        def finished() -> str | None:
            self.check_alive()
            state = next((r["state"] for r in self.dag_runs() if r["run_id"] == run_id), None)
            return state if state in ("success", "failed") else None

        return wait_until(f"DAG run {run_id}", finished, timeout=timeout, interval=2)

    def task_logs(self, run_id: str, task_id: str | None = None) -> dict[str, str]:
        """The task log files of a DAG run (all tries), by path under the logs folder: their text."""
        logs = self.home / "logs"
        found = {}
        for path in sorted(logs.rglob("*.log")):
            parts = path.relative_to(logs).parts
            if f"run_id={run_id}" in parts and (task_id is None or f"task_id={task_id}" in parts):
                found[str(path.relative_to(logs))] = path.read_text(errors="replace")
        return found

    def descends_from(self, pid: int, name: str) -> bool:
        """Whether process `pid` was started (directly or not) by the stack's process `name` (the task
        supervisor starts each task in a session of its own, so process groups do not tell)."""
        return _descends(pid, self.procs[name].pid)

    def kill_machine(self, name: str) -> None:
        """SIGKILL a process and everything it started, all at once (a worker machine lost)."""
        proc = self.procs.pop(name)
        doomed = [proc.pid] + [
            int(e.name)
            for e in Path("/proc").iterdir()
            if e.name.isdigit() and int(e.name) != proc.pid and _descends(int(e.name), proc.pid)
        ]
        for pid in doomed:  # freeze them all first, so none reacts to another one dying
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.procs[f"killed-{name}"] = proc

    # --- teardown --------------------------------------------------------------------------------------

    def stop(self) -> None:
        # the task supervisors start each task in a session of its own: note every descendant now, while
        # the parent links still lead to the stack's processes, and kill the ones a SIGTERM left behind
        below: dict[int, str] = {}
        for proc in self.procs.values():
            below.update(_descendants(proc.pid))
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for proc in self.procs.values():  # the group too: children a SIGTERM left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for pid, started in below.items():
            stat = _stat(pid)
            if stat and stat[19] == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self.procs.clear()
        self._forget_redis_keys()
        if self._scratch is not None:
            db.get_engine(self.meta_url).dispose()
            self._scratch.__exit__(None, None, None)
            self._scratch = None

    def _forget_redis_keys(self) -> None:
        """Delete the keys this stack left in the shared Redis (its prefix only); best effort."""
        if not self.redis_prefix:
            return
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            try:
                keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=500))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()

"""docker-compose.yml and its Dockerfile are complete and wired together (no Docker engine needed).

These tests read the files; they cannot start the stack. What they pin down is what a user would
otherwise only find out after a long image build: every service is there, the GPU worker reserves a
GPU and listens on the `gpu` queue, every Airflow service reaches both databases with the same
settings, and the files the compose file points at exist.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-init",
    "airflow-worker-gpu",
)
SERVICES = ("postgres", "redis", *AIRFLOW_SERVICES)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_names_every_service(compose: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(compose["services"])


def test_airflow_services_build_the_project_image(compose: dict[str, Any]) -> None:
    for name in AIRFLOW_SERVICES:
        build = compose["services"][name]["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM\s+\$\{AIRFLOW_IMAGE\}", dockerfile, re.M)
    assert "apache/airflow:3.3.2" in dockerfile  # the Airflow version requirements.lock pins
    assert "requirements.lock" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    for copied in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for source in copied.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_commands_match_airflow3(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-scheduler"]["command"] == "scheduler"
    assert services["airflow-dag-processor"]["command"] == "dag-processor"
    assert services["airflow-triggerer"]["command"] == "triggerer"
    assert "celery worker" in services["airflow-worker-gpu"]["command"]
    assert re.search(r"--queues\s+gpu\b", services["airflow-worker-gpu"]["command"])


def test_gpu_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert env_of(compose["services"]["airflow-worker-gpu"])["QWEN_TASKS_DEVICE"] == "cuda"


def test_environment_wiring(compose: dict[str, Any]) -> None:
    for name in AIRFLOW_SERVICES:
        env = env_of(compose["services"][name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
        # the DAG's connection and the CLI's URL name the same labels database
        conn, url = env["AIRFLOW_CONN_QWEN_TASKS_DB"], env["QWEN_TASKS_DATABASE_URL"]
        assert conn.startswith("postgresql://") and url.startswith("postgresql+psycopg2://")
        assert conn.split("://", 1)[1] == url.split("://", 1)[1], name
        # the trust boundary of the trigger form (docs/airflow.md): roots and the model allowlist are set
        assert env["QWEN_TASKS_ALLOWED_ROOTS"] == "/data/audio", name
        assert "Qwen/:/opt/airflow/qwen_tasks_home/models" in env["QWEN_TASKS_ALLOWED_MODELS"], name
        volumes = " ".join(compose["services"][name]["volumes"])
        assert "/opt/hf-cache" in volumes and "/data/audio" in volumes and "./dags:" in volumes, name


def test_postgres_creates_both_databases(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert env_of(postgres)["POSTGRES_DB"] == "airflow"
    init_dir = next(v.split(":")[0] for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    scripts = sorted((ROOT / init_dir).iterdir())
    assert scripts, "no init script for the labels database"
    text = "\n".join(s.read_text() for s in scripts)
    assert "CREATE DATABASE" in text and "CREATE ROLE" in text


def test_init_migrates_both_databases_and_creates_the_gpu_pool(compose: dict[str, Any]) -> None:
    init = compose["services"]["airflow-init"]
    script = ROOT / "docker" / "airflow-init.sh"
    assert init["command"] == "/opt/qwen_tasks/airflow-init.sh"
    text = script.read_text()
    assert "airflow db migrate" in text
    assert "qwen-tasks db upgrade" in text
    assert re.search(r"airflow pools set gpu\b", text)
    assert "SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in text
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker-gpu"):
        depends = compose["services"][name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_scripts_parse() -> None:
    for script in (ROOT / "docker").rglob("*.sh"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="no `docker compose` here (as on our CI machines)")
def test_docker_compose_config_validates() -> None:  # pragma: no cover - runs where Docker exists
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_local_path_without_docker(tmp_path: Path) -> None:
    """The no-Docker path of docs/airflow.md: with AIRFLOW__CORE__DAGS_FOLDER at dags/, the DAG is
    serialized into the metadata database (what `airflow standalone`'s dag-processor does) and the `gpu`
    pool exists, so the scheduler can run it."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    airflow = [sys.executable, "-m", "airflow"]
    for args in (
        ["db", "migrate"],
        ["pools", "set", "gpu", "1", "GPU slots"],
        ["dags", "reserialize"],
        ["dags", "list", "-o", "plain"],
    ):
        proc = subprocess.run(
            airflow + args, capture_output=True, text=True, env=env, timeout=300, check=False
        )
        assert proc.returncode == 0, f"airflow {' '.join(args)}: {proc.stderr[-2000:]}"
    assert "qwen_audio_labelling" in proc.stdout
    pools = subprocess.run(
        airflow + ["pools", "get", "gpu"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert pools.returncode == 0 and "gpu" in pools.stdout

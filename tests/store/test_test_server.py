"""`make test` on a fresh machine: with no QWEN_TASKS_TEST_DATABASE_URL and no server answering, the test
session runs on the embedded PostgreSQL (tests/conftest.py), started in its temporary folder and stopped
at its end. Shown with a real inner pytest session whose probed address is a port nobody listens on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_SERVER_ADDRESS
from services import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
A_DATABASE_TEST = "tests/store/test_schema.py::test_every_view_is_declared_once"


@pytest.mark.slow
def test_without_a_server_the_tests_run_on_the_embedded_postgres(tmp_path: Path) -> None:
    unset = ("QWEN_TASKS_TEST_DATABASE_URL", "QWEN_TASKS_DATABASE_URL", REQUIRE_SERVICES)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    with socket.socket() as closed:  # bound but never listening: a connection to it is refused
        closed.bind(("127.0.0.1", 0))
        env[TEST_SERVER_ADDRESS] = f"127.0.0.1:{closed.getsockname()[1]}"
        inner = subprocess.run(
            [*PYTEST, f"--basetemp={tmp_path / 'inner'}", A_DATABASE_TEST],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert inner.returncode == 0, inner.stdout[-3000:] + inner.stderr[-3000:]
    assert "1 passed" in inner.stdout
    pgdata = tmp_path / "inner" / "embedded-postgres0" / "pgdata"
    assert (pgdata / "PG_VERSION").is_file()  # the server lived in the session's temporary folder
    assert not (pgdata / "postmaster.pid").exists()  # and was stopped at the session's end


def test_a_bad_test_server_address_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "QWEN_TASKS_TEST_DATABASE_URL"}
    env[TEST_SERVER_ADDRESS] = "no-port-here"
    inner = subprocess.run(
        [*PYTEST, f"--basetemp={tmp_path / 'inner'}", A_DATABASE_TEST],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert inner.returncode == 4
    assert f"{TEST_SERVER_ADDRESS} must be HOST:PORT, got 'no-port-here'" in inner.stdout + inner.stderr
    assert "Traceback" not in inner.stdout + inner.stderr

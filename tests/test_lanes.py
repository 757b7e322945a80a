"""The fast lane (`make test-fast`) stays honest: it selects no test that uses a database or model fixture,
and in a session like it a test that reaches PostgreSQL or builds the tiny model without saying so fails
with the mark it lacks (tests/conftest.py). Both shown with real inner pytest sessions; the lane's
expression is read from the Makefile, where it is declared."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# The conftest fixtures that provide PostgreSQL or the model; any fixture built on them reaches them too.
DATABASE_OR_MODEL = {"admin_url", "database_url", "engine", "tiny_model_dir"}
PROBE = """
import json, os

def pytest_collection_finish(session):
    found = {item.nodeid: sorted(item.fixturenames) for item in session.items}
    with open(os.environ["LANE_PROBE_OUT"], "w") as out:
        json.dump(found, out)
"""
REACHES_BOTH = """
from qwen_tasks.dev.tiny_model import make_tiny_model
from qwen_tasks.store import database as db

def test_reaches_the_configured_database():
    db.get_engine()

def test_would_start_the_embedded_postgres(monkeypatch):
    monkeypatch.delenv("QWEN_TASKS_DATABASE_URL")
    db.get_engine()

def test_builds_a_model(tmp_path):
    make_tiny_model(tmp_path / "model")
"""


def fast_lane() -> str:
    """The fast lane's marker expression, as `make test-fast` passes it to pytest."""
    found = re.search(r"^FAST_LANE\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, "the Makefile declares FAST_LANE"
    return found.group(1).strip()


def _pytest(args: list[str], cwd: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd, env=full, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_fast_lane_uses_no_database_or_model_fixture(tmp_path: Path) -> None:
    (tmp_path / "lane_probe.py").write_text(PROBE)
    out = tmp_path / "collected.json"
    done = _pytest(
        ["--collect-only", "-p", "lane_probe", "-m", fast_lane()], ROOT, tmp_path, LANE_PROBE_OUT=str(out)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = json.loads(out.read_text())
    assert len(collected) > 500  # the lane holds most of the suite
    assert "tests/test_lanes.py::test_the_fast_lane_uses_no_database_or_model_fixture" in collected
    offenders = {
        nodeid: sorted(DATABASE_OR_MODEL & set(fixtures))
        for nodeid, fixtures in collected.items()
        if DATABASE_OR_MODEL & set(fixtures)
    }
    assert offenders == {}


def test_in_such_a_session_an_unmarked_test_cannot_reach_either(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(REACHES_BOTH)
    done = _pytest(["-p", "conftest", "-rf", "test_inner.py"], tmp_path, tmp_path, COLUMNS="400")
    assert done.returncode == 1 and "3 failed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cannot connect" in done.stdout and "127.0.0.1:1" in done.stdout
    assert (
        "this test started the embedded PostgreSQL, but this session selected no `db` test: "
        "mark it @pytest.mark.db" in done.stdout
    )
    assert (
        "this test built the tiny model, but this session selected no `model` test: "
        "mark it @pytest.mark.model" in done.stdout
    )

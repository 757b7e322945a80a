"""tests/services.py: a missing service skips with one line saying what to install, and fails under
QWEN_TASKS_REQUIRE_SERVICES=1 (what .ci/run sets), in a real inner pytest session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import REQUIRE_SERVICES

TESTS = Path(__file__).resolve().parent
NEEDS_A_SERVICE = """
from services import require

def test_needs_a_service():
    require(False, "needs the frobnicator at 127.0.0.1:1 (apt-get install frobnicator)")
"""


def _inner(tmp_path: Path, require_services: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(NEEDS_A_SERVICE)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_SERVICES}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "400"  # the short summary line holds the whole reason
    if require_services is not None:
        env[REQUIRE_SERVICES] = require_services
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("require_services", [None, "0"])
def test_a_missing_service_skips_with_what_to_install(tmp_path: Path, require_services: str | None) -> None:
    done = _inner(tmp_path, require_services)
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout
    assert "needs the frobnicator at 127.0.0.1:1 (apt-get install frobnicator)" in done.stdout


def test_ci_turns_that_skip_into_a_failure(tmp_path: Path) -> None:
    done = _inner(tmp_path, "1")
    assert done.returncode == 1 and "1 failed" in done.stdout
    assert (
        "needs the frobnicator at 127.0.0.1:1 (apt-get install frobnicator) "
        f"({REQUIRE_SERVICES}=1: this run must not skip it)" in done.stdout
    )
    assert "Traceback" not in done.stdout

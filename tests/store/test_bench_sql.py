"""bench/sql.py at a small scale: the generated database satisfies every constraint (it is filled through
the real tables, triggers included), current_label matches the answers, and every timed query and CLI
command runs. Slow: it starts the CLI five times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_sql_small_scale(database_url: str) -> None:
    from sqlalchemy.engine import make_url

    admin = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sql.py"), "--audio", "3000", "--answers", "18000",
         "--admin-url", admin, "--timeout", "60"],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    assert "3,000 audio, " in table and "(3,000 in run 36)" in table
    for name in ("latest_label by path", "review_queue by run (first 50)", "sql/queries/review_queue.sql",
                 "qwen-tasks metrics --run 36 (cry)", "qwen-tasks export --run 36 (cry)"):  # fmt: skip
        assert name in table
    assert "timeout" not in table and "failed" not in table and "exit " not in table

"""bench/sql.py at a small scale: the generated database satisfies every constraint (it is filled through
the real tables, triggers included), current_label matches the answers, and every timed query and CLI
command runs. Slow: it starts the CLI five times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

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


@pytest.mark.slow
def test_bench_bulk_fill_gives_the_rows_of_the_triggers(admin_url: str) -> None:
    """`--bulk` (the per-clip tables' triggers off, the tables rebuilt after the fill) leaves the same
    dataset_clip, review_item, cry_run_clip and dataset_summary as a fill with every trigger on."""
    import importlib.util

    from qwen_tasks.store import database as db

    spec = importlib.util.spec_from_file_location("bench_sql", ROOT / "bench" / "sql.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def tables(eng: Engine) -> dict[str, list[tuple]]:
        with eng.connect() as conn:
            out = {
                t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1, 2, 3"))]  # noqa: S608
                for t in ("dataset_clip", "review_item", "cry_run_clip")
            }
            out["dataset_summary"] = [
                tuple(r)
                for r in conn.execute(
                    sa.text("SELECT name, clips, audio_seconds, asr_labelled, cry_labelled, asr_references, "
                            "cry_gold, cry_gold_yes, cry_gold_no FROM dataset_summary ORDER BY name")
                )
            ]  # fmt: skip
        return out

    # Both fills go into fresh databases: their ids (sequences) start alike, which the session database's
    # do not after other tests (a TRUNCATE keeps them).
    with (
        db.scratch_database(admin_url, prefix="qwen_tasks_test_triggers") as url,
        db.scratch_database(admin_url, prefix="qwen_tasks_test_bulk") as bulk_url,
    ):
        triggered, bulk = db.get_engine(url), db.get_engine(bulk_url)
        try:
            bench.fill(triggered, 2000, 12000, [])
            with_triggers = tables(triggered)
            assert all(with_triggers.values())
            bench.fill(bulk, 2000, 12000, [], bulk=True)
            got = tables(bulk)
            for name, rows in with_triggers.items():  # compared per table: a failure names it, briefly
                want, have = {repr(r) for r in rows}, {repr(r) for r in got[name]}  # rows hold lists
                missing, extra = want - have, have - want
                assert not missing and not extra and len(rows) == len(got[name]), (
                    f"{name}: {len(missing)} row(s) only with triggers (e.g. {sorted(missing)[:2]}), "
                    f"{len(extra)} only with --bulk (e.g. {sorted(extra)[:2]})"
                )
            with bulk.connect() as conn:  # the triggers are on again
                disabled = conn.execute(
                    sa.text("SELECT count(*) FROM pg_trigger WHERE tgenabled = 'D' AND tgname ~ :p"),
                    {"p": bench.KEEPING_TRIGGERS},
                ).scalar_one()
            assert disabled == 0
        finally:
            triggered.dispose()
            bulk.dispose()

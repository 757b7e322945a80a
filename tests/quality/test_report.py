"""The HTML report is produced, self-contained, with its plots and the worst items."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from review_seed import add_human, seed_asr_scenario, seed_cry_scenario
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.quality.metrics import load_run_metrics
from qwen_tasks.quality.report import write_report

IMG = re.compile(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def test_report_has_plots_tables_and_paths(engine: Engine, tmp_path: Path) -> None:
    cry_run, _ = seed_cry_scenario(engine)
    asr_run, _ = seed_asr_scenario(engine)
    path = write_report(engine, None, tmp_path / "r.html")  # default: latest run of each task
    page = path.read_text(encoding="utf-8")
    images = IMG.findall(page)
    # cry: p_yes histogram, ROC, reliability diagram, throughput; asr: WER distribution, throughput
    assert len(images) == 6
    assert all(len(b) > 1000 for b in images)
    assert 'src="http' not in page and "<script" not in page  # nothing loaded from elsewhere
    assert f"Run {cry_run}: cry" in page and f"Run {asr_run}: asr" in page
    assert "/data/audio/clip_005.wav" in page  # confident mistake (p .65, gold no)
    assert "/data/speech/clip_102.wav" in page  # worst utterance
    assert "<td>高兴</td><td>开心</td>" in page  # substitution pair table
    assert "Best-F1 threshold for p_yes: <b>0.45</b>" in page
    assert load_run_metrics(engine, cry_run)  # metrics were (re)computed and stored


def test_report_for_one_run_into_a_folder_and_escaping(engine: Engine, tmp_path: Path) -> None:
    cry_run, ids = seed_cry_scenario(engine)
    add_human(engine, ids[0], "cry", label="yes")
    path = write_report(engine, [cry_run], tmp_path / "reports" / "nightly")
    assert path == tmp_path / "reports" / "nightly" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert len(IMG.findall(page)) == 4  # histogram, ROC, reliability, throughput
    assert "I can&#x27;t tell." in page  # model text is escaped, never raw HTML


def test_single_class_gold_has_no_roc_plot(engine: Engine, tmp_path: Path) -> None:
    from review_seed import Job, add_audio, add_cry_answers, add_gold, add_run

    ids = add_audio(engine, 2)
    add_gold(engine, dict.fromkeys(ids, "no"))
    run = add_run(engine, "cry", [Job(0, 1, ids, process_seconds=1)])
    add_cry_answers(engine, run, score={ids[0]: 0.2, ids[1]: 0.7})
    page = write_report(engine, [run], tmp_path / "one.html").read_text(encoding="utf-8")
    assert len(IMG.findall(page)) == 3  # histogram, reliability and throughput, no ROC


def test_unknown_run_and_empty_database(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run\\(s\\) 77 do not exist"):
        write_report(engine, [77], tmp_path / "x.html")
    page = write_report(engine, None, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert "No labelling runs yet" in page


def test_report_cli(engine: Engine, database_url: str, tmp_path: Path) -> None:
    run_id, _ = seed_cry_scenario(engine)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_tasks",
            "report",
            "--run",
            str(run_id),
            "--out",
            str(tmp_path / "cli.html"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "QWEN_TASKS_DATABASE_URL": database_url},
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert len(IMG.findall((tmp_path / "cli.html").read_text(encoding="utf-8"))) == 4

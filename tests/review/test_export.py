"""`export --out`: folders it creates are announced, and a failed export creates none (issue 14, item 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.errors import ConfigError
from qwen_tasks.review.export import write_jsonl


def test_missing_folders_are_created_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "new" / "deeper" / "labels.jsonl"
    with caplog.at_level(logging.WARNING, logger="qwen_tasks.review.export"):
        n = write_jsonl(iter([{"audio": "/a.wav", "label": "yes"}]), out)
    assert n == 1 and json.loads(out.read_text()) == {"audio": "/a.wav", "label": "yes"}
    assert [r.getMessage() for r in caplog.records] == [
        f"created folder {tmp_path / 'new'} for {out} (it did not exist)"
    ]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen_tasks.review.export"):
        write_jsonl(iter([]), out)  # the folder exists now: nothing to say
    assert caplog.records == [] and out.read_text() == ""


def test_failed_export_creates_no_folder(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "never" / "labels.jsonl"
    done = CliRunner().invoke(app, ["export", "--task", "cry", "--run", "999", "--out", str(out)])
    assert done.exit_code == 1
    assert "no labelling run with id 999" in str(done.exception or done.stderr)
    assert not (tmp_path / "never").exists()


def test_out_below_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        write_jsonl(iter([{"a": 1}]), tmp_path / "file" / "deeper" / "labels.jsonl")

"""Every command with `--json` that fails prints one JSON object `{"error": ...}` on stdout (a script reading
stdout always has an object to parse) and the same one line on stderr: real `qwen-tasks` processes with
the database gone, and a usage error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import typer
from labelling_helpers import CLI

from qwen_tasks.cli import app

GONE = "postgresql+psycopg2://nobody@127.0.0.1:1/none"  # port 1: nothing listens, connection refused


def _json_commands() -> set[str]:
    """The command paths (`models`, `review-import`, ...) that take --json, read from the app itself."""
    found = set()

    def walk(command: object, path: tuple[str, ...]) -> None:
        if any(p.name == "as_json" for p in getattr(command, "params", [])):
            found.add(" ".join(path))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


@pytest.mark.slow  # sixteen processes
def test_every_json_command_reports_a_failure_as_one_json_object(tmp_path: Path) -> None:
    (tmp_path / "tasks.json").write_text("[]")
    args = {
        "ingest": [str(tmp_path)],
        "datasets": [],
        "label": ["--task", "cry"],
        "work": ["--run", "1"],
        "runs": [],
        "metrics": [],
        "review-export": ["--task", "cry", "--out", str(tmp_path / "review.json")],
        "review queue": ["--task", "cry", "--strategy", "uncertainty"],
        "review-import": [str(tmp_path / "tasks.json")],
        "review push": ["--task", "cry"],
        "review pull": [],
        "export-finetune": ["--task", "cry", "--out", str(tmp_path / "train.jsonl")],
        "finetune": ["--task", "cry"],
        "models": [],
        "calibrate": ["--task", "cry"],
    }
    assert set(args) == _json_commands()  # a new --json command belongs here
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": GONE}
    running = {
        name: subprocess.Popen(
            [*CLI, *name.split(), *extra, "--json"],
            env=env,
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name, extra in args.items()
    }
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot connect to nobody@127.0.0.1:1"), (
            name,
            stderr,
        )
        assert json.loads(stdout) == {"error": lines[0].removeprefix("error: ")}, name


def test_a_usage_error_with_json_is_one_json_object_too(tmp_path: Path) -> None:
    bad = subprocess.run(
        [*CLI, "label", "--task", "cry", "--batch-size", "many", "--json"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2
    message = (
        "Invalid value for '--batch-size': Input should be a valid integer, unable to parse string as an "
    )
    message += "integer"
    assert json.loads(bad.stdout) == {"error": message}
    assert bad.stderr.strip() == f"error: {message}"

    plain = subprocess.run(  # without --json, stdout stays empty (Click's usage message on stderr)
        [*CLI, "label", "--task", "cry", "--batch-size", "many"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 2 and plain.stdout == "" and "--batch-size" in plain.stderr

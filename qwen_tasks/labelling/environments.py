"""Which Python environment labels which model, and how a worker runs in the other one.

The original Qwen-Audio's remote code loads only under transformers 4.x, so its runs are labelled by a
second environment, `.venv-qwen-audio` (`make install-qwen-audio`, `requirements-qwen-audio.lock`);
everything else by the main one (transformers 5). This module names that environment's interpreter
(`QWEN_TASKS_QWEN_AUDIO_PYTHON`, else `.venv-qwen-audio/bin/python` in the checkout), the worker
command to run there, and runs it for `qwen-tasks label` (`run_worker`). The DAG reads `interpreter()`
at parse time, so this module imports nothing heavy (no torch, transformers or numpy, no backend).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_ENV_VAR = "QWEN_TASKS_QWEN_AUDIO_PYTHON"  # the interpreter of the Qwen-Audio environment
VENV_DIR = ".venv-qwen-audio"  # where `make install-qwen-audio` creates it, in the project checkout
INSTALL_COMMAND = "make install-qwen-audio"
# transformers versions the remote code was verified with: 4.37.2 (what the issue found working) to
# 4.53.3 (pinned in requirements-qwen-audio.lock; 4.54.1 fails inside generate, 4.57.6 no longer exports
# what transformers-stream-generator imports, 5.x has no get_head_mask). The tiny checkpoint gave the
# same transcripts, answers and p_yes with 4.37.2, 4.49.0, 4.50.3, 4.52.4 and 4.53.3.
TRANSFORMERS_SPEC = ">=4.37,<4.54"


def transformers_version() -> str:
    """The installed transformers version, read without importing transformers (which is slow)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def runs_here() -> bool:
    """True when this interpreter's transformers can load the Qwen-Audio remote code."""
    return _version_in(transformers_version(), TRANSFORMERS_SPEC)


def _version_in(version: str, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec)
    except InvalidVersion:
        return False


def interpreter() -> Path:
    """The Python of the Qwen-Audio environment: `QWEN_TASKS_QWEN_AUDIO_PYTHON`, else
    `.venv-qwen-audio/bin/python` in the project checkout this package runs from (an editable install),
    else in the current directory. The path may not exist yet (`make install-qwen-audio` creates it)."""
    configured = os.environ.get(PYTHON_ENV_VAR, "").strip()
    if configured:
        return Path(configured).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    root = checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()
    return root / VENV_DIR / "bin" / "python"


def worker_command(run_id: int | str, python: Path | None = None) -> list[str]:
    """The command that works run `run_id` in the Qwen-Audio environment: its `qwen-tasks` script when
    it sits next to the interpreter (a virtualenv), else `python -m qwen_tasks`."""
    python = python or interpreter()
    script = python.parent / "qwen-tasks"
    head = [str(script)] if script.is_file() else [str(python), "-m", "qwen_tasks"]
    return [*head, "work", "--run", str(run_id)]


def shown(command: Sequence[str]) -> str:
    """A command as a user would type it: paths under the current directory made relative."""

    def one(part: str) -> str:
        try:
            return str(Path(part).relative_to(Path.cwd()))
        except ValueError:
            return part

    return " ".join(one(part) for part in command)


def how_to_create(python: Path) -> str:
    """What to do when the environment is missing: one clause of a one-line error."""
    return (
        f"there is no Qwen-Audio environment at {shown([str(python)])}: create it with `{INSTALL_COMMAND}` "
        f"(or set {PYTHON_ENV_VAR} to its python)"
    )


# --- running a worker there ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerExit:
    """How a worker in the other environment ended: its exit status as a shell reports it (143 after
    SIGTERM, 130 after Ctrl-C) and its `work --json` summary (None when it printed none)."""

    returncode: int
    summary: dict[str, Any] | None


def run_worker(
    run_id: int,
    *,
    args: Sequence[str] = (),
    python: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> WorkerExit:
    """Run `qwen-tasks work --run RUN_ID ARGS --json` in the Qwen-Audio environment and wait for it.

    Its progress bar and messages go straight to this process's stderr; its stdout is read for the JSON
    summary (any other line it prints there is passed on to stderr). It runs in a process group of its
    own, and SIGTERM / SIGINT sent to this process are forwarded to it, so a Ctrl-C in a terminal reaches
    it once and `kill` of this process gives its job back like a `work --run` of its own (exit 143)."""
    command = [*worker_command(run_id, python), *args, "--json"]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        process_group=0,
    )

    def forward(signum: int, frame: Any) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        out, _ = child.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = None
    for line in out.splitlines():
        parsed = _json_object(line)
        if parsed is not None:
            summary = parsed
        elif line.strip():
            print(line, file=sys.stderr)
    code = child.returncode
    return WorkerExit(128 - code if code < 0 else code, summary)


def _json_object(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None

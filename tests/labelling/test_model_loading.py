"""Broken checkpoints and bad output folders give one line naming the file and the reason (issue 14, item 4).

Real files: the tiny model built with save_pretrained, then damaged the ways downloads and disks damage
them; loaded through the real backend and the real CLI.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from labelling_helpers import run_cli
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from qwen_tasks.cli import app
from qwen_tasks.errors import ModelError
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling.backends import load_backend


def _truncate(weights: Path) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download


def _garbage(weights: Path) -> None:
    weights.write_bytes(b"<html>rate limited</html>" * 100)  # an error page saved as the weights


def _bad_header(weights: Path) -> None:
    data = weights.read_bytes()
    assert struct.unpack("<Q", data[:8])[0] > 2 and data[8:9] == b"{"
    weights.write_bytes(data[:9] + b"X" + data[10:])  # one flipped byte in the JSON header


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "incomplete metadata, file not fully covered"),
        (_garbage, "header too large"),
        (_bad_header, "invalid JSON in header"),
    ],
)
def test_corrupt_weights_are_one_model_error_naming_the_file(
    tiny_model_dir: Path, tmp_path: Path, damage, reason: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model / "model.safetensors")

    with pytest.raises(ModelError) as info:
        load_backend(str(model), device="cpu")

    message = str(info.value)
    weights = model / "model.safetensors"
    assert message.startswith(
        f"cannot load Qwen2-Audio model {str(model)!r}: {weights}: corrupt or truncated"
    )
    assert reason in message and "\n" not in message


@pytest.mark.slow
def test_label_with_corrupt_weights_prints_one_line(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    _truncate(model / "model.safetensors")
    sf.write(tmp_path / "a.wav", np.full(8000, 0.1, dtype=np.float32), 16000)
    ingest(engine, [tmp_path / "a.wav"])

    done = run_cli(["label", "--task", "cry", "--model", str(model), "--device", "cpu"], database_url)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot load Qwen2-Audio model {str(model)!r}: {model / 'model.safetensors'}: corrupt or "
        "truncated weights (Error while deserializing header: incomplete metadata, file not fully covered)"
    ], done.stderr


def test_make_tiny_model_onto_a_file_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")

    onto = CliRunner().invoke(app, ["make-tiny-model", str(target)])

    assert onto.exit_code == 1
    assert (
        onto.stderr.strip()
        == f"error: {target}: exists and is not a directory; give a new or empty directory"
    )
    assert target.read_text() == "not a folder"

    below = CliRunner().invoke(app, ["make-tiny-model", str(target / "sub")])
    assert below.exit_code == 1
    assert below.stderr.strip() == f"error: {target / 'sub'}: cannot create the directory: Not a directory"


@pytest.mark.model  # ends by building one into an empty folder
def test_make_tiny_model_into_a_non_empty_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")

    into = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path)])

    assert into.exit_code == 1
    assert into.stderr.strip() == f"error: {tmp_path}: directory is not empty; give a new or empty directory"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]  # nothing written beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(app, ["make-tiny-model", str(empty)]).exit_code == 0  # empty is fine

"""Labelling reads a file only while it is still what ingest admitted (issue 14, item 6).

Real files, the real ingest and database; the end-to-end case runs the real `qwen-tasks label` CLI on the
tiny model. The attack: after ingest, a file is replaced by a symlink of the same size (and, to leave
only the roots check to catch it, the same mtime) to a file outside the allowed roots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa
from labelling_helpers import run_cli
from sqlalchemy.engine import Engine

from qwen_tasks.errors import AudioError
from qwen_tasks.ingest.audio_files import load_ingested
from qwen_tasks.ingest.register import ingest
from qwen_tasks.records import RecordedPath
from qwen_tasks.store import schema


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_ROOTS", raising=False)


def clip(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000, subtype="PCM_16")
    return path


def recorded(engine: Engine, path: Path) -> RecordedPath:
    """What ingest stored for `path`, as labelling receives it (jobs.job_items)."""
    t = schema.audio_file
    with engine.connect() as conn:
        r = conn.execute(sa.select(t).where(t.c.path == str(path))).one()
    raw = bytes(r.path_bytes) if r.path_bytes is not None else None
    return RecordedPath(r.path, r.size_bytes, r.mtime_ns, r.root, raw)


def swap_for_outside_link(path: Path, outside: Path) -> None:
    """Replace `path` by a symlink to `outside`: same size, and the target given the recorded mtime."""
    st = path.stat()
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.write_bytes(path.read_bytes()[:44] + os.urandom(st.st_size - 44))  # other audio, same size
    os.utime(outside, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.unlink()
    path.symlink_to(outside)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def reason(recorded_path: RecordedPath) -> str:
    with pytest.raises(AudioError) as info:
        load_ingested(recorded_path)
    return info.value.reason


def test_replaced_or_touched_files_are_refused_and_the_rest_loads(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "audio"
    swapped, touched, linked, intact = (clip(root / f"{n}.wav", i) for i, n in enumerate("abcd"))
    store = clip(root / "store" / "c-copy.wav", 9)
    assert ingest(engine, [root]).new == 5
    before = {p: recorded(engine, p) for p in (swapped, touched, linked, intact)}
    assert before[swapped].root == str(root.resolve())

    swap_for_outside_link(swapped, tmp_path / "outside" / "secret.wav")
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
    st = linked.stat()
    linked.unlink()  # a link to a file inside the root, same size and mtime: allowed
    os.utime(store, ns=(st.st_atime_ns, st.st_mtime_ns))
    linked.symlink_to(store)

    outside = str((tmp_path / "outside" / "secret.wav").resolve())
    assert reason(before[swapped]) == (
        f"now resolves to {outside}, outside its allowed root {root.resolve()}; not read"
    )
    assert reason(before[touched]) == "changed since ingest (modification time differs); re-run ingest"
    assert load_ingested(before[linked]).shape == (8000,)
    assert load_ingested(before[intact]).shape == (8000,)

    # rows from before migration 0006 (no root recorded) are held to their own folder's real location
    assert reason(before[swapped]._replace(root=None)).startswith(
        f"now resolves to {outside}, outside its folder"
    )
    # QWEN_TASKS_ALLOWED_ROOTS set at label time narrows the roots, it never widens them
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", str(tmp_path / "elsewhere"))
    assert "outside QWEN_TASKS_ALLOWED_ROOTS" in reason(before[intact])
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", str(tmp_path))
    assert "outside its allowed root" in reason(before[swapped])

    with pytest.raises(FileNotFoundError):  # gone: the runner tells a deleted file from lost storage
        intact.unlink()
        load_ingested(before[intact])


def test_a_re_ingest_records_roots_for_rows_that_have_none(engine: Engine, tmp_path: Path) -> None:
    a = clip(tmp_path / "a.wav", 1)
    ingest(engine, [tmp_path])
    with engine.begin() as conn:  # as migrated from before 0006
        conn.execute(sa.update(schema.audio_file).values(root=None))
    again = ingest(engine, [tmp_path])
    assert again.unchanged == 1
    assert recorded(engine, a).root == str(tmp_path.resolve())


@pytest.mark.slow
def test_label_refuses_a_file_swapped_after_ingest(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    tiny = tiny_model_dir
    root = tmp_path / "audio"
    swapped, kept = clip(root / "a.wav", 1), clip(root / "b.wav", 2)
    assert ingest(engine, [root]).new == 2
    swap_for_outside_link(swapped, tmp_path / "outside" / "secret.wav")

    done = run_cli(
        ["label", "--task", "cry", "--model", str(tiny), "--device", "cpu", "--json"], database_url
    )

    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["labelled"], out["failed"]) == (1, 1)
    with engine.connect() as conn:
        (error,) = conn.execute(sa.select(schema.label_failure.c.error)).scalars().all()
        labelled = conn.execute(sa.select(schema.cry_answer.c.audio_id)).scalars().all()
    assert error.startswith(f"{swapped}: now resolves to {(tmp_path / 'outside' / 'secret.wav').resolve()}")
    assert "outside its allowed root" in error
    assert labelled == [_audio_id(engine, kept)]


def _audio_id(engine: Engine, path: Path) -> int:
    with engine.connect() as conn:
        t = schema.audio_file
        return conn.execute(sa.select(t.c.audio_id).where(t.c.path == str(path))).scalar_one()

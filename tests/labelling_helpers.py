"""Helpers shared by the labelling tests (jobs, worker, label CLI): real files, real ingest.

Not a test module: imported by tests/labelling/test_jobs.py, test_worker_results.py,
test_worker_loop.py, test_worker_processes.py, test_label_cli.py and others (the audio shapes of
test_features.py and test_qwen_audio.py also by tests/qwen_audio_features.py in the Qwen-Audio
environment); `writes_blocked` and `blocked_pids` also by tests/orchestration/test_airflow_stack.py (this
file is on the pytest path, a test module is not unless its folder is collected).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.ingest.register import ingest
from qwen_tasks.store import schema

CLI = [sys.executable, "-m", "qwen_tasks"]


def real_shaped(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A synthetic clip made at `rate` (stereo for odd seeds, as files are) and brought to 16 kHz mono
    the way the worker reads files (channel mean, soxr HQ)."""
    import soxr

    from qwen_tasks.dev.samples import synth_clip

    wave = synth_clip(seconds, rate, seed, channels=1 + seed % 2, cry=seed % 3 == 0).mean(axis=1)
    return soxr.resample(wave, rate, 16000, quality="HQ").astype(np.float32)


def random_audio(seconds: float, seed: int) -> np.ndarray:
    """Gaussian noise at 16 kHz (std 0.3), deterministic per seed."""
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


def write_clips(folder: Path, durations: Sequence[float], *, rate: int = 16000, seed: int = 0) -> list[Path]:
    """One mono wav per duration (noise plus a tone, so every file has different bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, seconds in enumerate(durations):
        t = np.arange(int(seconds * rate)) / rate
        signal = 0.2 * np.sin(2 * np.pi * (200 + 37 * i) * t) + 0.02 * rng.standard_normal(len(t))
        path = folder / f"clip_{i:03d}.wav"
        sf.write(path, signal.astype(np.float32), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def ingest_clips(engine: Engine, folder: Path, durations: Sequence[float], seed: int = 0) -> dict[Path, int]:
    """Write clips and ingest them with the real ingest; returns path -> audio id."""
    paths = write_clips(folder, durations, seed=seed)
    summary = ingest(engine, [folder])
    if summary.new != len(paths):
        raise RuntimeError(f"ingest registered {summary.new} of {len(paths)} clips: {summary.to_dict()}")
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.audio_file.c.path, schema.audio_file.c.audio_id)).all()
    by_path = {os.path.realpath(r.path): r.audio_id for r in rows}
    return {p: by_path[os.path.realpath(p)] for p in paths}


def run_cli(
    args: Sequence[str], url: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """`qwen-tasks ARGS` in a real subprocess against the test database."""
    environment = {**os.environ, "QWEN_TASKS_DATABASE_URL": url, **env}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=environment, timeout=timeout, check=False
    )


def count(engine: Engine, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


BLOCKED = sa.text(
    "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE NOT l.granted AND l.relation = CAST('cry_answer' AS regclass) AND a.datname = current_database()"
)


def blocked_pids(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(BLOCKED).scalars())


@contextmanager
def writes_blocked(engine: Engine) -> Iterator[Connection]:
    """Hold a lock that makes every worker's result transaction wait (inserts into cry_answer)."""
    with engine.connect() as conn:
        tx = conn.begin()
        conn.execute(sa.text("LOCK TABLE cry_answer IN SHARE MODE"))
        try:
            yield conn
        finally:
            tx.rollback()


def plan_on(engine: Engine, backend: Any, request: Any, **kw: object) -> Any:
    """`jobs.plan_run` for `request` with a loaded backend's model (batches of 4 clips / 60 s unless
    `kw` says otherwise); returns the PlanResult."""
    from qwen_tasks.labelling import jobs
    from qwen_tasks.labelling.backends import model_info

    args: dict[str, Any] = {"batch_size": 4, "max_batch_seconds": 60.0, **kw}
    return jobs.plan_run(
        engine,
        jobs.RunRequest(task=request.task, model_info=model_info(backend, request), request=request, **args),
    )


def work_on(engine: Engine, run_id: int, backend: Any, **kw: Any) -> Any:
    """The worker loop on one run with a loaded backend, a 30 s lease (`kw`: more WorkerOptions)."""
    from qwen_tasks.labelling import worker

    options = worker.WorkerOptions(**{"lease_seconds": 30, **kw})
    return worker.work(engine, run_id, options, backend_factory=lambda run: backend)

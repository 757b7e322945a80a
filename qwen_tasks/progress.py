"""Progress lines in logs: what a rich progress bar shows on a terminal, for everything that is not one.

A rich bar only renders on a TTY: `qwen-tasks finetune ... > log 2>&1` printed one line in 19 minutes,
and an Airflow task log had no clips/s, RTF or time left. `ProgressLog` logs one line through the
logging module (Airflow captures it into the task log; the CLI sends it to stderr with
`log_to_stderr`) at least every `interval` seconds while the work runs, from a timer thread, so a long
job or a slow model load shows up too, and a last line when it ends:

    label asr run 12: 96/480 clips (20%), 3.20 clips/s, RTF 0.061, elapsed 30 s, ETA 2 min
    training: 40/200 steps (20%), 0.53 steps/s, elapsed 75 s, ETA 5 min, epoch 1, loss 0.4213, 4.2 clips/s

The interval is `QWEN_TASKS_PROGRESS_SECONDS` (default 30; tests lower it).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from qwen_tasks.errors import ConfigError

log = logging.getLogger(__name__)
INTERVAL_VAR = "QWEN_TASKS_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress_interval() -> float:
    """Seconds between progress lines: QWEN_TASKS_PROGRESS_SECONDS, default 30."""
    raw = os.environ.get(INTERVAL_VAR, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{INTERVAL_VAR} must be a number of seconds > 0 (got {raw!r})")
    return value


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLog:
    """Done of total units, rate, real-time factor (with audio seconds), elapsed, ETA, plus any other
    figures (`update(..., loss="0.42")`), logged every `interval` seconds and once at the end. Use it
    as a context manager; `update` is safe to call from the working thread while the timer logs."""

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        unit: str = "clips",
        interval: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.interval = progress_interval() if interval is None else interval
        self.logger = logger or log
        self.done = 0
        self.audio_seconds = 0.0
        self.figures: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, done: int | None = None, *, advance: int = 0, audio_seconds: float = 0.0,
               **figures: Any) -> None:  # fmt: skip
        """Set `done` (or `advance` it), add processed audio seconds, replace the extra figures."""
        with self._lock:
            self.done = (self.done if done is None else done) + advance
            self.audio_seconds += audio_seconds
            self.figures.update(figures)

    def line(self) -> str:
        with self._lock:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            done, total, audio = self.done, self.total, self.audio_seconds
            figures = dict(self.figures)
        rate = done / elapsed
        parts = [f"{done}/{total} {self.unit}" if total is not None else f"{done} {self.unit}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        if audio > 0:
            parts.append(f"RTF {elapsed / audio:.3f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total is not None and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}" if done else "ETA unknown")
        parts += [f"{k.replace('_', ' ')} {v}" for k, v in figures.items()]
        return f"{self.what}: {', '.join(parts)}"

    def emit(self) -> None:
        self.logger.info("%s", self.line())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit()

    def __enter__(self) -> ProgressLog:
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=f"progress {self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.emit()


def log_to_stderr() -> None:
    """The CLI without a terminal: send the progress lines (this module's logger) to stderr, once."""
    if not any(getattr(h, "_qwen_progress", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._qwen_progress = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)

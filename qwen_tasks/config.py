"""Settings from environment variables, read once per process.

Everything has a default so that `qwen-tasks` works on a laptop with no configuration; the DAG and
the CLI read the same variables, so a label made by either is traceable to the same settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _env_paths(name: str) -> tuple[Path, ...]:
    raw = os.environ.get(name, "")
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration. See README "Configuration" for each variable."""

    database_url: str | None = None
    home: Path = field(default_factory=lambda: Path.cwd() / ".qwen_tasks")
    allowed_roots: tuple[Path, ...] = ()
    model: str = DEFAULT_MODEL
    model_revision: str = ""
    device: str = "auto"
    batch_size: int = 16
    max_batch_seconds: float = 240.0

    @property
    def embedded_pgdata(self) -> Path:
        return self.home / "pgdata"

    @classmethod
    def from_env(cls) -> Settings:
        home = os.environ.get("QWEN_TASKS_HOME")
        return cls(
            database_url=os.environ.get("QWEN_TASKS_DATABASE_URL") or None,
            home=Path(home).expanduser().resolve() if home else Path.cwd().resolve() / ".qwen_tasks",
            allowed_roots=_env_paths("QWEN_TASKS_ALLOWED_ROOTS"),
            model=os.environ.get("QWEN_TASKS_MODEL") or DEFAULT_MODEL,
            model_revision=os.environ.get("QWEN_TASKS_MODEL_REVISION", ""),
            device=os.environ.get("QWEN_TASKS_DEVICE") or "auto",
            batch_size=_env_int("QWEN_TASKS_BATCH_SIZE", 16),
            max_batch_seconds=_env_float("QWEN_TASKS_MAX_BATCH_SECONDS", 240.0),
        )


def get_settings() -> Settings:
    """Fresh settings from the environment (cheap; tests change the environment between calls)."""
    return Settings.from_env()

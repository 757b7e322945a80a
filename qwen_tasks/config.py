"""Settings from environment variables, read once per process.

Everything has a default so that `qwen-tasks` works on a laptop with no configuration; the DAG and
the CLI read the same variables, so a label made by either is traceable to the same settings.

A bad value (`QWEN_TASKS_BATCH_SIZE=abc`) is a ConfigError naming the variable: one line in every
command. The DAG file parses with `strict=False` (the bad value is replaced by its default and noted in
`errors`), so a typo never becomes a DAG import error; its tasks read the settings strictly and fail
with that same one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from qwen_tasks.errors import ConfigError
from qwen_tasks.records import is_url, normal_url, redact_url, url_problem

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
DEFAULT_OBJECT_CACHE_BYTES = 2 * 1024**3  # QWEN_TASKS_OBJECT_CACHE_BYTES
T = TypeVar("T")


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a number > 0, got {raw!r}")
    return value


class Device(StrEnum):
    """Where a model runs; `auto` is CUDA when a GPU is visible. Declared here, beside QWEN_TASKS_DEVICE,
    so the variable, `--device` and the DAG's `device` Param accept the same words."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def _env_device(name: str) -> str:
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return Device.AUTO.value
    if raw not in set(Device):
        choices = ", ".join(d.value for d in Device)
        raise ConfigError(f"{name} must be one of {choices}, got {raw!r}")
    return raw


# Words that turn a schedule off (an empty value does too): the DAG then runs on its other triggers only.
SCHEDULE_OFF = ("off", "none", "never")


def _env_schedule(name: str, default: str) -> str | None:
    """A DAG's cron schedule from `name`: unset means `default`; empty or `off` means no schedule (None).
    Checked here with croniter (Airflow's own cron parser, there wherever Airflow is), so a typo is one
    line naming the variable instead of a DAG import error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip()
    if not value or value.lower() in SCHEDULE_OFF:
        return None
    try:
        from croniter import croniter
    except ImportError:  # no Airflow here: nothing reads the schedule
        return value
    if not croniter.is_valid(value):
        raise ConfigError(f"{name} must be a cron expression such as '*/15 * * * *', or 'off'; got {raw!r}")
    return value


# `:` separates entries, except the one of a URL's `scheme://` (QWEN_TASKS_ALLOWED_ROOTS=/data:s3://b/audio).
_PATH_SEPARATOR = re.compile(r":(?!//)")


def split_paths(raw: str) -> list[str]:
    """A `:`-separated list of paths and URLs (`/data:s3://bucket/audio`), blanks dropped."""
    return [p.strip() for p in _PATH_SEPARATOR.split(raw) if p.strip()]


def _env_roots(name: str) -> tuple[str, ...]:
    """QWEN_TASKS_ALLOWED_ROOTS: `:`-separated local folders (resolved: compared by where they really are)
    and object-storage URL prefixes (`s3://bucket/prefix`, compared by whole path segments). A URL with
    credentials or `..` segments is refused here, naming the variable (credentials redacted)."""
    raw = os.environ.get(name, "")
    if re.search(r"://[^/]*@", raw):  # before splitting: `user:secret@` holds a `:` of its own
        raise ConfigError(f"{name}: {url_problem('s3://user@bucket')}")
    out: list[str] = []
    for entry in split_paths(raw):
        if is_url(entry):
            problem = url_problem(entry)
            if problem:
                raise ConfigError(f"{name}: {redact_url(entry)!r}: {problem}")
            out.append(normal_url(entry))
        else:
            out.append(str(Path(entry).expanduser().resolve()))
    return tuple(out)


def _env_bytes(name: str, default: int) -> int:
    """A byte count: an integer, optionally with a K/M/G/T suffix (powers of 1024); 0 is allowed."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", raw, re.IGNORECASE)
    if m is None:
        raise ConfigError(f"{name} must be a byte count such as 2000000000 or 2G, got {raw!r}")
    return int(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_")


# An allowlist entry that is not a local folder: a hub id `owner/name`, or a prefix `owner/` (every model
# of that owner). No `..`, no leading `/`: those would be paths, which must be absolute folders.
_HUB_ENTRY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/(?:[A-Za-z0-9_.-]+)?")


def _env_models(name: str) -> tuple[str, ...]:
    """QWEN_TASKS_ALLOWED_MODELS: `:`-separated absolute folders (resolved, symlinks too, so a model is
    compared by where it really is) and hub ids / `owner/` prefixes. Anything else is refused here, so a
    typo cannot silently allow nothing or, worse, something else."""
    out: list[str] = []
    for entry in (e.strip() for e in os.environ.get(name, "").split(os.pathsep)):
        if not entry:
            continue
        if entry.startswith(("/", "~")):
            out.append(os.path.realpath(os.path.expanduser(entry)))
        elif _HUB_ENTRY.fullmatch(entry) and ".." not in entry:
            out.append(entry)
        else:
            raise ConfigError(
                f"{name}: {entry!r} is neither an absolute folder nor a hub id (owner/name) or prefix "
                "(owner/)"
            )
    return tuple(dict.fromkeys(out))


def _var(default: Any, name: str) -> Any:
    """A setting's default and the variable that overrides it (one declaration: `Settings.env_var`)."""
    return field(default=default, metadata={"env": name})


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration. See README "Configuration" for each variable.

    A field declared with `_var` is the default of an option (`options_spec.Spec.setting`): its value and
    its variable are declared here once, and options, help texts and DAG forms read them from here."""

    database_url: str | None = None
    home: Path = field(default_factory=lambda: Path.cwd() / ".qwen_tasks")
    # local folders (real paths) and URL prefixes (s3://bucket/prefix) that audio and manifests must lie under
    allowed_roots: tuple[str, ...] = ()
    # models / adapters / fine-tune bases that may be loaded (empty: any; see labelling.allowed_models)
    allowed_models: tuple[str, ...] = ()
    model: str = _var(DEFAULT_MODEL, "QWEN_TASKS_MODEL")
    model_revision: str = _var("", "QWEN_TASKS_MODEL_REVISION")
    device: str = _var(Device.AUTO.value, "QWEN_TASKS_DEVICE")
    batch_size: int = _var(16, "QWEN_TASKS_BATCH_SIZE")
    max_batch_seconds: float = _var(240.0, "QWEN_TASKS_MAX_BATCH_SECONDS")
    # the `gpu` pool's size: how many labelling workers the DAG fans out to
    gpu_slots: int = _var(1, "QWEN_TASKS_GPU_POOL_SLOTS")
    # a dead worker's job is taken over after this long
    lease_seconds: float = _var(120.0, "QWEN_TASKS_LEASE_SECONDS")
    # how often the labelling DAG's deferred wait for an external worker fleet looks at the runs
    wait_poll_seconds: float = _var(30.0, "QWEN_TASKS_WAIT_POLL_SECONDS")
    # what the nightly run ingests: folders / URL prefixes, and manifests (`:`-separated lists)
    audio_dirs: tuple[str, ...] = _var((), "QWEN_TASKS_AUDIO_DIRS")
    asr_manifests: tuple[str, ...] = _var((), "QWEN_TASKS_ASR_MANIFESTS")
    aqa_manifests: tuple[str, ...] = _var((), "QWEN_TASKS_AQA_MANIFESTS")
    # workers' local copies of object-storage audio, by content (ingest.sources.ObjectCache): LRU, bounded
    object_cache_bytes: int = DEFAULT_OBJECT_CACHE_BYTES
    object_cache_dir: Path | None = None  # None: <home>/object-cache
    # cron of the labelling DAG (None: it runs on asset events and manual triggers only)
    schedule: str | None = "0 2 * * *"
    # cron of the ingest DAG (None: off, no new-audio events); listing only, so it can run often
    ingest_schedule: str | None = "*/15 * * * *"
    # reviewed (human) labels newer than a task's promoted version that start an automatic fine-tune
    finetune_min_new_reviewed: int = 200
    # Airflow's REST API, for asset events posted from outside Airflow (`models promote`, `review-import`);
    # its credentials are read where they are used (orchestration.airflow_api), never kept here
    airflow_url: str = ""
    errors: tuple[str, ...] = ()  # bad values replaced by defaults (only with strict=False)

    @classmethod
    def env_var(cls, name: str) -> str:
        """The variable that sets field `name` (declared with `_var`)."""
        return next(f for f in fields(cls) if f.name == name).metadata["env"]

    @property
    def embedded_pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def object_cache(self) -> Path:
        return self.object_cache_dir or self.home / "object-cache"

    @classmethod
    def from_env(cls, *, strict: bool = True) -> Settings:
        """Read the environment; a bad value raises ConfigError naming the variable (strict), or is
        replaced by its default and reported in `errors` (strict=False: DAG parse time)."""
        errors: list[str] = []

        def read(fn: Callable[[], T], default: T) -> T:
            try:
                return fn()
            except ConfigError as exc:
                if strict:
                    raise
                errors.append(str(exc))
                return default

        home = os.environ.get("QWEN_TASKS_HOME")
        var = cls.env_var
        return cls(
            database_url=os.environ.get("QWEN_TASKS_DATABASE_URL") or None,
            home=Path(home).expanduser().resolve() if home else Path.cwd().resolve() / ".qwen_tasks",
            allowed_roots=read(lambda: _env_roots("QWEN_TASKS_ALLOWED_ROOTS"), ()),
            allowed_models=read(lambda: _env_models("QWEN_TASKS_ALLOWED_MODELS"), ()),
            model=os.environ.get(var("model")) or cls.model,
            model_revision=os.environ.get(var("model_revision"), cls.model_revision).strip(),
            device=read(lambda: _env_device(var("device")), cls.device),
            batch_size=read(lambda: _env_int(var("batch_size"), cls.batch_size), cls.batch_size),
            max_batch_seconds=read(
                lambda: _env_float(var("max_batch_seconds"), cls.max_batch_seconds), cls.max_batch_seconds
            ),
            gpu_slots=read(lambda: _env_int(var("gpu_slots"), cls.gpu_slots), cls.gpu_slots),
            lease_seconds=read(
                lambda: _env_float(var("lease_seconds"), cls.lease_seconds), cls.lease_seconds
            ),
            wait_poll_seconds=read(
                lambda: _env_float(var("wait_poll_seconds"), cls.wait_poll_seconds), cls.wait_poll_seconds
            ),
            audio_dirs=tuple(split_paths(os.environ.get(var("audio_dirs"), ""))),
            asr_manifests=tuple(split_paths(os.environ.get(var("asr_manifests"), ""))),
            aqa_manifests=tuple(split_paths(os.environ.get(var("aqa_manifests"), ""))),
            object_cache_bytes=read(
                lambda: _env_bytes("QWEN_TASKS_OBJECT_CACHE_BYTES", DEFAULT_OBJECT_CACHE_BYTES),
                DEFAULT_OBJECT_CACHE_BYTES,
            ),
            object_cache_dir=Path(cache).expanduser().resolve()
            if (cache := os.environ.get("QWEN_TASKS_OBJECT_CACHE_DIR", "").strip())
            else None,
            schedule=read(lambda: _env_schedule("QWEN_TASKS_SCHEDULE", cls.schedule or ""), cls.schedule),
            ingest_schedule=read(
                lambda: _env_schedule("QWEN_TASKS_INGEST_SCHEDULE", cls.ingest_schedule or ""),
                cls.ingest_schedule,
            ),
            finetune_min_new_reviewed=read(
                lambda: _env_int("QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED", cls.finetune_min_new_reviewed),
                cls.finetune_min_new_reviewed,
            ),
            airflow_url=(os.environ.get("QWEN_TASKS_AIRFLOW_URL") or "").strip().rstrip("/"),
            errors=tuple(errors),
        )


def get_settings() -> Settings:
    """Fresh settings from the environment (cheap; tests change the environment between calls)."""
    return Settings.from_env()

"""The outside services a few tests need (Redis; Chromium with the playwright package; Label Studio in its
own venv), in one place.

On a developer's machine a missing service skips the tests that need it, with one line saying what to
install, so `make test` passes on a fresh machine. CI (`.ci/run`) provides every one of them and sets
QWEN_TASKS_REQUIRE_SERVICES=1, under which that same skip is a failure: a CI image that lost Redis or
Chromium cannot quietly stop running the tests that need them. Every such test goes through `require`.
PostgreSQL is not here: without a server the tests use the embedded one (tests/conftest.py).

The original Qwen-Audio's tests need what CI cannot have (a copy of its GitHub code, QWEN_AUDIO_CODE_DIR)
and the `.venv-qwen-audio` environment, so they skip without them, also in CI; their own variable,
QWEN_TASKS_REQUIRE_QWEN_AUDIO=1 (set by `make test-qwen-audio`), makes those skips failures, so a run
meant to cover them cannot pass having run none (`require_qwen_audio_code`, `require_qwen_audio_python`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

REQUIRE_SERVICES = "QWEN_TASKS_REQUIRE_SERVICES"
REQUIRE_QWEN_AUDIO = "QWEN_TASKS_REQUIRE_QWEN_AUDIO"
QWEN_AUDIO_CODE_DIR = "QWEN_AUDIO_CODE_DIR"  # a copy of https://github.com/QwenLM/Qwen-Audio (docs/models.md)
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright cannot download browsers on CI
# `make install-label-studio`: its pins clash with ours (tests/label_studio_server.py starts it)
LABEL_STUDIO = Path(__file__).resolve().parents[1] / ".venv-label-studio" / "bin" / "label-studio"


def require(available: bool, missing: str, *, required_by: str = REQUIRE_SERVICES) -> None:
    """Skip the calling test with `missing` (what to install) unless `available`; with `required_by`=1
    (QWEN_TASKS_REQUIRE_SERVICES: set by .ci/run) fail it instead."""
    if available:
        return
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{missing} ({required_by}=1: this run must not skip it)", pytrace=False)
    pytest.skip(missing)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_redis() -> None:
    """Redis at the address the local Airflow stack uses as its Celery broker."""
    from qwen_tasks.dev.airflow_stack import REDIS_URL

    where = urlsplit(REDIS_URL)
    host, port = where.hostname or "127.0.0.1", where.port or 6379
    require(
        port_open(host, port),
        f"needs Redis at {host}:{port} (apt-get install redis-server, then: redis-server --daemonize yes)",
    )


def require_chromium() -> ModuleType:
    """Debian's Chromium and the playwright package; returns `playwright.sync_api`."""
    require(CHROMIUM.exists(), f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        require(False, "needs the playwright package (make install: it is in requirements.lock)")
        raise  # not reached: require skipped or failed
    return sync_api


def require_label_studio() -> Path:
    """The `label-studio` command of the checkout's .venv-label-studio; returns its path."""
    require(LABEL_STUDIO.exists(), f"needs Label Studio at {LABEL_STUDIO} (make install-label-studio)")
    return LABEL_STUDIO


def require_qwen_audio_code() -> Path:
    """QWEN_AUDIO_CODE_DIR, a copy of the original Qwen-Audio's GitHub repository; returns it."""
    code = os.environ.get(QWEN_AUDIO_CODE_DIR, "")
    require(
        bool(code) and (Path(code) / "modeling_qwen.py").is_file(),
        f"{QWEN_AUDIO_CODE_DIR} is {'not set' if not code else f'{code!r}, not a copy of it'}: a copy of "
        "QwenLM/Qwen-Audio is needed (docs/models.md, 'The tests CI skips')",
        required_by=REQUIRE_QWEN_AUDIO,
    )
    return Path(code)


def require_qwen_audio_python() -> Path:
    """The Qwen-Audio environment's interpreter (`make install-qwen-audio`); returns it."""
    from qwen_tasks.labelling import environments

    python = environments.interpreter()
    require(
        python.exists(),
        f"no Qwen-Audio environment at {python}: run `make install-qwen-audio`",
        required_by=REQUIRE_QWEN_AUDIO,
    )
    return python


def require_ffmpeg() -> None:
    """The ffmpeg CLI, which the Qwen-Audio remote code's own audio path (`process_audio`) runs."""
    import shutil

    from qwen_tasks.labelling.backends.qwen_audio import FFMPEG_HINT

    require(
        shutil.which("ffmpeg") is not None,
        f"ffmpeg not found on PATH: {FFMPEG_HINT}",
        required_by=REQUIRE_QWEN_AUDIO,
    )

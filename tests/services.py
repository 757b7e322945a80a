"""The outside services a few tests need (Redis; Chromium with the playwright package; Label Studio in its
own venv), in one place.

On a developer's machine a missing service skips the tests that need it, with one line saying what to
install, so `make test` passes on a fresh machine. CI (`.ci/run`) provides every one of them and sets
QWEN_TASKS_REQUIRE_SERVICES=1, under which that same skip is a failure: a CI image that lost Redis or
Chromium cannot quietly stop running the tests that need them. Every such test goes through `require`.
PostgreSQL is not here: without a server the tests use the embedded one (tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

REQUIRE_SERVICES = "QWEN_TASKS_REQUIRE_SERVICES"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright cannot download browsers on CI
# `make install-label-studio`: its pins clash with ours (tests/label_studio_server.py starts it)
LABEL_STUDIO = Path(__file__).resolve().parents[1] / ".venv-label-studio" / "bin" / "label-studio"


def require(available: bool, missing: str) -> None:
    """Skip the calling test with `missing` (what to install) unless `available`; with
    QWEN_TASKS_REQUIRE_SERVICES=1 (set by .ci/run) fail it instead."""
    if available:
        return
    if os.environ.get(REQUIRE_SERVICES) == "1":
        pytest.fail(f"{missing} ({REQUIRE_SERVICES}=1: CI must run this test)", pytrace=False)
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

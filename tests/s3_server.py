"""A real S3 server for the tests: moto's server mode on 127.0.0.1, a free port per test session.

Not a test module (it sits on the pytest path like `services.py`): tests/conftest.py turns it into the
session fixture `s3_server` and the per-test `s3_bucket`; any test module may use them. The server's own
request log (werkzeug's access log, written by the server process) is what `object_gets` counts, so a
test asserts on what the server saw, not on a counter of ours.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services import port_open

# The standard chain's variables: what a CLI user sets for MinIO/S3; the credentials are dummies.
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """`python -m moto.server` as a child process; `env` points the AWS SDK chain at it."""

    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        out = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not start: {self.log.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def requests(self) -> list[str]:
        """The request lines the server logged so far (`GET /bucket/key HTTP/1.1`)."""
        lines = _ANSI.sub("", self.log.read_text(errors="replace")).splitlines()
        return [m.group(1) for line in lines if (m := re.search(r'"([A-Z]+ \S+ HTTP/[\d.]+)"', line))]

    def object_gets(self, bucket: str) -> int:
        """Object downloads the server served from `bucket` so far: GETs of a key (a listing is a GET of
        the bucket with a query string, not counted)."""
        prefix = f"GET /{bucket}/"
        return sum(1 for r in self.requests() if r.startswith(prefix) and "?" not in r.split()[1])


def new_bucket_name() -> str:
    return f"qt-{uuid.uuid4().hex[:12]}"

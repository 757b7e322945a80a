"""A real Label Studio server for the live-sync tests, from its own venv (`make install-label-studio`).

Not a test module. `start` runs `label-studio start` on a free port with a throwaway data folder
(SQLite), an admin user whose legacy token the tests use, and local file serving from `document_root`;
waits for /health; `stop` ends it (and its children: it runs in its own process group). Label Studio's
pins clash with ours, hence the separate venv; without it the tests skip through
`services.require_label_studio` (a failure under QWEN_TASKS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services import LABEL_STUDIO, require_label_studio

from qwen_tasks.dev.airflow_stack import free_port

ADMIN = "admin@example.org"
TOKEN = "qwen-tasks-test-token-0123456789abcdef"  # a legacy token, enabled with --enable-legacy-api-token
START_SECONDS = 300  # first start migrates a fresh SQLite database: about 75 s on 2 shared CPUs


@dataclass
class LabelStudioServer:
    url: str
    token: str
    document_root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def env(self) -> dict[str, str]:
        """What `qwen-tasks review push/pull` read to reach this server."""
        return {
            "LABEL_STUDIO_URL": self.url,
            "LABEL_STUDIO_API_KEY": self.token,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def start(data_dir: Path, document_root: Path) -> LabelStudioServer:
    require_label_studio()
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "label-studio.log"
    env = {
        **os.environ,
        "HOME": str(data_dir),  # nothing under the user's ~/.local/share/label-studio
        "DJANGO_DB": "sqlite",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        # the S3 server of the tests is on 127.0.0.1, which Label Studio refuses as a storage endpoint
        # unless its default banned subnets are off (docs/review.md: what an operator with MinIO sets)
        "USE_DEFAULT_BANNED_SUBNETS": "false",
    }
    args = [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir / "data"), "--username", ADMIN, "--password", "not-a-secret-1",
            "--user-token", TOKEN, "--enable-legacy-api-token"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=data_dir
        )
    server = LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, document_root, process, log)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(2)
    server.stop()
    raise RuntimeError(f"label-studio did not answer /health in {START_SECONDS} s: {log.read_text()[-2000:]}")

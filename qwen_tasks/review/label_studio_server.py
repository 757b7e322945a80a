"""Talking to a running Label Studio server through its official SDK (`label_studio_sdk` v2).

Owns: where the server is and the key to it (`ServerConfig`: environment, or the DAG's Airflow
connection), every SDK call turned into one redacted line on failure, the project of a (dataset, task)
found again or created with our labelling config, and where Label Studio fetches a clip's audio from
(`AudioSource`: a Local Files storage under its document root, or an S3 import storage on the bucket of
an `s3://` clip, which Label Studio resolves to presigned URLs). `qwen_tasks.review.sync` decides what to
push and pull and keeps the database side.

The API key is never logged, stored or put in an error message: `ServerConfig` leaves it out of its repr,
and `redact` masks it in any text that leaves this module. The S3 credentials (`sources.s3_access`: the
ones we read the bucket with) go to Label Studio's storage settings only, which is what the storage needs
to presign; never to our database or a log, and masked in any error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from qwen_tasks.errors import ConfigError, QwenTasksError
from qwen_tasks.review.label_studio import LOCAL_FILES_PREFIX, audio_reference, label_config

URL_VAR = "LABEL_STUDIO_URL"
KEY_VAR = "LABEL_STUDIO_API_KEY"
# The name Label Studio itself reads (it also accepts LOCAL_FILES_DOCUMENT_ROOT): one variable for both
ROOT_VAR = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
CONN_ID = "qwen_tasks_label_studio"  # the DAG's Airflow connection: host = URL, password = API key
STORAGE_TITLE = "qwen-tasks audio"


class LabelStudioUnavailable(QwenTasksError):
    """The server cannot be reached or answered 5xx; retryable (the DAG's next try may succeed)."""


def project_title(dataset: str, task: str) -> str:
    """The one project of a (dataset, task): how we name it, and find it again when its id is lost."""
    return f"qwen-tasks {dataset} {task}"


@dataclass(frozen=True)
class ServerConfig:
    """A Label Studio server: base URL (no user info), API key (never shown) and, for local audio, the
    folder the server serves local files from (its LOCAL_FILES_DOCUMENT_ROOT)."""

    url: str
    api_key: str = field(repr=False)
    document_root: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{URL_VAR} must be an http(s) URL like http://localhost:8080, not {self.url!r}"
            )
        if parts.username or parts.password:  # a URL with credentials would be stored and shown
            raise ConfigError(f"{URL_VAR} must not carry a user or password; put the key in {KEY_VAR}")
        if not self.api_key:
            raise ConfigError(
                f"{KEY_VAR} is not set: create a token in Label Studio (Account & Settings) and export it"
            )
        if self.document_root is not None and not self.document_root.startswith("/"):
            raise ConfigError(f"{ROOT_VAR} must be an absolute folder, got {self.document_root!r}")
        object.__setattr__(self, "url", urlunsplit(parts._replace(path=parts.path.rstrip("/"))))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        """LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
        env = os.environ if env is None else env
        if not env.get(URL_VAR):
            raise ConfigError(f"{URL_VAR} is not set (the Label Studio server, e.g. http://localhost:8080)")
        root = env.get(ROOT_VAR) or env.get("LOCAL_FILES_DOCUMENT_ROOT") or None
        return cls(url=env[URL_VAR], api_key=env.get(KEY_VAR, ""), document_root=root)

    @classmethod
    def from_airflow(cls, conn: Any, env: Mapping[str, str] | None = None) -> ServerConfig:
        """From the Airflow connection `qwen_tasks_label_studio`: host (a URL, or a name with port and
        the scheme in `schema`), password = the API key, extra `document_root`; the environment fills
        what the connection leaves out."""
        env = os.environ if env is None else env
        host = conn.host or ""
        if host and "://" not in host:
            host = f"{conn.schema or 'http'}://{host}" + (f":{conn.port}" if conn.port else "")
        extra = dict(conn.extra_dejson or {})
        root = extra.get("document_root") or env.get(ROOT_VAR) or env.get("LOCAL_FILES_DOCUMENT_ROOT")
        return cls(
            url=host or env.get(URL_VAR, ""),
            api_key=conn.password or extra.get("api_key") or env.get(KEY_VAR, ""),
            document_root=root or None,
        )

    def redact(self, text: str) -> str:
        """`text` with the API key masked (an SDK or HTTP error may echo a header)."""
        return text.replace(self.api_key, "***") if self.api_key else text


def _detail(body: Any) -> str:
    """The human part of a Label Studio error body: validation errors, else `detail`, else the text."""
    if isinstance(body, dict):
        errors = body.get("validation_errors")
        if isinstance(errors, dict) and errors:
            return "; ".join(
                " ".join(str(m) for m in (v if isinstance(v, list) else [v])) for v in errors.values()
            )
        if body.get("detail"):
            return str(body["detail"])
    return " ".join(str(body).split())[:300]


class Server:
    """An SDK client for one server plus the calls the sync makes, each failing with one clear line."""

    def __init__(self, config: ServerConfig) -> None:
        from label_studio_sdk import LabelStudio

        self.config = config
        self.client = LabelStudio(base_url=config.url, api_key=config.api_key, timeout=60)

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        """Run SDK calls; an API error becomes ConfigError (4xx: fix something), a connection failure or 5xx
        LabelStudioUnavailable, each one line naming the server and `what` was being done."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        where = f"Label Studio at {self.config.url}"
        try:
            yield
        except ApiError as exc:
            status = exc.status_code or 0
            detail = self.config.redact(_detail(exc.body))
            if status == 401:
                raise ConfigError(
                    f"{where} refused {KEY_VAR} ({detail}): use a personal access token, or a legacy "
                    "token with legacy tokens enabled for the organization (docs/review.md)"
                ) from None
            error = LabelStudioUnavailable if status >= 500 else ConfigError
            raise error(f"{where}: {what} failed ({status}: {detail})") from None
        except httpx.HTTPError as exc:
            reason = self.config.redact(" ".join(str(exc).split()) or type(exc).__name__)
            raise LabelStudioUnavailable(f"{where} is not reachable ({what}: {reason})") from None

    # --- projects ----------------------------------------------------------------------------------

    def ensure_project(self, known_id: int | None, dataset: str, task: str) -> int:
        """The project of (dataset, task): `known_id` if it still exists, else the one titled
        `project_title`, else a new one; its labelling config is brought up to date. Returns its id."""
        from label_studio_sdk.core.api_error import ApiError

        title = project_title(dataset, task)
        config = label_config(task)
        project = None
        with self.call(f"finding project {title!r}"):
            if known_id is not None:
                try:
                    project = self.client.projects.get(known_id)
                except ApiError as exc:
                    if exc.status_code != 404:
                        raise
            if project is None:
                project = next((p for p in self.client.projects.list(title=title) if p.title == title), None)
        if project is None:
            with self.call(f"creating project {title!r}"):
                created = self.client.projects.create(
                    title=title,
                    label_config=config,
                    description=f"Clips of dataset {dataset} for the {task} task, pushed by qwen-tasks.",
                )
            return int(created.id)
        if (project.label_config or "").strip() != config.strip():
            with self.call(f"updating the labelling config of project {title!r}"):
                self.client.projects.update(project.id, label_config=config)
        return int(project.id)

    # --- storages ----------------------------------------------------------------------------------

    def ensure_local_storage(self, project_id: int, folder: str) -> int:
        """A Local Files import storage of the project on `folder` (a subfolder of the document root);
        reuses one whose path already covers it. Label Studio's refusal (serving off, a folder outside its
        root) comes back as one line saying what to set."""
        with self.call(f"listing the storages of project {project_id}"):
            existing = self.client.import_storage.local.list(project=project_id)
        for storage in existing:
            path = (storage.path or "").rstrip("/")
            if folder == path or folder.startswith(path + "/"):
                return int(storage.id)
        try:
            with self.call(f"creating a Local Files storage on {folder} for project {project_id}"):
                created = self.client.import_storage.local.create(
                    project=project_id, path=folder, title=STORAGE_TITLE, use_blob_urls=False
                )
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; Label Studio must run with LOCAL_FILES_SERVING_ENABLED=true and "
                f"LOCAL_FILES_DOCUMENT_ROOT={self.config.document_root} (the same folder as {ROOT_VAR} here)"
            ) from None
        return int(created.id)

    def ensure_s3_storage(self, project_id: int, bucket: str, prefix: str, access: Any) -> int:
        """An S3 import storage of the project on `bucket` (Label Studio resolves an `s3://bucket/key` task
        URL through the storage of that bucket, presigning it); reuses the project's storage on that bucket,
        so the credentials are sent once. `access` is `sources.S3Access`; its secret never shows in an
        error."""
        with self.call(f"listing the S3 storages of project {project_id}"):
            existing = self.client.import_storage.s3.list(project=project_id)
        for storage in existing:
            if storage.bucket == bucket:
                return int(storage.id)
        optional = {"aws_session_token": access.token, "s3endpoint": access.endpoint,
                    "region_name": access.region}  # fmt: skip
        try:
            with self.call(f"creating an S3 storage on s3://{bucket}/{prefix} for project {project_id}"):
                created = self.client.import_storage.s3.create(
                    project=project_id, bucket=bucket, prefix=prefix, title=STORAGE_TITLE, presign=True,
                    use_blob_urls=False, aws_access_key_id=access.key, aws_secret_access_key=access.secret,
                    **{k: v for k, v in optional.items() if v},
                )  # fmt: skip
        except (ConfigError, LabelStudioUnavailable) as exc:
            text = access.redact(str(exc))
            hint = (
                "Label Studio refuses storage endpoints on private or loopback addresses: start it with "
                "USE_DEFAULT_BANNED_SUBNETS=false (or SSRF_PROTECTION_ENABLED=false)"
                if "reserved network address" in text
                else "Label Studio reads the bucket with the credentials and endpoint we read it with (AWS_* "
                f"variables or the connection qwen_tasks_s3): it must reach {access.endpoint or 'AWS S3'} "
                "with them"
            )
            raise type(exc)(f"{text}; {hint} (docs/review.md)") from None
        return int(created.id)

    # --- tasks and annotations -----------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Create tasks (with their predictions); returns Label Studio's task ids in the same order."""
        with self.call(f"importing {len(tasks)} task(s) into project {project_id}"):
            response = self.client.projects.import_tasks(project_id, request=tasks, return_task_ids=True)
        ids = list(response.task_ids or [])
        if len(ids) != len(tasks):
            raise LabelStudioUnavailable(
                f"Label Studio at {self.config.url} created {len(ids)} of {len(tasks)} task(s) in project "
                f"{project_id}; the next push adopts what it created"
            )
        return [int(i) for i in ids]

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project with its data and annotations (plain dicts)."""
        with self.call(f"listing the tasks of project {project_id}"):
            items = list(self.client.tasks.list(project=project_id, fields="all", resolve_uri=False))
        out = []
        for item in items:
            raw = item.dict() if hasattr(item, "dict") else dict(item)
            out.append(raw)
        return out

    def user_emails(self) -> dict[int, str]:
        """Label Studio user id -> e-mail (annotations name their annotator by id)."""
        with self.call("listing users"):
            return {int(u.id): u.email for u in self.client.users.list() if u.email}


@dataclass(frozen=True)
class AudioSource:
    """Where Label Studio fetches one clip: the task's `data.audio` and the storage that grants it.

    kind "local": a Local Files storage on `storage_path` (the top folder under the document root that
    holds the clip; Label Studio refuses the root itself). kind "s3": an S3 import storage on the bucket
    `storage_path` (`s3://bucket`); the task's audio is the object's own URL, which Label Studio turns
    into a presigned one through that storage.
    """

    kind: str
    url: str
    storage_path: str


def audio_source(path: str, document_root: str | None) -> AudioSource:
    """Map a clip's stored path to what Label Studio needs; ValueError says why a clip cannot be served."""
    if path.startswith("s3://"):
        bucket, _, key = path.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ValueError(f"{path}: not an object URL (s3://bucket/key)")
        return AudioSource(kind="s3", url=path, storage_path=f"s3://{bucket}")
    if "://" in path:
        raise ValueError(f"{path}: Label Studio storages are set up here for local and s3:// audio only")
    if document_root is None:
        raise ConfigError(
            f"{ROOT_VAR} is not set: Label Studio serves local audio only from LOCAL_FILES_DOCUMENT_ROOT; "
            "set both to the same folder above the audio (and LOCAL_FILES_SERVING_ENABLED=true on the server)"
        )
    try:  # the one mapping of a path to a local-files URL (review-export uses it too)
        url = audio_reference(path, document_root, LOCAL_FILES_PREFIX)
    except ConfigError as exc:
        raise ValueError(str(exc).replace("--audio-root", ROOT_VAR)) from None
    top = PurePosixPath(path).relative_to(PurePosixPath(document_root)).parts[0]
    return AudioSource(kind="local", url=url, storage_path=str(PurePosixPath(document_root) / top))

"""Where audio bytes come from: a local path, or an object in storage named by a URL.

`s3://bucket/key` (and any URL whose fsspec filesystem is installed: `gs://`, `az://`, ...) is accepted
wherever a folder, a file or a manifest is. This module is the one place that talks to object storage,
always through fsspec (s3fs for S3, MinIO, Ceph...): no hand-written client.

- Listing (`list_prefix`, `list_named`) returns each object's size, ETag and last-modified time
  (`ObjectInfo`) without reading it, so ingest can skip an unchanged object entirely.
- `download` copies an object once (one GET up to 64 MiB, else streamed in ranges), hashing it, into a file
  the caller then probes: the bytes judged are the bytes hashed.
- `fetch_verified` is what labelling reads: the bytes of the content ingest hashed, from a bounded local
  cache (`ObjectCache`, LRU by bytes, keyed by sha256) or downloaded once and checked against that sha256.
- Credentials and endpoint come from the standard chain (AWS_* variables, ~/.aws, AWS_ENDPOINT_URL), or
  from storage options an Airflow task sets from its connection (`set_storage_options`); a URL holding
  credentials is refused (`check_url`), so none reaches the database, a log or an error message.

The string rules of a URL (`is_url`, `url_problem`, `normal_url`) live in `qwen_tasks.records`, shared
with the settings (QWEN_TASKS_ALLOWED_ROOTS may hold URL prefixes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from qwen_tasks.config import get_settings
from qwen_tasks.errors import AudioError, ConfigError, StorageUnavailable
from qwen_tasks.records import is_url, normal_url, redact_url, url_problem

if TYPE_CHECKING:
    import fsspec

__all__ = ["is_url", "ObjectInfo", "check_url", "list_prefix", "list_named", "download", "fetch_verified"]

STREAM_CHUNK = 8 << 20  # bytes per ranged read while streaming an object (one request each)
WHOLE_OBJECT_BYTES = 64 << 20  # objects listed up to this size are fetched with one GET (no HEAD, no ranges)
_options: dict[str, dict[str, Any]] = {}  # protocol -> storage options set by the caller (Airflow task)
_lock = threading.Lock()


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says about an object: enough to tell that it has not changed since last time."""

    url: str
    size: int
    mtime_ns: int | None
    etag: str | None


@dataclass(frozen=True)
class Downloaded:
    """An object streamed once: its facts at download time, the sha256 of its bytes and their first chunk."""

    info: ObjectInfo
    sha256: str
    head: bytes


def check_url(url: str) -> str:
    """The stored form of `url`, or ConfigError naming it (credentials redacted) and the reason: a URL
    with credentials, `..` segments, or a scheme no installed fsspec filesystem handles."""
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"{redact_url(url)}: {problem}")
    normal = normal_url(url)
    _filesystem_class(normal)
    return normal


def _filesystem_class(url: str) -> type:
    import fsspec

    protocol = url.partition("://")[0]
    try:
        return fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{url}: no filesystem for {protocol}:// is installed ({exc})") from None


def set_storage_options(protocol: str, options: dict[str, Any]) -> None:
    """Storage options (credentials, endpoint) for `protocol`, instead of the standard chain; an Airflow
    task sets them from its connection (`qwen_tasks.orchestration.connection`). Kept in memory only."""
    with _lock:
        _options[protocol] = dict(options)


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of `url` (instances are cached by fsspec)."""
    import fsspec

    protocol = url.partition("://")[0]
    with _lock:
        options = dict(_options.get(protocol, {}))
    return fsspec.filesystem(protocol, **options)


def _mtime_ns(detail: dict[str, Any]) -> int | None:
    value = next(
        (detail[k] for k in ("LastModified", "mtime", "last_modified", "updated") if k in detail), None
    )
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        whole = value.replace(microsecond=0)
        return int(whole.timestamp()) * 1_000_000_000 + value.microsecond * 1000
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    return None


def _info(url: str, detail: dict[str, Any]) -> ObjectInfo:
    etag = next((detail[k] for k in ("ETag", "etag", "md5Hash", "md5") if detail.get(k)), None)
    return ObjectInfo(url, int(detail.get("size") or 0), _mtime_ns(detail), str(etag) if etag else None)


def _url_of(fs: fsspec.AbstractFileSystem, url: str, name: str) -> str:
    return normal_url(f"{url.partition('://')[0]}://{fs._strip_protocol(name)}")


def _read_error(url: str, exc: BaseException) -> AudioError | StorageUnavailable:
    """A short reason for a failed read, never the storage options (the URL itself holds no secret).
    Anything but an OSError/ValueError (botocore's connection errors) means the storage is unreachable."""
    if not isinstance(exc, OSError | ValueError):
        return StorageUnavailable(f"{url}: object storage cannot be reached ({type(exc).__name__}: {exc})")
    if isinstance(exc, FileNotFoundError):
        return AudioError(url, "no such object")
    if isinstance(exc, PermissionError):
        return AudioError(url, "permission denied")
    return AudioError(url, f"cannot read object: {type(exc).__name__}: {exc}")


def _listing_error(url: str, exc: BaseException) -> StorageUnavailable:
    error = _read_error(url, exc)
    return error if isinstance(error, StorageUnavailable) else StorageUnavailable(f"cannot list {error}")


def is_prefix(url: str) -> bool:
    """True when `url` names a folder-like prefix (objects under `url/`), False for one object. Raises
    ConfigError when it names neither, or the storage cannot be reached."""
    fs = filesystem(url)
    fs.invalidate_cache()
    try:
        if fs.isfile(url):
            return False
        if fs.isdir(url):
            return True
    except Exception as exc:  # noqa: BLE001 - one line naming the URL, whatever the storage raised
        raise ConfigError(str(_read_error(url, exc))) from None
    raise ConfigError(f"no such file or directory: {url}")


def list_prefix(url: str) -> dict[str, ObjectInfo]:
    """Every object under the prefix `url` (recursively), by URL, from a fresh listing (one request per
    1,000 objects on S3; nothing is downloaded)."""
    fs = filesystem(url)
    fs.invalidate_cache()
    try:
        found = fs.find(url, detail=True)
    except Exception as exc:  # noqa: BLE001 - a listing that fails stops the run with one line
        raise _listing_error(url, exc) from None
    out: dict[str, ObjectInfo] = {}
    for name, detail in found.items():
        if detail.get("type", "file") != "file":
            continue
        obj = _url_of(fs, url, name)
        out[obj] = _info(obj, detail)
    return out


def list_named(urls: Iterable[str]) -> dict[str, ObjectInfo]:
    """ObjectInfo of each of `urls` that exists, from one listing per distinct parent prefix rather than
    one request per object (a manifest names thousands of objects in a few folders)."""
    wanted: dict[str, set[str]] = {}
    for url in urls:
        wanted.setdefault(parent(url), set()).add(url)
    out: dict[str, ObjectInfo] = {}
    for folder, names in wanted.items():
        fs = filesystem(folder)
        fs.invalidate_cache(folder)
        try:
            listed = fs.ls(folder, detail=True)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001
            raise _listing_error(folder, exc) from None
        for detail in listed:
            obj = _url_of(fs, folder, detail["name"])
            if obj in names and detail.get("type", "file") == "file":
                out[obj] = _info(obj, detail)
    return out


def parent(url: str) -> str:
    """The prefix holding `url` (`s3://b/a/x.wav` -> `s3://b/a`; a bucket's top level -> `s3://b`)."""
    head, _, _ = url.rpartition("/")
    return head if "://" in head and not head.endswith(":/") else url


def join(folder: str, relative: str) -> str | None:
    """`relative` (a manifest line's path) resolved against the prefix `folder` like a path, or None when
    its `..` would climb out of the bucket."""
    scheme, _, rest = folder.partition("://")
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join(key, relative))  # relative: `..` stays visible at the front
    if relative.startswith("/") or joined == ".." or joined.startswith("../") or joined == ".":
        return None
    return f"{scheme}://{bucket}/{joined}"


def read_bytes(url: str) -> bytes:
    """A whole object (a manifest); OSError as fsspec raises it."""
    return filesystem(url).cat_file(url)


def download(url: str, out: BinaryIO, listed_size: int | None = None) -> Downloaded:
    """Copy the object at `url` into `out` once, hashing it; AudioError(url, reason) when it cannot be read.

    An object listed at most WHOLE_OBJECT_BYTES long is fetched with one GET (the object as it is now,
    whatever the listing said; the caller keeps the listing's facts, so a change in between shows in the
    next listing). A larger one, or one of unknown size, is streamed in STREAM_CHUNK ranges after one HEAD,
    whose size, ETag and last-modified time are returned with it."""
    fs = filesystem(url)
    if listed_size is not None and listed_size <= WHOLE_OBJECT_BYTES:
        try:
            data = fs.cat_file(url)
        except Exception as exc:  # noqa: BLE001 - sorted by _read_error: a file's fault or the storage's
            raise _read_error(url, exc) from None
        out.write(data)
        return Downloaded(ObjectInfo(url, len(data), None, None), hashlib.sha256(data).hexdigest(), data)
    digest = hashlib.sha256()
    head = b""
    size = 0
    try:
        with fs.open(url, "rb", block_size=STREAM_CHUNK, cache_type="none") as f:
            detail = dict(getattr(f, "details", None) or fs.info(url))
            while chunk := f.read(STREAM_CHUNK):
                if not head:
                    head = chunk
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except Exception as exc:  # noqa: BLE001 - sorted by _read_error: a file's fault or the storage's
        raise _read_error(url, exc) from None
    detail["size"] = size
    return Downloaded(_info(url, detail), digest.hexdigest(), head)


class ObjectCache:
    """Local copies of objects by content (a file per sha256), at most `limit` bytes, least recently used
    evicted first. Several worker processes may share the folder: files appear by atomic rename and a
    file evicted by another process is simply downloaded again. The folder is scanned (and trimmed) only
    when this process's running total would pass the limit, not on every put: a worker's put is on the
    labelling path, and a scan costs a stat per cached file."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self._total: int | None = None  # bytes in the folder at the last scan, plus this process's puts

    def get(self, sha256: str) -> bytes | None:
        path = self.folder / sha256
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
        except OSError:
            return None
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if self.limit <= 0 or len(data) > self.limit:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".part-", delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, self.folder / sha256)
            if self._total is None or self._total + len(data) > self.limit:
                self._total = self._evict()
            else:
                self._total += len(data)
        except OSError:  # a full or read-only disk costs a download next time, never a label
            return

    def _evict(self) -> int:
        """Trim the folder to the limit, least recently used first; returns the bytes left."""
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".part-"):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total


_CACHES: dict[tuple[Path, int], ObjectCache] = {}


def object_cache() -> ObjectCache:
    """This process's cache for the configured folder and limit (one instance, so its running total
    holds across the clips a worker reads)."""
    settings = get_settings()
    key = (settings.object_cache, settings.object_cache_bytes)
    if key not in _CACHES:
        _CACHES[key] = ObjectCache(*key)
    return _CACHES[key]


def fetch_verified(url: str, sha256: str, size: int | None = None) -> bytes:
    """The bytes of `url` that ingest hashed to `sha256`: from the local cache, else downloaded once (and
    cached). AudioError when the object now holds other bytes, FileNotFoundError when it is gone."""
    cache = object_cache()
    data = cache.get(sha256)
    if data is not None and hashlib.sha256(data).hexdigest() == sha256:
        return data
    buffer = io.BytesIO()
    try:
        got = download(url, buffer, size)
    except AudioError as exc:
        if exc.reason == "no such object":
            raise FileNotFoundError(url) from None
        raise
    if got.sha256 != sha256:
        raise AudioError(url, f"content changed since ingest: sha256 {got.sha256} != {sha256}; re-run ingest")
    data = buffer.getvalue()
    cache.put(sha256, data)
    return data


@dataclass(frozen=True)
class S3Access:
    """The credentials, endpoint and region this process reads `s3://` with, for a service that must read
    the same bucket on our behalf (Label Studio's S3 import storage). The secret parts are left out of the
    repr; the caller hands them to that service only, never to a log or the database."""

    key: str | None = field(repr=False)
    secret: str | None = field(repr=False)
    token: str | None = field(repr=False)
    endpoint: str | None
    region: str | None

    def redact(self, text: str) -> str:
        """`text` with the key, secret and token masked."""
        for value in (self.secret, self.token, self.key):
            if value:
                text = text.replace(value, "***")
        return text


def s3_access() -> S3Access:
    """What `filesystem("s3://...")` uses: the storage options an Airflow task set from its connection
    (`set_storage_options`), else the standard AWS chain as botocore resolves it (AWS_* variables,
    ~/.aws, AWS_ENDPOINT_URL). ConfigError when neither yields credentials."""
    with _lock:
        options = dict(_options.get("s3", {}))
    if options:
        client = dict(options.get("client_kwargs") or {})
        return S3Access(options.get("key"), options.get("secret"), options.get("token"),
                        options.get("endpoint_url") or client.get("endpoint_url"),
                        client.get("region_name"))  # fmt: skip
    import botocore.session

    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:
        raise ConfigError(
            "no S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws), or the "
            "Airflow connection qwen_tasks_s3"
        )
    frozen = credentials.get_frozen_credentials()
    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or session.get_config_variable("endpoint_url")
    )
    return S3Access(frozen.access_key, frozen.secret_key, frozen.token, endpoint or None,
                    session.get_config_variable("region") or None)  # fmt: skip

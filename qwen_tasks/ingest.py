"""Ingest: folders, audio files and jsonl manifests into the audio / audio_file / manifest_item tables.

The first stage of the nightly DAG and of the CLI (`qwen-tasks ingest`); both call `ingest()`.

- Incremental: one bulk SELECT of the known paths; a file whose (path, size, mtime_ns) is unchanged and
  was ok last time is not opened again, so a nightly run over an unchanged tree costs one stat per file.
- Deduplicated by content: audio rows are keyed by sha256; two paths with the same bytes share one row.
- Quarantine, never crash: every bad path gets an audio_file row with a specific reason and the run
  goes on. Paths whose real location (symlinks resolved) is outside the allowed roots are never read.
- Crash-safe: files are checked and written in chunks, one transaction per chunk, with
  INSERT ... ON CONFLICT; a kill loses at most the chunk in flight and a re-run finishes the job.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from . import schema
from .audio import CheckedAudio, check_file, os_error_reason
from .config import get_settings
from .db import transaction
from .errors import AudioError, ConfigError
from .manifest import ManifestError, ManifestItem, ManifestKind, read_manifest

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_EXTENSIONS = frozenset({".jsonl"})
CHUNK_SIZE = 500  # files per transaction: a kill loses at most this many files' work
# Threads checking files (hash + probe + scan). Small files are GIL-bound, so more threads than cores
# only add contention; hashlib and libsndfile release the GIL, which is what two threads exploit.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
OUTSIDE_ROOTS = "outside allowed roots"

Progress = Callable[[int, int], None]  # (files done, files total)


@dataclass
class IngestSummary:
    """Counts per path (each path lands in exactly one of new / changed / duplicate / unchanged /
    quarantined), the quarantined paths with reasons and the skipped manifest lines. `to_dict()` is
    what `qwen-tasks ingest --json` prints and what the DAG task returns."""

    new: int = 0
    unchanged: int = 0
    duplicate: int = 0
    changed: int = 0
    quarantined: int = 0
    missing: int = 0
    manifest_items: int = 0
    quarantine: list[dict[str, str]] = field(default_factory=list)
    manifest_errors: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Known(NamedTuple):
    """An audio_file row as the incremental check needs it (a tuple: 100k of them are built per run)."""

    id: int
    size_bytes: int | None
    mtime_ns: int | None
    status: str
    audio_id: int | None


@dataclass
class _Discovery:
    """Candidate paths (absolute, symlinks kept) and paths already judged bad while walking."""

    # path -> whether its real location still needs the allowed-roots check. Plain entries found while
    # walking a folder inside the roots are inside by construction, which saves a realpath() (one lstat
    # per path component) per file on the nightly run.
    paths: dict[str, bool] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    scanned_dirs: list[str] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)

    def add(self, path: str, check_root: bool = True) -> None:
        if path not in self.bad:
            self.paths[path] = self.paths.get(path, False) or check_root


def _prefix(folder: str) -> str:
    return folder if folder.endswith(os.sep) else folder + os.sep


def _within(real: str, roots: Sequence[str]) -> bool:
    return any(real == r or real.startswith(_prefix(r)) for r in roots)


def _is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def _walk(top: str, roots: Sequence[str], found: _Discovery) -> None:
    """Recursive scan without recursion limits. Directory symlinks are followed when their target is
    inside the allowed roots and not visited yet (so a link back to a parent cannot loop forever)."""
    visited = {os.path.realpath(top)}
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            found.unreadable_dirs.append(folder)  # reported, and exempt from the 'missing' marking
            found.bad[folder] = f"cannot list directory: {os_error_reason(folder, exc)}"
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            path = entry.path
            audio_name = _is_audio_name(entry.name)
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_link, is_dir = False, False
            if is_dir:
                stack.append(path)
                if audio_name:
                    found.bad[path] = "is a directory"
                continue
            if audio_name:
                found.add(path, check_root=is_link)
            elif is_link:
                real = os.path.realpath(path)
                if real not in visited and _within(real, roots) and os.path.isdir(real):
                    visited.add(real)
                    stack.append(path)


def _discover(paths: Iterable[Path], roots: Sequence[str], found: _Discovery) -> None:
    for p in paths:
        path = os.path.abspath(p)
        if os.path.isdir(path):
            if _within(os.path.realpath(path), roots):
                found.scanned_dirs.append(path)
                _walk(path, roots, found)
            else:
                found.bad[path] = OUTSIDE_ROOTS
        else:
            found.add(path)


def _default_roots(paths: Sequence[Path], manifests: Sequence[tuple[Path, ManifestKind | None]]) -> list[str]:
    roots = [os.path.realpath(p) for p in paths]  # named directories, and named files themselves
    roots += [os.path.dirname(os.path.realpath(m)) for m, _ in manifests]
    return roots


def _split_manifests(
    paths: Sequence[Path], manifests: Sequence[tuple[Path, ManifestKind | None]], kind: ManifestKind | None
) -> tuple[list[Path], list[tuple[Path, ManifestKind | None]]]:
    """A *.jsonl file given as a PATH is a manifest (of `kind`, or inferred per line)."""
    audio_paths: list[Path] = []
    by_path: dict[str, tuple[Path, ManifestKind | None]] = {}
    for m, m_kind in manifests:
        by_path.setdefault(os.path.abspath(m), (Path(m), m_kind))
    for p in paths:
        if Path(p).suffix.lower() in MANIFEST_EXTENSIONS and os.path.isfile(p):
            by_path.setdefault(os.path.abspath(p), (Path(p), kind))
        else:
            audio_paths.append(Path(p))
    return audio_paths, list(by_path.values())


def _load_known(conn: sa.Connection, found: _Discovery, explicit: Sequence[str]) -> dict[str, _Known]:
    """Known audio_file rows under the scanned folders or named explicitly: one SELECT, no per-file query."""
    t = schema.audio_file
    conditions = [t.c.path.startswith(_prefix(d), autoescape=True) for d in found.scanned_dirs]
    if explicit:
        conditions.append(t.c.path == sa.any_(_array(explicit, sa.Text)))
    if not conditions:
        return {}
    rows = conn.execute(
        sa.select(t.c.path, t.c.id, t.c.size_bytes, t.c.mtime_ns, t.c.status, t.c.audio_id).where(
            sa.or_(*conditions)
        )
    ).all()
    return {r[0]: _Known._make(r[1:]) for r in rows}


def _array(values: Sequence[object], item_type: type[sa.types.TypeEngine]) -> sa.BindParameter:
    """One array parameter for `= ANY(...)`: a 100k-long IN list would render 100k placeholders."""
    return sa.bindparam(None, list(values), type_=ARRAY(item_type))


def _is_utf8(path: str) -> bool:
    """False for names with undecodable bytes (surrogate escapes): PostgreSQL text cannot hold them."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _db_path(path: str) -> str:
    """The path as stored: verbatim, or with undecodable bytes escaped as \\xNN."""
    return path if _is_utf8(path) else os.fsencode(path).decode("utf-8", "backslashreplace")


def _upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: list[dict[str, object]],
    key: list[str],
    update: Sequence[str],
    touch: str | None = None,
) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE (or DO NOTHING when `update` is empty) for many rows.

    With RETURNING, SQLAlchemy batches the rows into multi-VALUES statements ("insertmanyvalues");
    without it psycopg2 would send an upsert executemany row by row (4x slower here), and building one
    huge VALUES statement ourselves costs more in SQL compilation than it saves.
    """
    stmt = pg_insert(table)
    if update:
        set_: dict[str, object] = {c: stmt.excluded[c] for c in update}
        if touch:
            set_[touch] = sa.func.now()
        stmt = stmt.on_conflict_do_update(index_elements=key, set_=set_)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=key)
    conn.execute(stmt.returning(*(table.c[k] for k in key)), rows).all()


class _Writer:
    """Writes one chunk of checked files in one transaction and keeps the run's counts."""

    def __init__(self, engine: Engine, known: dict[str, _Known], summary: IngestSummary) -> None:
        self.engine = engine
        self.known = known
        self.summary = summary

    def quarantine(self, path: str, reason: str) -> None:
        self.summary.quarantined += 1
        self.summary.quarantine.append({"path": path, "reason": reason})

    def write_chunk(self, ok: list[CheckedAudio], bad: list[tuple[str, str, os.stat_result | None]]) -> None:
        audio_t, file_t = schema.audio, schema.audio_file
        with transaction(self.engine) as conn:
            shas = sorted({c.sha256 for c in ok})
            existing: set[str] = set()
            ids: dict[str, int] = {}
            if shas:
                existing = set(
                    conn.execute(sa.select(audio_t.c.sha256).where(audio_t.c.sha256.in_(shas))).scalars()
                )
                new_rows = {}
                for c in ok:
                    if c.sha256 not in existing and c.sha256 not in new_rows:
                        p = c.probe
                        new_rows[c.sha256] = {
                            "sha256": c.sha256,
                            "size_bytes": c.size_bytes,
                            "duration_s": p.duration_s,
                            "sample_rate": p.sample_rate,
                            "channels": p.channels,
                            "frames": p.frames,
                            "format": p.format,
                            "subtype": p.subtype,
                        }
                if new_rows:
                    _upsert(conn, audio_t, list(new_rows.values()), ["sha256"], ())
                rows = conn.execute(
                    sa.select(audio_t.c.sha256, audio_t.c.id).where(audio_t.c.sha256.in_(shas))
                )
                ids = {sha: audio_id for sha, audio_id in rows}
            file_rows = []
            seen_in_chunk: set[str] = set()
            for c in ok:
                audio_id = ids[c.sha256]
                prev = self.known.get(c.path)
                if prev is not None and prev.status == "ok":
                    if prev.audio_id == audio_id:
                        self.summary.unchanged += 1
                    else:
                        self.summary.changed += 1
                elif c.sha256 in existing or c.sha256 in seen_in_chunk:
                    self.summary.duplicate += 1
                else:
                    self.summary.new += 1
                seen_in_chunk.add(c.sha256)
                file_rows.append(
                    {
                        "path": c.path,
                        "audio_id": audio_id,
                        "size_bytes": c.size_bytes,
                        "mtime_ns": c.mtime_ns,
                        "status": "ok",
                        "reason": None,
                    }
                )
            for path, reason, st in bad:
                self.quarantine(_db_path(path), reason)
                file_rows.append(
                    {
                        "path": _db_path(path),
                        "audio_id": None,
                        "size_bytes": st.st_size if st is not None else None,
                        "mtime_ns": st.st_mtime_ns if st is not None else None,
                        "status": "quarantined",
                        "reason": reason,
                    }
                )
            if file_rows:
                columns = ("audio_id", "size_bytes", "mtime_ns", "status", "reason")
                _upsert(conn, file_t, file_rows, ["path"], columns, touch="last_seen")


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _check(path: str) -> CheckedAudio | AudioError:
    """check_file, with any surprise turned into a quarantine reason: one file never stops the run."""
    try:
        return check_file(path)
    except AudioError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError on a corrupt header; the file fails alone
        return AudioError(path, f"unexpected error: {type(exc).__name__}: {exc}")


def _classify(
    path: str, check_root: bool, roots: Sequence[str], known: dict[str, _Known]
) -> tuple[str, str | None, os.stat_result | None]:
    """('unchanged' | 'check' | 'bad', reason, stat) from the path and one stat, never opening the file."""
    if not _is_utf8(path):
        return "bad", "file name is not valid UTF-8", None
    if check_root and not _within(os.path.realpath(path), roots):
        return "bad", OUTSIDE_ROOTS, None
    try:
        st = os.stat(path)
    except OSError as exc:
        return "bad", os_error_reason(path, exc), None
    except ValueError:  # embedded NUL from a manifest
        return "bad", "invalid path", None
    if stat.S_ISDIR(st.st_mode):
        return "bad", "is a directory", st
    prev = known.get(path)
    if (
        prev is not None
        and prev.status == "ok"
        and prev.size_bytes == st.st_size
        and prev.mtime_ns == st.st_mtime_ns
    ):
        return "unchanged", None, st
    return "check", None, st


def _mark_missing(
    conn: sa.Connection, found: _Discovery, known: dict[str, _Known], summary: IngestSummary
) -> None:
    """Known paths under a fully scanned folder that are gone from disk become status 'missing'."""
    skip = tuple(_prefix(d) for d in found.unreadable_dirs)
    prefixes = tuple(_prefix(d) for d in found.scanned_dirs if d not in found.unreadable_dirs)
    if not prefixes:
        return
    gone = [
        k.id
        for path, k in known.items()
        if k.status != "missing"
        and path.startswith(prefixes)
        and not (skip and path.startswith(skip))
        and path not in found.paths
        and path not in found.bad
        and not os.path.lexists(path)
    ]
    if gone:
        t = schema.audio_file
        conn.execute(
            sa.update(t)
            .where(t.c.id.in_(gone))
            .values(status="missing", audio_id=None, reason="file no longer exists")
        )
        summary.missing += len(gone)


def _manifest_row(item: ManifestItem, audio_file_id: int | None) -> dict[str, object]:
    return {
        "manifest_path": item.manifest_path,
        "line_no": item.line_no,
        "kind": item.kind,
        "audio_path": item.audio_path,
        "audio_file_id": audio_file_id,
        "reference_text": item.reference_text,
        "language": item.language,
        "question": item.question,
        "gt": item.gt,
        "gold_label": item.gold_label,
        "source": item.source,
        "raw": item.raw,
    }


def _file_ids(conn: sa.Connection, paths: Sequence[str]) -> dict[str, int]:
    f = schema.audio_file
    found: dict[str, int] = {}
    for i in range(0, len(paths), 10_000):
        part = paths[i : i + 10_000]
        result = conn.execute(sa.select(f.c.path, f.c.id).where(f.c.path == sa.any_(_array(part, sa.Text))))
        found.update((path, file_id) for path, file_id in result)
    return found


def _write_manifest_items(
    engine: Engine, items: list[ManifestItem], manifest_paths: Sequence[str], chunk_size: int
) -> None:
    """Upsert manifest rows on (manifest_path, line_no), skipping rows that are already identical (a
    nightly re-run writes nothing), and drop rows of lines that are gone or no longer valid."""
    t = schema.manifest_item
    by_manifest: dict[str, list[ManifestItem]] = {m: [] for m in manifest_paths}
    for item in items:
        by_manifest.setdefault(item.manifest_path, []).append(item)
    columns = ("kind", "audio_path", "audio_file_id", "reference_text", "language", "question", "gt")
    columns += ("gold_label", "source", "raw")
    for manifest_path, lines in by_manifest.items():
        with transaction(engine) as conn:
            stored = conn.execute(
                sa.select(t.c.line_no, t.c.kind, t.c.audio_path, t.c.audio_file_id, t.c.raw).where(
                    t.c.manifest_path == manifest_path
                )
            )
            current = {r.line_no: (r.kind, r.audio_path, r.audio_file_id, r.raw) for r in stored}
            valid = {item.line_no for item in lines}
            stale = [n for n in current if n not in valid]
            if stale:
                conn.execute(sa.delete(t).where(t.c.manifest_path == manifest_path, t.c.line_no.in_(stale)))
            file_ids = _file_ids(conn, sorted({item.audio_path for item in lines}))
        pending = []
        for item in lines:
            file_id = file_ids.get(item.audio_path)
            if current.get(item.line_no) != (item.kind, item.audio_path, file_id, item.raw):
                pending.append(_manifest_row(item, file_id))
        for i in range(0, len(pending), chunk_size):
            with transaction(engine) as conn:
                _upsert(
                    conn, t, pending[i : i + chunk_size], ["manifest_path", "line_no"], columns, "ingested_at"
                )


def ingest(
    engine: Engine,
    paths: Sequence[Path],
    manifests: Sequence[tuple[Path, ManifestKind | None]] = (),
    roots: Sequence[Path] = (),
    progress: Progress | None = None,
    *,
    kind: ManifestKind | None = None,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = None,
) -> IngestSummary:
    """Register audio under `paths` (folders scanned recursively, audio files, *.jsonl manifests) and the
    `manifests` given as (path, kind or None to infer per line). Returns the run's summary.

    Allowed roots: `roots`, else QWEN_TASKS_ALLOWED_ROOTS, else the paths given plus each manifest's
    folder. Raises ConfigError when a path does not exist (nothing is written then) and
    DatabaseUnavailable when the database fails; bad audio never raises.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for p in [*paths, *(m for m, _ in manifests)]:
        if not os.path.lexists(p):
            raise ConfigError(f"no such file or directory: {p}")
    audio_paths, all_manifests = _split_manifests(paths, manifests, kind)
    allowed = (
        [os.path.realpath(r) for r in roots]
        or [str(r) for r in get_settings().allowed_roots]
        or _default_roots(audio_paths, all_manifests)
    )
    allowed = [os.path.realpath(r) for r in allowed]

    summary = IngestSummary()
    items: list[ManifestItem] = []
    for manifest_path, manifest_kind in all_manifests:
        for entry in read_manifest(manifest_path, manifest_kind):
            if isinstance(entry, ManifestError):
                summary.manifest_errors.append(entry.to_dict())
            else:
                items.append(entry)
    summary.manifest_items = len(items)

    found = _Discovery()
    _discover(audio_paths, allowed, found)
    for item in items:
        found.add(item.audio_path)

    explicit = [p for p, check_root in found.paths.items() if check_root]  # not found by walking
    with transaction(engine) as conn:  # connection loss -> DatabaseUnavailable, like every write
        known = _load_known(conn, found, explicit)
    writer = _Writer(engine, known, summary)

    to_check: list[str] = []
    early_bad: list[tuple[str, str, os.stat_result | None]] = []
    for path, reason in found.bad.items():
        early_bad.append((path, reason, None))
    for path, check_root in found.paths.items():
        verdict, reason, st = _classify(path, check_root, allowed, known)
        if verdict == "unchanged":
            summary.unchanged += 1  # not written at all: a nightly run over an unchanged tree is read-only
        elif verdict == "bad":
            early_bad.append((path, reason or "unknown", st))
        else:
            to_check.append(path)

    total = len(found.paths) + len(found.bad)
    done = total - len(to_check)
    if progress:
        progress(done, total)
    for i in range(0, len(early_bad), chunk_size):
        writer.write_chunk([], early_bad[i : i + chunk_size])
    n_workers = workers or DEFAULT_WORKERS
    chunks = [to_check[i : i + chunk_size] for i in range(0, len(to_check), chunk_size)]
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ingest") as pool:
        # Pipelined: the pool checks chunk k+1 while this thread writes chunk k (psycopg2 releases the
        # GIL while Postgres works), so hashing and database time overlap instead of adding up.
        futures = [pool.submit(_check, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            results = [f.result() for f in futures]
            futures = [pool.submit(_check, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            ok: list[CheckedAudio] = []
            bad: list[tuple[str, str, os.stat_result | None]] = []
            for path, result in zip(chunk, results, strict=True):
                if isinstance(result, AudioError):
                    bad.append((path, result.reason, _stat_or_none(path)))
                else:
                    ok.append(result)
            writer.write_chunk(ok, bad)
            done += len(chunk)
            if progress:
                progress(done, total)

    with transaction(engine) as conn:
        _mark_missing(conn, found, known, summary)
    _write_manifest_items(engine, items, [os.path.abspath(m) for m, _ in all_manifests], chunk_size)
    return summary

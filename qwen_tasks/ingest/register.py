"""Ingest: folders, audio files and jsonl manifests into the audio / audio_file / manifest_item tables.

The first stage of the nightly DAG and of the CLI (`qwen-tasks ingest`); both call `ingest()`.

- Incremental: one bulk SELECT of the known paths; a file whose (path, size, mtime_ns) is unchanged and
  was ok last time is not opened again, so a nightly run over an unchanged tree costs one stat per file.
- Deduplicated by content: audio rows are keyed by sha256; two paths with the same bytes share one row.
- Quarantine, never crash: every bad path gets an audio_file row with a specific reason and the run
  goes on. Paths whose real location (symlinks resolved) is outside the allowed roots are never read;
  the root that admitted a file is recorded, and labelling checks it again when it reads the file.
- Lossless: a file name that is not UTF-8 is stored exactly (audio_file.path_bytes) beside a readable
  form, and is ingested like any other file.
- Crash-safe: files are checked and written in chunks, one transaction per chunk, with
  INSERT ... ON CONFLICT; a kill loses at most the chunk in flight and a re-run finishes the job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks.config import get_settings
from qwen_tasks.errors import AudioError, ConfigError, StorageUnavailable
from qwen_tasks.ingest import datasets
from qwen_tasks.ingest import sources as storage
from qwen_tasks.ingest.audio_files import (
    FFMPEG_EXTENSIONS,
    LIBSNDFILE_EXTENSIONS,
    CheckedAudio,
    check_file,
    check_object,
    display_path,
    os_error_reason,
    path_prefix,
    within_roots,
)
from qwen_tasks.ingest.manifests import ManifestError, ManifestItem, ManifestKind, line_hash, read_manifest
from qwen_tasks.records import AudioStatus, is_url
from qwen_tasks.store import schema
from qwen_tasks.store.database import transaction

# What a folder scan takes as audio: libsndfile's formats and the recording formats ffmpeg reads for us
# (audio_files.reader_for). Any other file found in a folder is counted in IngestSummary.skipped.
AUDIO_EXTENSIONS = LIBSNDFILE_EXTENSIONS + FFMPEG_EXTENSIONS
NO_EXTENSION = "(none)"  # the IngestSummary.skipped key of a file without an extension
MANIFEST_EXTENSIONS = frozenset({".jsonl"})
CHUNK_SIZE = 500  # files per transaction: a kill loses at most this many files' work
MANIFEST_CHUNK = 10_000  # manifest lines per statement: one INSERT ... SELECT FROM unnest(arrays)
# Threads checking files (hash + probe + scan). Small files are GIL-bound, so more threads than cores
# only add contention; hashlib and libsndfile release the GIL, which is what two threads exploit.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
OUTSIDE_ROOTS = "outside allowed roots"

Progress = Callable[[int, int], None]  # (files done, files total)


@dataclass
class IngestSummary:
    """Counts per path (each path lands in exactly one of new / changed / duplicate / unchanged /
    quarantined), the quarantined paths with reasons, the skipped manifest lines, and the lines that
    contradict another line about the same audio. `to_dict()` is what `qwen-tasks ingest --json` prints
    and what the DAG task returns."""

    new: int = 0
    unchanged: int = 0
    duplicate: int = 0
    changed: int = 0
    quarantined: int = 0
    missing: int = 0
    manifest_items: int = 0
    manifest_conflicts: int = 0  # lines whose gt/text for a path contradicts an earlier line's
    quarantine: list[dict[str, str]] = field(default_factory=list)
    manifest_errors: list[dict[str, object]] = field(default_factory=list)
    manifest_warnings: list[dict[str, object]] = field(default_factory=list)  # the conflicts, by line
    # the datasets written to: name, split, tasks, clips_added (see qwen_tasks.ingest.datasets)
    datasets: list[dict[str, object]] = field(default_factory=list)
    # Regular files in scanned folders not taken as audio, by lower-case extension ("(none)" without one;
    # hidden files too), so a folder of unexpected formats shows up instead of vanishing silently.
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Known(NamedTuple):
    """An audio_file row as the incremental check needs it (a tuple: 100k of them are built per run)."""

    id: int
    size_bytes: int | None
    mtime_ns: int | None
    status: str
    audio_id: int | None
    root: str | None
    etag: str | None  # objects only (URL paths)


@dataclass
class _Discovery:
    """Candidate paths (absolute, symlinks kept, in the OS's form) and paths already judged bad."""

    # path -> the real folder that holds it when walking found it (a plain entry of a folder inside the
    # roots: its real path is that folder + its name, no realpath() needed), else None (resolve it).
    paths: dict[str, str | None] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    scanned_dirs: list[str] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)
    # regular files the walk did not take as audio, by extension (IngestSummary.skipped; it may be that
    # very dict); `manifests` (absolute paths) are read as manifests, so they are not counted
    skipped: dict[str, int] = field(default_factory=dict)
    manifests: frozenset[str] = frozenset()
    # what a listing says of each object (URL) found: scanned prefixes, and named objects (`_list_named`)
    objects: dict[str, storage.ObjectInfo] = field(default_factory=dict)

    def add(self, path: str, real_dir: str | None = None) -> None:
        if path not in self.bad and self.paths.get(path) is None:
            self.paths[path] = real_dir


class _Roots:
    """The allowed roots, and memos that make the root check cost one lstat per file.

    A path's real location is its folder's real location plus its name unless the path itself is a
    symlink, so realpath() (an lstat per path component) runs once per folder, not once per file.
    """

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = list(roots)
        self._real_dirs: dict[str, str] = {}
        self._dir_roots: dict[str, str | None] = {}

    def real_dir(self, folder: str) -> str:
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return real

    def root_of_dir(self, real_dir: str) -> str | None:
        """root_of(real_dir), remembered: files are classified folder after folder."""
        try:
            return self._dir_roots[real_dir]
        except KeyError:
            root = self._dir_roots[real_dir] = self.root_of(real_dir)
            return root

    def root_of(self, real: str) -> str | None:
        """The most specific root that `real` lies under, or None when it is outside them all."""
        inside = [r for r in self.roots if within_roots(real, [r])]
        return max(inside, key=len) if inside else None


def _is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def _walk(top: str, roots: Sequence[str], found: _Discovery) -> None:
    """Recursive scan without recursion limits. Directory symlinks are followed when their target is
    inside the allowed roots and not visited yet (so a link back to a parent cannot loop forever)."""
    visited = {os.path.realpath(top)}
    stack = [(top, os.path.realpath(top))]
    while stack:
        folder, real_folder = stack.pop()
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
                stack.append((path, os.path.join(real_folder, entry.name)))
                if audio_name:
                    found.bad[path] = "is a directory"
                continue
            if audio_name:
                found.add(path, None if is_link else real_folder)
            elif is_link:
                real = os.path.realpath(path)
                if real not in visited and within_roots(real, roots) and os.path.isdir(real):
                    visited.add(real)
                    stack.append((path, real))
            elif entry.is_file(follow_symlinks=False) and path not in found.manifests:
                # is_file() answers from the d_type scandir already read (or the lstat is_dir() made)
                _count_skipped(found, entry.name)


def _count_skipped(found: _Discovery, name: str) -> None:
    ext = os.path.splitext(name)[1].lower() or NO_EXTENSION
    found.skipped[ext] = found.skipped.get(ext, 0) + 1


def _discover_prefix(url: str, roots: Sequence[str], found: _Discovery) -> None:
    """A bucket prefix: one listing (size, ETag, last-modified of every object; nothing downloaded)."""
    if not within_roots(url, roots):
        found.bad[url] = OUTSIDE_ROOTS
        return
    found.scanned_dirs.append(url)
    listed = storage.list_prefix(url)
    found.objects.update(listed)
    for obj in sorted(listed):
        if _is_audio_name(obj):
            found.add(obj)
        elif obj not in found.manifests:
            _count_skipped(found, obj.rpartition("/")[2])


def _list_named(found: _Discovery, roots: Sequence[str]) -> None:
    """ObjectInfo of the objects named one by one (PATHs, manifest lines) inside the roots; one listing
    per folder. An object outside the roots is not even listed (`_classify_object` refuses it)."""
    named = [p for p in found.paths if is_url(p) and p not in found.objects and within_roots(p, roots)]
    if named:
        found.objects.update(storage.list_named(named))


def _discover(paths: Iterable[str], roots: Sequence[str], found: _Discovery, prefixes: set[str]) -> None:
    for p in paths:
        path = p if is_url(p) else os.path.abspath(p)
        if path in prefixes:
            _discover_prefix(path, roots, found)
        elif is_url(path):
            found.add(path)
        elif os.path.isdir(path):
            if within_roots(os.path.realpath(path), roots):
                found.scanned_dirs.append(path)
                _walk(path, roots, found)
            else:
                found.bad[path] = OUTSIDE_ROOTS
        else:
            found.add(path)


def _location(path: str | Path) -> str:
    """Where a source really is, for the roots check: a URL as stored, a local path with symlinks resolved."""
    return path if isinstance(path, str) and is_url(path) else os.path.realpath(path)


def _as_source(path: str | Path) -> str:
    """A PATH, manifest or root as given: a URL checked and in its stored form (ConfigError naming it,
    credentials redacted, when it holds credentials or `..`, or no filesystem handles its scheme), else
    a local path made absolute. URLs must be str: pathlib would fold `s3://` into `s3:/`."""
    return storage.check_url(path) if isinstance(path, str) and is_url(path) else os.path.abspath(path)


def _default_roots(paths: Sequence[str], manifests: Sequence[tuple[str, ManifestKind | None]]) -> list[str]:
    roots = [_location(p) for p in paths]  # named directories, and named files themselves
    roots += [storage.parent(m) if is_url(m) else os.path.dirname(os.path.realpath(m)) for m, _ in manifests]
    return roots


def _is_manifest_name(path: Path) -> bool:
    return Path(path).suffix.lower() in MANIFEST_EXTENSIONS


def _refused_manifest(path: Path, configured: Sequence[str], summary: IngestSummary) -> bool:
    """True (and reported in `summary`, like an audio path outside the roots) when roots are configured
    and the manifest's real path lies outside them. Only resolves the name: the file is not opened."""
    if not configured or within_roots(_location(path), configured):
        return False
    summary.quarantined += 1
    summary.quarantine.append({"path": display_path(_as_source(path)), "reason": OUTSIDE_ROOTS})
    return True


def _split_manifests(
    paths: Sequence[str],
    manifests: Sequence[tuple[str, ManifestKind | None]],
    kind: ManifestKind | None,
    prefixes: set[str],
) -> tuple[list[str], list[tuple[str, ManifestKind | None]]]:
    """A *.jsonl file (or object) given as a PATH is a manifest (of `kind`, or inferred per line)."""
    audio_paths: list[str] = []
    by_path: dict[str, tuple[str, ManifestKind | None]] = {}
    for m, m_kind in manifests:
        by_path.setdefault(m, (m, m_kind))
    for p in paths:
        if _is_manifest_name(Path(p)) and (p not in prefixes if is_url(p) else os.path.isfile(p)):
            by_path.setdefault(p, (p, kind))
        else:
            audio_paths.append(p)
    return audio_paths, list(by_path.values())


def _load_known(
    conn: sa.Connection, found: _Discovery, explicit: Sequence[str], by_lines: dict[str, _Known]
) -> dict[str, _Known]:
    """Known audio_file rows under the scanned folders, or named explicitly (no per-file query), added
    to `by_lines` (the rows the manifests' stored lines point at, read earlier: `_read_stored`). Keyed by
    the name as the OS gives it (exact bytes when not UTF-8). Only explicit paths found neither way are
    sent to the database, so a nightly re-run of a 100k-line manifest does not send 100k paths."""
    t = schema.audio_file
    known = dict(by_lines)
    if found.scanned_dirs:
        prefixes = [
            t.c.path.startswith(path_prefix(display_path(d)), autoescape=True) for d in found.scanned_dirs
        ]
        known.update(_select_known(conn, sa.select().where(sa.or_(*prefixes))))
    rest = [p for p in explicit if p not in known]
    if rest:
        by_path = sa.select().where(t.c.path == sa.any_(_array([display_path(p) for p in rest], sa.Text)))
        known.update(_select_known(conn, by_path))
    return known


def _select_known(conn: sa.Connection, query: sa.Select) -> dict[str, _Known]:
    """The audio_file rows `query` finds (a SELECT with FROM and WHERE but no columns yet), as _Known.
    A file named by several lines comes back several times; the dict keeps one."""
    t = schema.audio_file
    columns = (t.c.path, t.c.path_bytes, t.c.id, t.c.size_bytes, t.c.mtime_ns, t.c.status, t.c.audio_id)
    # one row of arrays: psycopg2 parses arrays in C, where 100k result rows cost a Python object each
    row = conn.execute(
        query.add_columns(*(sa.func.array_agg(c) for c in (*columns, t.c.root, t.c.etag)))
    ).one()
    if row[0] is None:
        return {}
    paths = row[0]
    if row[1].count(None) != len(row[1]):  # names that are not UTF-8: the exact bytes are the key
        paths = [p if b is None else os.fsdecode(bytes(b)) for p, b in zip(row[0], row[1], strict=True)]
    return dict(zip(paths, map(_Known._make, zip(*row[2:], strict=True)), strict=True))


def _array(
    values: Sequence[object], item_type: type[sa.types.TypeEngine] | sa.types.TypeEngine
) -> sa.BindParameter:
    """One array parameter for `= ANY(...)`: a 100k-long IN list would render 100k placeholders."""
    return sa.bindparam(None, list(values), type_=ARRAY(item_type))


def audio_row(checked: CheckedAudio) -> dict[str, object]:
    """The `audio` row of a checked file: its content's identity and what its header says."""
    p = checked.probe
    return {
        "sha256": checked.sha256,
        "size_bytes": checked.size_bytes,
        "duration_s": p.duration_s,
        "sample_rate": p.sample_rate,
        "channels": p.channels,
        "frames": p.frames,
        "format": p.format,
        "subtype": p.subtype,
    }


def _file_row(path: str, **values: object) -> dict[str, object]:
    """An audio_file row for `path` (the OS's form): readable text, plus the exact bytes (as hex, see
    _rows_param) when not UTF-8."""
    shown = display_path(path)
    return {"path": shown, "path_bytes": os.fsencode(path).hex() if shown != path else None, **values}


def _rows_param(rows: Sequence[object]) -> str:
    """Rows (dicts) or values as one JSON text parameter, unpacked by the database (_recordset, _values).

    psycopg2 adapts a list parameter element by element in Python (about 0.6 us a value, with the GIL
    held); json.dumps encodes the whole chunk in C, about ten times faster, and the server parses it in C.
    Text goes as UTF-8 (display_path and the manifest checks guarantee valid strings without NUL), a
    number as its exact decimal form; allow_nan=False because JSON has no NaN.
    """
    return json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _recordset(columns: Sequence[sa.ColumnClause], param: str = "rows") -> tuple[sa.TableValuedAlias, dict]:
    """The rows in JSON parameter `param` as a table (json_to_recordset) with `columns` (table columns, or
    sa.column(name, type)), and each column's value as stored: bytea travels as hex text, jsonb as the
    JSON text to store (cast by the database, so a manifest line is stored as written)."""

    def travels_as_text(c: sa.ColumnClause) -> bool:
        return isinstance(c.type, sa.LargeBinary | JSONB)

    fields = [sa.column(c.name, sa.Text if travels_as_text(c) else c.type) for c in columns]
    json_rows = sa.cast(sa.bindparam(param, type_=sa.Text), JSON)
    u = sa.func.json_to_recordset(json_rows).table_valued(*fields).render_derived("u", with_types=True)
    values = {
        c.name: sa.func.decode(u.c[c.name], "hex")
        if isinstance(c.type, sa.LargeBinary)
        else sa.cast(u.c[c.name], c.type)
        if travels_as_text(c)
        else u.c[c.name]
        for c in columns
    }
    return u, values


def _as_arrays(stmt: sa.Insert, columns: Sequence[sa.Column]) -> sa.Select:
    """`stmt` RETURNING `columns`, fetched as one row of arrays (psycopg2 parses arrays in C instead of
    building a result row per written row)."""
    written = stmt.returning(*columns).cte("written")
    return sa.select(*(sa.func.array_agg(written.c[c.name]) for c in columns))


# The statements a chunk runs are built once (functools.cache): SQLAlchemy then finds their compiled form
# without walking them again (building them per chunk cost about 1 ms of cache-key work per execution).
_AUDIO_COLUMNS = (
    "sha256",
    "size_bytes",
    "duration_s",
    "sample_rate",
    "channels",
    "frames",
    "format",
    "subtype",
)
_FILE_COLUMNS = ("path", "path_bytes", "size_bytes", "mtime_ns", "status", "reason", "root", "etag")


@functools.cache
def _insert_audio() -> sa.Select:
    """Insert the audio rows whose sha256 is not stored yet; returns the sha256s inserted. (ON CONFLICT
    DO NOTHING covers a concurrent ingest storing the same content meanwhile; NOT EXISTS first, so stored
    content does not use up ids.)"""
    a = schema.audio
    u, values = _recordset([a.c[n] for n in _AUDIO_COLUMNS])
    stored = a.alias("stored")
    stored_id = sa.select(stored.c.id).where(stored.c.sha256 == u.c.sha256).scalar_subquery()
    new = sa.select(*values.values()).where(stored_id.is_(None))  # (a subquery: see _upsert_files)
    stmt = (
        pg_insert(a).from_select(list(_AUDIO_COLUMNS), new).on_conflict_do_nothing(index_elements=["sha256"])
    )
    return _as_arrays(stmt, [a.c.sha256])


@functools.cache
def _upsert_files() -> sa.Select:
    """Upsert audio_file rows on path; audio_id is looked up by the row's sha256 (NULL for quarantined
    rows). Returns (path, id, audio_id) of every row written."""
    f, a = schema.audio_file, schema.audio
    u, values = _recordset([*(f.c[n] for n in _FILE_COLUMNS), sa.column("sha256", sa.Text)])
    # a scalar subquery, not a join: an index lookup per row whatever the planner thinks of the row
    # count (it guesses 100 rows for json_to_recordset and would scan the whole table for a join)
    audio_id = sa.select(a.c.id).where(a.c.sha256 == u.c.sha256).scalar_subquery()
    rows = sa.select(*(values[n] for n in _FILE_COLUMNS), audio_id)
    stmt = pg_insert(f).from_select([*_FILE_COLUMNS, "audio_id"], rows)
    update = [*_FILE_COLUMNS[1:], "audio_id"]
    stmt = stmt.on_conflict_do_update(
        index_elements=["path"], set_={**{c: stmt.excluded[c] for c in update}, "last_seen": sa.func.now()}
    )
    return _as_arrays(stmt, [f.c.path, f.c.id, f.c.audio_id])


_Written = tuple[set[str], dict[str, tuple[int, int | None]]]  # see _Writer.write


class _Batch(NamedTuple):
    """One chunk of files, judged and turned into JSON rows (in the main thread), to be written in one
    transaction (in the writer thread)."""

    ok: list[CheckedAudio]
    bad: list[tuple[str, str, os.stat_result | None]]
    audio_rows: str | None  # JSON: one row per distinct content
    file_rows: str  # JSON: one row per path, with its sha256 (NULL when quarantined)
    line_rows: list[dict[str, object]]  # manifest lines about these paths whose stored row differs


class _Writer:
    """Prepares chunks of judged files, writes each in one transaction, and keeps the run's counts.

    `prepare` and `account` run in the calling thread; `write` (the database work only) in a writer
    thread, so chunk k is written while chunk k+1 is checked and prepared.
    """

    def __init__(
        self,
        engine: Engine,
        known: dict[str, _Known],
        roots: dict[str, str],
        summary: IngestSummary,
        lines: dict[str, list[ManifestItem]],
        stored_lines: dict[str, dict[int, tuple[object, ...]]],
    ) -> None:
        self.engine = engine
        self.known = known
        self.roots = roots  # path -> the allowed root that admitted it
        self.summary = summary
        self.file_ids: dict[str, int] = {}  # audio_file id of each row written (stored path form)
        # manifest lines by audio path, not written yet: a chunk writes the lines about its files in the
        # same transaction (so they are written while the next chunk is checked, not all at the end)
        self.lines = lines
        self.stored_lines = stored_lines

    def prepare(self, ok: list[CheckedAudio], bad: list[tuple[str, str, os.stat_result | None]]) -> _Batch:
        audio_rows: dict[str, dict[str, object]] = {}
        file_rows = []
        roots = self.roots
        for c in ok:
            if c.sha256 not in audio_rows:
                audio_rows[c.sha256] = audio_row(c)
            row = _file_row(c.path, size_bytes=c.size_bytes, mtime_ns=c.mtime_ns, status=AudioStatus.OK)
            row.update(reason=None, root=roots.get(c.path), sha256=c.sha256, etag=c.etag)
            file_rows.append(row)
        for path, reason, st in bad:
            size, mtime = (st.st_size, st.st_mtime_ns) if st is not None else (None, None)
            row = _file_row(
                path, size_bytes=size, mtime_ns=mtime, status=AudioStatus.QUARANTINED, reason=reason
            )
            row.update(root=roots.get(path), sha256=None, etag=None)
            file_rows.append(row)
        line_rows: list[dict[str, object]] = []
        if self.lines:
            lines = [line for c in ok for line in self.lines.pop(c.path, ())]
            lines += [line for path, _, _ in bad for line in self.lines.pop(path, ())]
            known = self.known
            file_ids = {line.audio_path: k.id for line in lines if (k := known.get(line.audio_path))}
            line_rows = _pending_lines(lines, self.stored_lines, file_ids)
        # sorted by sha256: two transactions inserting the same contents wait for each other in one order
        audio = _rows_param(sorted(audio_rows.values(), key=lambda r: r["sha256"])) if audio_rows else None
        return _Batch(ok, bad, audio, _rows_param(file_rows), line_rows)

    def write(self, batch: _Batch) -> _Written:
        """The database work of one chunk, in one transaction: the sha256s inserted, and path (stored
        form) -> (audio_file id, audio_id) of every row written."""
        with transaction(self.engine) as conn:
            inserted: set[str] = set()
            if batch.audio_rows is not None:
                inserted = set(conn.execute(_insert_audio(), {"rows": batch.audio_rows}).scalar_one() or ())
            paths, ids, audio_ids = conn.execute(_upsert_files(), {"rows": batch.file_rows}).one()
            if batch.line_rows:
                _upsert_manifest_lines(conn, batch.line_rows)
        return inserted, dict(zip(paths, zip(ids, audio_ids, strict=True), strict=True))

    def account(self, batch: _Batch, written: _Written) -> None:
        """Count a written chunk: each path once, as unchanged / changed / duplicate / new / quarantined."""
        inserted, rows = written
        summary = self.summary
        seen: set[str] = set()
        for c in batch.ok:
            file_id, audio_id = rows[display_path(c.path)]
            if audio_id is None:  # cannot happen: the chunk inserted the content, or it was stored already
                raise RuntimeError(f"no audio row for {display_path(c.path)} ({c.sha256})")
            prev = self.known.get(c.path)
            if prev is not None and prev.status == AudioStatus.OK:
                if prev.audio_id == audio_id:
                    summary.unchanged += 1
                else:
                    summary.changed += 1
            elif c.sha256 in inserted and c.sha256 not in seen:
                summary.new += 1
            else:
                summary.duplicate += 1
            seen.add(c.sha256)
        for path, reason, _ in batch.bad:
            summary.quarantined += 1
            summary.quarantine.append({"path": display_path(path), "reason": reason})
        self.file_ids.update((path, file_id) for path, (file_id, _) in rows.items())


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _check(path: str, objects: dict[str, storage.ObjectInfo]) -> CheckedAudio | AudioError:
    """check_file (check_object for a URL, with its listed size), with any surprise turned into a
    quarantine reason: one file never stops the run."""
    try:
        if is_url(path):
            listed = objects.get(path)
            return check_object(path, listed.size if listed is not None else None)
        return check_file(path)
    except AudioError as exc:
        return exc
    except StorageUnavailable:  # not the file's fault: the run stops (what is written stays), no quarantine
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. MemoryError on a corrupt header; the file fails alone
        return AudioError(path, f"unexpected error: {type(exc).__name__}: {exc}")


def _check_all(paths: list[str], objects: dict[str, storage.ObjectInfo]) -> list[CheckedAudio | AudioError]:
    return [_check(p, objects) for p in paths]


def _unchanged(prev: _Known | None, size: int, mtime_ns: int | None, etag: str | None = None) -> bool:
    """The stored row was ok and has the same size, mtime and (objects) ETag: the content is not read."""
    return (
        prev is not None
        and prev.status == AudioStatus.OK
        and (prev.size_bytes, prev.mtime_ns, prev.etag) == (size, mtime_ns, etag)
    )


def _classify_object(
    url: str, info: storage.ObjectInfo | None, roots: _Roots, known: dict[str, _Known]
) -> tuple[str, str | None, None, str | None]:
    """_classify for an object, from its listing alone: unchanged when the stored row was ok with the same
    size, ETag and last-modified time (at least one of the last two known), so it is not downloaded."""
    root = roots.root_of(url)
    if root is None:
        return "bad", OUTSIDE_ROOTS, None, None
    if info is None:
        return "bad", "no such object", None, root
    if (info.etag, info.mtime_ns) != (None, None) and _unchanged(
        known.get(url), info.size, info.mtime_ns, info.etag
    ):
        return "unchanged", None, None, root
    return "check", None, None, root


def _classify(
    path: str, real_dir: str | None, roots: _Roots, known: dict[str, _Known]
) -> tuple[str, str | None, os.stat_result | None, str | None]:
    """('unchanged' | 'check' | 'bad', reason, stat, root) from one lstat (two for a symlink), never
    opening the file. `real_dir`: the real folder holding `path` when walking found it."""
    try:
        st = os.stat(path) if real_dir is not None else os.lstat(path)
    except OSError as exc:
        st_error: OSError | None = exc
        st = None
    except ValueError:  # an embedded NUL (manifest lines with one are refused earlier; belt and braces)
        return "bad", "invalid path", None, None
    else:
        st_error = None
    if real_dir is None and st is not None and not stat.S_ISLNK(st.st_mode):
        real_dir = roots.real_dir(path.rpartition("/")[0] or "/")  # `path` is absolute and normalised
    if real_dir is not None:
        root = roots.root_of_dir(real_dir)  # every root holding the folder holds its plain entries
        if root is None:  # a file named as a root itself (`ingest /data/x.wav`)
            name = path.rpartition("/")[2]
            root = roots.root_of(real_dir + name if real_dir.endswith("/") else f"{real_dir}/{name}")
    else:  # a symlink, or a path that cannot be stat'ed: resolve it to judge where it points
        root = roots.root_of(os.path.realpath(path))
    if root is None:
        return "bad", OUTSIDE_ROOTS, None, None  # never read: not even its size is recorded
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError as exc:
            st, st_error = None, exc
    if st is None:
        assert st_error is not None
        return "bad", os_error_reason(path, st_error), None, root
    if stat.S_ISDIR(st.st_mode):
        return "bad", "is a directory", st, root
    if _unchanged(known.get(path), st.st_size, st.st_mtime_ns):
        return "unchanged", None, st, root
    return "check", None, st, root


def _mark_missing(
    conn: sa.Connection, found: _Discovery, known: dict[str, _Known], summary: IngestSummary
) -> None:
    """Known paths under a fully scanned folder that are gone from disk become status 'missing'."""
    skip = tuple(path_prefix(d) for d in found.unreadable_dirs)
    prefixes = tuple(path_prefix(d) for d in found.scanned_dirs if d not in found.unreadable_dirs)
    if not prefixes:
        return
    gone = [
        k.id
        for path, k in known.items()
        if k.status != AudioStatus.MISSING
        and path.startswith(prefixes)
        and not (skip and path.startswith(skip))
        and path not in found.paths
        and path not in found.bad
        and (is_url(path) or not os.path.lexists(path))  # a prefix's listing is complete: not in it, gone
    ]
    if gone:
        t = schema.audio_file
        conn.execute(
            sa.update(t)
            .where(t.c.id.in_(gone))
            .values(status=AudioStatus.MISSING, audio_id=None, reason="file no longer exists")
        )
        summary.missing += len(gone)


_WHITESPACE = re.compile(r"\s+")


def _find_conflicts(items: Sequence[ManifestItem]) -> list[dict[str, object]]:
    """Lines that give an audio a different answer than an earlier line of this run: a different `gt` for
    the same (path, question), read as yes/no where it says yes or no, or a different ASR reference `text`
    for the same path. Both lines are stored, but only one of them can serve as gold, so each is reported
    (as a warning naming both lines) rather than resolved silently."""
    first: dict[tuple[object, ...], tuple[ManifestItem, str]] = {}
    warnings: list[dict[str, object]] = []
    for item in items:
        if item.kind == "asr":
            key: tuple[object, ...] = ("asr", item.audio_path)
            field_name, value = "text", _WHITESPACE.sub(" ", (item.reference_text or "").strip())
        elif item.gt is not None:
            key = ("aqa", item.audio_path, item.question)
            field_name, value = "gt", item.gold_label or _WHITESPACE.sub(" ", item.gt.strip()).casefold()
        else:
            continue
        earlier = first.setdefault(key, (item, value))
        if earlier[0] is item or earlier[1] == value:
            continue
        prev = earlier[0]
        shown_prev = prev.reference_text if item.kind == "asr" else prev.gt
        shown = item.reference_text if item.kind == "asr" else item.gt
        same_file = prev.manifest_path == item.manifest_path
        where = f"line {prev.line_no}" if same_file else f"{prev.manifest_path}:{prev.line_no}"
        warnings.append(
            {
                "manifest": item.manifest_path,
                "line": item.line_no,
                "reason": f"conflicting {field_name} for {item.audio_path}: {shown!r} here, {shown_prev!r} "
                f"at {where}; only one can be used as the reference",
            }
        )
    return warnings


_MANIFEST_COLUMNS = (
    "manifest_path", "line_no", "kind", "audio_path", "audio_file_id", "reference_text", "language",
    "question", "gt", "gold_label", "source", "raw", "line_hash",
)  # fmt: skip
_TEXT_FIELDS = ("kind", "audio_path", "reference_text", "language", "question", "gt", "gold_label", "source")


@functools.cache
def _manifest_upsert() -> sa.Insert:
    """INSERT ... SELECT FROM json_to_recordset(rows) ... ON CONFLICT DO UPDATE: many lines in one
    statement with one JSON parameter (see _rows_param); audio_file_id is looked up by the line's audio
    path (a manifest path is UTF-8, so its stored form is its own)."""
    m, f = schema.manifest_item, schema.audio_file
    u, values = _recordset([m.c[n] for n in _MANIFEST_COLUMNS if n != "audio_file_id"])
    values["audio_file_id"] = sa.select(f.c.id).where(f.c.path == u.c.audio_path).scalar_subquery()
    rows = sa.select(*(values[n] for n in _MANIFEST_COLUMNS))  # (a subquery: see _upsert_files)
    stmt = pg_insert(m).from_select(list(_MANIFEST_COLUMNS), rows)
    return stmt.on_conflict_do_update(
        index_elements=["manifest_path", "line_no"],
        set_={**{c: stmt.excluded[c] for c in _MANIFEST_COLUMNS[2:]}, "ingested_at": sa.func.now()},
    )


def _manifest_row(item: ManifestItem, hash_: int) -> dict[str, object]:
    row: dict[str, object] = {name: getattr(item, name) for name in _TEXT_FIELDS}
    row.update(manifest_path=item.manifest_path, line_no=item.line_no, raw=item.line, line_hash=hash_)
    return row


def _pending_lines(
    lines: Iterable[ManifestItem],
    stored_lines: dict[str, dict[int, tuple[object, ...]]],
    file_ids: dict[str, int],
) -> list[dict[str, object]]:
    """Rows for the lines whose stored row differs (hash, kind, gold label or audio_file id) or is absent:
    a nightly re-run of an unchanged manifest writes nothing. `file_ids`: path -> audio_file id of the
    paths known before this chunk is written; a path without one gets a new row, so its lines are written."""
    rows = []
    for item in lines:
        file_id = file_ids.get(item.audio_path)
        hash_ = line_hash(item.line)
        stored = stored_lines.get(item.manifest_path)
        if (
            file_id is None
            or stored is None
            or stored.get(item.line_no) != (item.kind, item.gold_label, file_id, hash_)
        ):
            rows.append(_manifest_row(item, hash_))
    return rows


def _upsert_manifest_lines(conn: sa.Connection, rows: list[dict[str, object]]) -> None:
    for i in range(0, len(rows), MANIFEST_CHUNK):
        conn.execute(_manifest_upsert(), {"rows": _rows_param(rows[i : i + MANIFEST_CHUNK])})


def _stored_lines(conn: sa.Connection, manifest_path: str) -> dict[int, tuple[object, ...]]:
    """line_no -> (kind, gold_label, audio_file_id, line_hash) of a manifest's stored rows.

    Fetched as one row of arrays (array_agg): psycopg2 parses arrays in C, where 100k result rows would
    cost a Python object each (about 4x the time)."""
    t = schema.manifest_item
    columns = (t.c.line_no, t.c.kind, t.c.gold_label, t.c.audio_file_id, t.c.line_hash)
    row = conn.execute(
        sa.select(*(sa.func.array_agg(c) for c in columns)).where(t.c.manifest_path == manifest_path)
    ).one()
    if row[0] is None:
        return {}
    return dict(zip(row[0], zip(*row[1:], strict=True), strict=True))


@dataclass
class _Stored:
    """What the database holds for this run's manifests: the audio_file rows their lines point at, and
    per manifest, line_no -> (kind, gold_label, audio_file_id, line_hash) of each stored line."""

    files: dict[str, _Known] = field(default_factory=dict)
    lines: dict[str, dict[int, tuple[object, ...]]] = field(default_factory=dict)


def _read_stored(engine: Engine, manifest_paths: Sequence[str]) -> _Stored:
    """Read-only, and independent of the lines being parsed, so it runs while they are (see ingest())."""
    t, m = schema.audio_file, schema.manifest_item
    with transaction(engine) as conn:
        # a join, not IN (...): it stays fast when the planner's statistics are stale (just after a bulk
        # ingest); a file named by several lines comes back several times and the dict keeps one
        by_lines = sa.select().join_from(m, t, t.c.id == m.c.audio_file_id)
        files = _select_known(
            conn, by_lines.where(m.c.manifest_path == sa.any_(_array(manifest_paths, sa.Text)))
        )
        return _Stored(files, {path: _stored_lines(conn, path) for path in manifest_paths})


def _write_manifest_items(
    engine: Engine,
    items: list[ManifestItem],
    unwritten: Iterable[ManifestItem],
    stored_lines: dict[str, dict[int, tuple[object, ...]]],
    file_ids: dict[str, int],
) -> None:
    """Drop rows of lines that are gone or no longer valid (not among `items`, this run's valid lines),
    then upsert on (manifest_path, line_no) the `unwritten` lines (those the file chunks did not write
    already: lines about unchanged files, mostly) whose stored row differs. `file_ids`: path ->
    audio_file id, for every path this run looked at (known before, or written now)."""
    t = schema.manifest_item
    current: dict[str, set[int]] = {m: set() for m in stored_lines}
    for item in items:
        current.setdefault(item.manifest_path, set()).add(item.line_no)
    for manifest_path, line_nos in current.items():
        stale = stored_lines.get(manifest_path, {}).keys() - line_nos
        if stale:
            with transaction(engine) as conn:
                conn.execute(
                    sa.delete(t).where(
                        t.c.manifest_path == manifest_path,
                        t.c.line_no == sa.any_(_array(sorted(stale), sa.Integer)),
                    )
                )
    pending = _pending_lines(unwritten, stored_lines, file_ids)
    for i in range(0, len(pending), MANIFEST_CHUNK):
        with transaction(engine) as conn:
            _upsert_manifest_lines(conn, pending[i : i + MANIFEST_CHUNK])


def _drop_name_collisions(found: _Discovery, summary: IngestSummary) -> None:
    """A name that is not UTF-8 is stored under its readable \\xNN form. Should that form be the exact
    name of another file found in this run (a file literally named `a\\xff.wav`), the two would share
    one row: the undecodable one is reported as quarantined and not stored."""
    for table in (found.paths, found.bad):
        for path in [p for p in table if not p.isascii() and display_path(p) != p]:
            if display_path(path) in found.paths or display_path(path) in found.bad:
                del table[path]
                summary.quarantined += 1
                summary.quarantine.append(
                    {
                        "path": display_path(path),
                        "reason": "file name is not valid UTF-8 and its \\xNN form is another file's name; "
                        "not stored (rename one of them)",
                    }
                )


def _record_roots(conn: sa.Connection, roots: Sequence[tuple[int, str]]) -> None:
    """Set audio_file.root for unchanged rows whose admitting root is new (one UPDATE ... FROM unnest)."""
    t = schema.audio_file
    ids = _array([file_id for file_id, _ in roots], sa.BigInteger)
    u = sa.func.unnest(ids, _array([root for _, root in roots], sa.Text)).table_valued("id", "root")
    u = u.render_derived("u")
    conn.execute(sa.update(t).values(root=u.c.root).where(t.c.id == u.c.id))


def ingest(
    engine: Engine,
    paths: Sequence[Path | str],
    manifests: Sequence[tuple[Path | str, ManifestKind | None]] = (),
    roots: Sequence[Path | str] = (),
    progress: Progress | None = None,
    *,
    kind: ManifestKind | None = None,
    chunk_size: int = CHUNK_SIZE,
    workers: int | None = None,
    dataset: str | None = None,
    split: str | None = None,
    tasks: Sequence[str] | None = None,
) -> IngestSummary:
    """Register audio under `paths` (folders scanned recursively, audio files, *.jsonl manifests) and the
    `manifests` given as (path, kind or None to infer per line). Returns the run's summary. Any of them
    may be an object-storage URL as a str (`s3://bucket/prefix`, `s3://bucket/m.jsonl`; see `sources`).

    Every source joins a dataset (`qwen_tasks.ingest.datasets`): `dataset`, else its own default name
    (manifest stem, folder name); `split` (None: an existing dataset keeps its own, a new one is train)
    and `tasks` (None: a manifest's kind gives its task, a folder gets both).

    Allowed roots: `roots`, else QWEN_TASKS_ALLOWED_ROOTS, else the paths given plus each manifest's
    folder. They govern manifests too: a manifest whose real path is outside configured roots is refused
    like an audio path (`quarantine`, reason "outside allowed roots") and never opened, since a DAG form
    could otherwise name any file the worker can read (/etc/passwd, /proc/self/environ) and have its
    lines stored. Raises ConfigError when a path does not exist or a dataset option is invalid (nothing is
    written then) and DatabaseUnavailable when the database fails; bad audio never raises.

    Phases: the sources listed and checked (`_list_sources`), the manifests read (`_read_manifests`),
    the datasets planned (`_plan_datasets`), the files found (`_find_files`) and sorted against what is
    stored (`_triage`), the files registered or quarantined (`_check_and_write`), then the missing files,
    the manifest lines (`_write_manifests`) and the datasets recorded.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    summary = IngestSummary()
    src = _list_sources(paths, manifests, roots, kind, summary)
    items, stored = _read_manifests(engine, src, summary)
    sources = _plan_datasets(engine, src, items, name=dataset, split=split, tasks=tasks)
    found = _find_files(src, items, summary)
    explicit = [p for p, real_dir in found.paths.items() if real_dir is None]  # not found by walking
    with transaction(engine) as conn:  # connection loss -> DatabaseUnavailable, like every write
        known = _load_known(conn, found, explicit, stored.files)
    todo = _triage(found, known, src.allowed, summary)
    lines_by_path, unwritten = _split_lines(items, todo)
    if todo.new_roots:
        with transaction(engine) as conn:
            _record_roots(conn, todo.new_roots)
    writer = _Writer(engine, known, todo.admitted, summary, lines_by_path, stored.lines)
    _check_and_write(writer, found, todo, chunk_size=chunk_size, workers=workers, progress=progress)
    with transaction(engine) as conn:
        _mark_missing(conn, found, known, summary)
    if items or stored.lines:
        _write_manifests(engine, items, unwritten, stored.lines, known, writer)
    with transaction(engine) as conn:
        summary.datasets = datasets.record(conn, sources)
    return summary


@dataclass
class _Sources:
    """The sources of one ingest, checked: audio paths and manifests in their stored form (URLs checked,
    local paths absolute), the URLs that are prefixes (folders), and the allowed roots."""

    configured: list[str]  # roots configured (`roots`, else QWEN_TASKS_ALLOWED_ROOTS); empty: none
    allowed: list[str]  # the roots in force (configured, else the sources' own), as real locations
    audio_paths: list[str]
    manifests: list[tuple[str, ManifestKind | None]]
    prefixes: set[str]

    @property
    def manifest_paths(self) -> list[str]:
        return [m for m, _ in self.manifests]


def _list_sources(
    paths: Sequence[Path | str],
    manifests: Sequence[tuple[Path | str, ManifestKind | None]],
    roots: Sequence[Path | str],
    kind: ManifestKind | None,
    summary: IngestSummary,
) -> _Sources:
    """The sources listed: URLs checked (ConfigError) before anything is written, manifests outside
    configured roots refused (in `summary`) before anything else looks at them (their existence
    included: a form user learns nothing about files elsewhere), missing local paths a ConfigError,
    *.jsonl PATHs taken as manifests of `kind`, and the allowed roots settled."""
    configured = [_location(_as_source(r)) for r in roots] or list(get_settings().allowed_roots)
    given = [_as_source(p) for p in paths]
    given_manifests = [(_as_source(m), k) for m, k in manifests]
    given_manifests = [(m, k) for m, k in given_manifests if not _refused_manifest(m, configured, summary)]
    given = [
        p for p in given if not (_is_manifest_name(Path(p)) and _refused_manifest(p, configured, summary))
    ]
    prefixes: set[str] = set()  # the URLs given that are prefixes (folders), not objects
    for p in [*given, *(m for m, _ in given_manifests)]:
        if is_url(p):
            if storage.is_prefix(p):  # ConfigError when it names nothing
                prefixes.add(p)
        elif not os.path.lexists(p):
            raise ConfigError(f"no such file or directory: {p}")
    audio_paths, all_manifests = _split_manifests(given, given_manifests, kind, prefixes)
    allowed = configured or _default_roots(audio_paths, all_manifests)
    return _Sources(configured, [_location(r) for r in allowed], audio_paths, all_manifests, prefixes)


def _read_manifests(
    engine: Engine, src: _Sources, summary: IngestSummary
) -> tuple[list[ManifestItem], _Stored]:
    """The manifests' valid lines (errors and conflicting lines reported in `summary`), and what the
    database holds for them. The database reads while this thread parses the lines (psycopg2 waits for
    the server without the GIL): a fifth of an unchanged 100k-line re-run."""
    items: list[ManifestItem] = []
    manifest_paths = src.manifest_paths
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-read") as early:
        reading = early.submit(_read_stored, engine, manifest_paths) if manifest_paths else None
        for manifest_path, manifest_kind in src.manifests:
            for entry in read_manifest(manifest_path, manifest_kind, roots=src.configured or None):
                if isinstance(entry, ManifestError):
                    summary.manifest_errors.append(entry.to_dict())
                else:
                    items.append(entry)
        stored = reading.result() if reading is not None else _Stored()
    summary.manifest_items = len(items)
    summary.manifest_warnings = _find_conflicts(items)
    summary.manifest_conflicts = len(summary.manifest_warnings)
    return items, stored


def _plan_datasets(
    engine: Engine,
    src: _Sources,
    items: Sequence[ManifestItem],
    *,
    name: str | None,
    split: str | None,
    tasks: Sequence[str] | None,
) -> datasets.DatasetPlan:
    """Which dataset each source joins (`datasets.plan_sources`), checked against the stored splits
    before anything is written (ConfigError)."""
    manifest_kinds: dict[str, set[str]] = {}
    for item in items:
        manifest_kinds.setdefault(item.manifest_path, set()).add(item.kind)
    audio_paths = src.audio_paths
    folders = [p for p in audio_paths if p in src.prefixes or (not is_url(p) and os.path.isdir(p))]
    sources = datasets.plan_sources(
        [display_path(p) for p in folders],
        [display_path(p) for p in audio_paths if p not in folders],
        list(src.manifests),
        name=name,
        split=split,
        tasks=tasks,
        manifest_kinds=manifest_kinds,
    )
    with transaction(engine) as conn:
        datasets.check_splits(conn, sources)
    return sources


def _find_files(src: _Sources, items: Sequence[ManifestItem], summary: IngestSummary) -> _Discovery:
    """Every candidate path: folders walked, prefixes listed, files named as PATHs or by manifest lines
    (objects among them listed), names that would collide once stored dropped (in `summary`)."""
    found = _Discovery(skipped=summary.skipped, manifests=frozenset(src.manifest_paths))
    _discover(src.audio_paths, src.allowed, found, src.prefixes)
    for item in items:
        found.add(item.audio_path)
    _list_named(found, src.allowed)
    _drop_name_collisions(found, summary)
    return found


class _Todo(NamedTuple):
    """What `_triage` decided: the files to check (read and hash), those already bad, the unchanged rows
    whose admitting root is new, and path -> the root that admitted it."""

    to_check: list[str]
    early_bad: list[tuple[str, str, os.stat_result | None]]
    new_roots: list[tuple[int, str]]
    admitted: dict[str, str]


def _triage(
    found: _Discovery, known: dict[str, _Known], allowed: Sequence[str], summary: IngestSummary
) -> _Todo:
    """Each path found as unchanged (counted in `summary`, not written at all: a nightly run over an
    unchanged tree is read-only), bad (quarantined without reading it) or to check; from one lstat or
    the listing, never opening the file."""
    todo = _Todo([], [(path, reason, None) for path, reason in found.bad.items()], [], {})
    checker = _Roots(allowed)
    for path, real_dir in found.paths.items():
        if is_url(path):
            verdict, reason, st, root = _classify_object(path, found.objects.get(path), checker, known)
        else:
            verdict, reason, st, root = _classify(path, real_dir, checker, known)
        if root is not None:
            todo.admitted[path] = root
        if verdict == "unchanged":
            summary.unchanged += 1
            prev = known[path]
            if root is not None and prev.root != root:  # rows from before migration 0006, or new roots
                todo.new_roots.append((prev.id, root))
        elif verdict == "bad":
            todo.early_bad.append((path, reason or "unknown", st))
        else:
            todo.to_check.append(path)
    return todo


def _split_lines(
    items: Sequence[ManifestItem], todo: _Todo
) -> tuple[dict[str, list[ManifestItem]], list[ManifestItem]]:
    """The manifest lines about files to write (by path: each chunk writes its files' lines in its own
    transaction), and the rest (lines about unchanged files), written at the end."""
    lines_by_path: dict[str, list[ManifestItem]] = {}
    unwritten: list[ManifestItem] = []
    if items:
        to_write = set(todo.to_check).union(path for path, _, _ in todo.early_bad)
        for item in items:
            if item.audio_path in to_write:
                lines_by_path.setdefault(item.audio_path, []).append(item)
            else:
                unwritten.append(item)
    return lines_by_path, unwritten


def _check_and_write(
    writer: _Writer,
    found: _Discovery,
    todo: _Todo,
    *,
    chunk_size: int,
    workers: int | None,
    progress: Progress | None,
) -> None:
    """Register or quarantine the files: the bad ones as they are, the others checked (hash, probe) in
    chunks by a thread pool of `workers` threads and written chunk by chunk (`_Writer`).

    Pipelined: while the writer thread writes chunk k (psycopg2 releases the GIL while Postgres works),
    the pool checks chunk k+1 and this thread turns it into rows, so the database's work and ours overlap
    instead of adding up. At most one chunk is being written at a time. A task is a slice of a chunk, not
    a file: 10,000 futures cost more than the GIL-bound checks of small files they would spread; four
    slices per thread keep the threads evenly busy.
    """
    to_check, early_bad = todo.to_check, todo.early_bad
    total = len(found.paths) + len(found.bad)
    done = total - len(to_check)
    if progress:
        progress(done, total)
    n_workers = workers or DEFAULT_WORKERS
    chunks = [to_check[i : i + chunk_size] for i in range(0, len(to_check), chunk_size)]
    with (
        ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ingest") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-write") as writing,
    ):

        def submit(chunk: list[str]) -> list[Future[list[CheckedAudio | AudioError]]]:
            step = max(1, -(-len(chunk) // (4 * n_workers)))
            return [
                pool.submit(_check_all, chunk[i : i + step], found.objects)
                for i in range(0, len(chunk), step)
            ]

        in_flight: tuple[_Batch, Future[_Written], int] | None = None

        def finish_write() -> None:
            """Wait for the chunk being written, count it, and report progress."""
            nonlocal in_flight, done
            if in_flight is not None:
                batch, written, n_paths = in_flight
                in_flight = None
                writer.account(batch, written.result())
                done += n_paths
                if progress and n_paths:
                    progress(done, total)

        def hand_over(batch: _Batch, n_paths: int) -> None:
            nonlocal in_flight
            finish_write()
            in_flight = (batch, writing.submit(writer.write, batch), n_paths)

        for i in range(0, len(early_bad), chunk_size):  # already counted in `done`
            hand_over(writer.prepare([], early_bad[i : i + chunk_size]), 0)
        futures = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            results = [r for f in futures for r in f.result()]
            futures = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            ok, bad = _judged(chunk, results, found.objects)
            hand_over(writer.prepare(ok, bad), len(chunk))
        finish_write()


def _judged(
    chunk: Sequence[str], results: Sequence[CheckedAudio | AudioError], objects: dict[str, storage.ObjectInfo]
) -> tuple[list[CheckedAudio], list[tuple[str, str, os.stat_result | None]]]:
    """A checked chunk as (ok files, bad files with reason and stat). An object keeps the listing's ETag
    and time, as the next run's listing will say them: had the object changed between listing and
    download, the next run sees the change and re-checks it."""
    ok: list[CheckedAudio] = []
    bad: list[tuple[str, str, os.stat_result | None]] = []
    for path, result in zip(chunk, results, strict=True):
        if isinstance(result, AudioError):
            bad.append((path, result.reason, None if is_url(path) else _stat_or_none(path)))
        elif (listed := objects.get(path)) is not None:
            ok.append(dataclasses.replace(result, mtime_ns=listed.mtime_ns, etag=listed.etag))
        else:
            ok.append(result)
    return ok, bad


def _write_manifests(
    engine: Engine,
    items: list[ManifestItem],
    unwritten: list[ManifestItem],
    stored_lines: dict[str, dict[int, tuple[object, ...]]],
    known: dict[str, _Known],
    writer: _Writer,
) -> None:
    """The manifest lines the file chunks did not write (`_write_manifest_items`), with the audio_file id
    of every path this run looked at (known before, or written now; manifest paths are UTF-8)."""
    file_ids = {path: k.id for path, k in known.items()} | writer.file_ids
    unwritten = unwritten + [line for lines in writer.lines.values() for line in lines]  # none, normally
    _write_manifest_items(engine, items, unwritten, stored_lines, file_ids)

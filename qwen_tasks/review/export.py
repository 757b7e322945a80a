"""Export a run's labels as JSON Lines: one object per audio path, with what produced the label.

Users feed these files to other tools, so every row carries its provenance (model, revision, prompt
version, run id) and the reference / gold answer where a manifest gave one. Audio stored at several paths
(same bytes) gets one row per path, so a consumer can join on the path it knows.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets
from qwen_tasks.labelling.jobs import latest_run_ids
from qwen_tasks.store.schema import (
    audio_file,
    cry_answer,
    cry_run_clip,
    label_run,
    manifest_item,
    transcription,
)

log = logging.getLogger(__name__)


# The columns `_with_manifest_value` adds beside the value, by which `_in_path_order` picks the line.
_OWN_LINE, _LINE_ID = "manifest_own_line", "manifest_line_id"


def _with_manifest_value(
    query: sa.Select, column: sa.Column, kind: str, audio_id: Any, label: str
) -> sa.Select:
    """`query` (which selects from audio_file, one row per path) with the manifest's value for its path as
    `label`, as candidates that `_in_path_order` narrows to one row per path. The value for a path is the
    one of the newest line of `kind` naming this very path, else of the newest line naming any path with
    the same bytes: each row is joined to the lines of `kind` with a value for its clip (any path), and
    the pick (names this path, newest) rides on the sort by path the export makes anyway. PostgreSQL
    hashes the lines once for a large run or looks them up by index for a small one (its choice), where
    the rule as two DISTINCT ON subqueries (by path, by clip) sorted and hashed the manifest twice."""
    mf = audio_file.alias("mf")
    lines = (
        sa.select(mf.c.audio_id, manifest_item.c.audio_file_id, manifest_item.c.id, column.label("value"))
        .join(mf, mf.c.id == manifest_item.c.audio_file_id)
        .where(manifest_item.c.kind == kind, column.is_not(None), mf.c.audio_id.is_not(None))
        .subquery("lines")
    )
    return query.add_columns(
        lines.c.value.label(label),
        (lines.c.audio_file_id == audio_file.c.id).label(_OWN_LINE),
        lines.c.id.label(_LINE_ID),
    ).outerjoin(lines, lines.c.audio_id == audio_id)


def _in_path_order(select: sa.Select, q: sa.Subquery) -> sa.Select:
    """`select` over the rows `q` of `_query`, one per path (the manifest line picked), in path order. The
    rows are not narrowed in `q` itself so that PostgreSQL flattens it: what is selected over it (the JSON
    line) is then computed with the joins, in the parallel workers, not after the sort on the leader."""
    if _LINE_ID not in q.c:  # rows with their value already chosen (tests/export_reference.py)
        return select.order_by(q.c.path)
    return select.distinct(q.c.path).order_by(q.c.path, q.c[_OWN_LINE].desc(), q.c[_LINE_ID].desc())


def _asr_query(run_id: int) -> sa.Select:
    t = transcription
    query = (
        sa.select(
            audio_file.c.path,
            t.c.audio_id,
            t.c.text,
            t.c.language,
            t.c.windows,
        )
        .join(audio_file, sa.and_(audio_file.c.audio_id == t.c.audio_id, audio_file.c.status == "ok"))
        .where(t.c.run_id == run_id)
    )
    return _with_manifest_value(query, manifest_item.c.reference_text, "asr", t.c.audio_id, "reference")


def _cry_query(run_id: int) -> sa.Select:
    """The run's clips from `cry_run_clip` (0018: both methods' label, p_yes, threshold and p_calibrated
    side by side, one row per clip, kept by triggers), with what it does not hold (the generated answer's
    text, the score answer's calibration_id, either answer's windows) looked up in `cry_answer` by its
    unique key (run, clip, method), instead of scanning the run's answers twice and joining them."""
    r = cry_run_clip.c
    s, g = cry_answer.alias("s"), cry_answer.alias("g")
    query = (
        sa.select(
            audio_file.c.path,
            r.audio_id,
            r.s_p.label("score_p_yes"),
            r.s_label.label("score_label"),
            r.s_threshold.label("threshold"),
            s.c.calibration_id,
            r.s_calibrated.label("p_calibrated"),
            s.c.windows.label("score_windows"),
            g.c.raw_answer,
            r.g_p.label("gen_p_yes"),
            r.g_label.label("gen_label"),
            g.c.windows.label("gen_windows"),
        )
        .select_from(cry_run_clip)
        .join(audio_file, sa.and_(audio_file.c.audio_id == r.audio_id, audio_file.c.status == "ok"))
        .outerjoin(s, sa.and_(s.c.run_id == r.run_id, s.c.audio_id == r.audio_id, s.c.method == "score"))
        .outerjoin(g, sa.and_(g.c.run_id == r.run_id, g.c.audio_id == r.audio_id, g.c.method == "generate"))
        .where(r.run_id == run_id)
    )
    return _with_manifest_value(query, manifest_item.c.gold_label, "aqa", r.audio_id, "gold")


# random_page_cost of an export's transaction. At PostgreSQL's default (4, a disk seeking per page read
# at random) the planner hashed every manifest line of the task and the audio_file table (1 M rows) to
# join a run's rows to them; with the cost of a cached or SSD page (1.1, the value commonly set for SSDs)
# it joins them by index: 0.52–0.58 s rather than 0.62–0.77 s for an ASR run of 95,625 lines and 2.8 s
# rather than 3.4 s for a cry run of 510,000 on the benchmark database (docs/sql.md, export session of
# 0018). Set with set_config(..., is_local): for the export's transaction only.
EXPORT_RANDOM_PAGE_COST = "1.1"
_PLANNER_SETTINGS = sa.select(sa.func.set_config("random_page_cost", EXPORT_RANDOM_PAGE_COST, True))


def _resolve_run(engine: Engine, task: str, run_id: int | None, dataset: str | None) -> tuple[Any, Any]:
    """(the run row, the dataset scope or None) of an export; ConfigError when there is nothing to export."""
    if task not in ("asr", "cry"):
        raise ConfigError(f"task must be 'asr' or 'cry', got {task!r}")
    scope = datasets.resolve(engine, [dataset])[0] if dataset is not None else None
    if run_id is None:
        # the newest run of the task that labelled something: an empty run has nothing to export
        latest = latest_run_ids(
            engine, tasks=[task], with_labels=True, dataset_id=scope.id if scope is not None else None
        )
        run_id = next(iter(latest), None)
        if run_id is None:
            where = f" of dataset {dataset}" if dataset is not None else ""
            raise ConfigError(f"no {task} run with labels{where} yet (run: qwen-tasks label --task {task})")
    with engine.connect() as conn:
        run = conn.execute(sa.select(label_run).where(label_run.c.id == run_id)).one_or_none()
    if run is None:
        raise ConfigError(f"no labelling run with id {run_id} (see: qwen-tasks runs)")
    if run.task != task:
        raise ConfigError(f"run {run_id} is a {run.task} run, not {task}")
    return run, scope


def _query(run: Any, scope: Any) -> sa.Select:
    query = _asr_query(run.id) if run.task == "asr" else _cry_query(run.id)
    if scope is not None:
        query = query.where(audio_file.c.audio_id.in_(datasets.members([scope.id])))
    return query


def _provenance(run: Any) -> dict[str, Any]:
    return {
        "model": run.model,
        "revision": run.revision,
        "prompt_version": run.prompt_version,
        "run_id": run.id,
    }


def export_rows(
    engine: Engine, task: str, run_id: int | None = None, dataset: str | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of one run (default: the latest run of `task` with labels, of those that covered `dataset`
    when given), streamed from the database; with `dataset`, only that dataset's clips. A cry dataset
    whose clips were asked several questions has one run per question: name each with `run_id`."""
    run, scope = _resolve_run(engine, task, run_id, dataset)
    provenance = _provenance(run)
    with engine.connect() as conn:
        conn.execute(_PLANNER_SETTINGS)
        q = _query(run, scope).subquery()
        result = conn.execution_options(stream_results=True, yield_per=1000).execute(
            _in_path_order(sa.select(q), q)
        )
        for row in result:
            yield (_asr_row(row) if task == "asr" else _cry_row(row)) | provenance


def _line_query(run: Any, scope: Any) -> sa.Select:
    """One text column, the JSON line of each row of `export_rows` (same keys in the same order, `, ` and
    `: ` separators, non-ASCII kept), built by PostgreSQL, in path order."""
    return _lines(run, _query(run, scope))


def _lines(run: Any, query: sa.Select) -> sa.Select:
    """The JSON line of each row of `query` (the columns of `_asr_query` / `_cry_query`), in path order."""
    tail = ", " + json.dumps(_provenance(run), ensure_ascii=False)[1:]
    q = query.subquery()
    parts = _asr_parts(q) if run.task == "asr" else _cry_parts(q)
    line = sa.literal("{", sa.Text) + sa.func.concat_ws(", ", *parts) + sa.literal(tail, sa.Text)
    return _in_path_order(sa.select(line), q)


def export_lines(
    engine: Engine, task: str, run_id: int | None = None, dataset: str | None = None
) -> Iterator[str]:
    """The rows of `export_rows` as JSON text, one line each, built by PostgreSQL and streamed."""
    run, scope = _resolve_run(engine, task, run_id, dataset)
    with engine.connect() as conn:
        conn.execute(_PLANNER_SETTINGS)
        result = conn.execution_options(stream_results=True, yield_per=5000).execute(_line_query(run, scope))
        for (text,) in result:
            yield text


Copier = Callable[[TextIO], int]
"""Writes an export's lines (each ending in a newline) to a text file; returns how many."""

# COPY's CSV format writes a field as it is unless it holds the delimiter, the quote character or a line
# break; a JSON line built by to_json / json.dumps holds none of these (control characters are escaped
# as \uXXXX there), so each COPY row is the JSON line itself, byte for byte.
_COPY_OPTIONS = "(FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')"


def export_copy(engine: Engine, task: str, run_id: int | None = None, dataset: str | None = None) -> Copier:
    """`export_lines` through `COPY (...) TO STDOUT`: PostgreSQL streams the text and psycopg2 writes it
    to the file in large chunks, with no per-row work in Python (what `qwen-tasks export` uses). The run
    is resolved now (ConfigError before any file is made); the copy runs when the copier is called."""
    run, scope = _resolve_run(engine, task, run_id, dataset)
    compiled = _line_query(run, scope).compile(dialect=engine.dialect)
    settings = _PLANNER_SETTINGS.compile(dialect=engine.dialect)

    def copy(f: TextIO) -> int:
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cur:
                cur.execute(settings.string, settings.params)  # for this transaction only
                # the query's values are bound by the driver (mogrify), as in every other statement
                statement = cur.mogrify(
                    f"COPY ({compiled.string}) TO STDOUT WITH {_COPY_OPTIONS}", compiled.params
                )
                cur.copy_expert(statement, f, size=1 << 20)
                n = cur.rowcount
            raw.commit()
        finally:
            raw.close()
        return n

    return copy


def _json(key: str, value: sa.ColumnElement) -> sa.ColumnElement:
    """`"key": <value as JSON>` (null included)."""
    encoded = sa.func.coalesce(sa.cast(sa.func.to_json(value), sa.Text), "null")
    return sa.literal(json.dumps(key) + ": ", sa.Text) + encoded


def _windows(column: sa.ColumnElement) -> sa.ColumnElement:
    """`"windows": [...]` when there are several windows, else NULL (left out by concat_ws)."""
    return sa.case(
        (
            sa.func.jsonb_array_length(column) > 1,
            sa.literal('"windows": ', sa.Text) + sa.cast(column, sa.Text),
        )
    )


def _asr_parts(q: Any) -> list[sa.ColumnElement]:
    c = q.c
    return [
        _json("audio", c.path),
        _json("audio_id", c.audio_id),
        _json("text", c.text),
        _json("language", c.language),
        _json("reference", c.reference),
        _windows(c.windows),
    ]


def _cry_parts(q: Any) -> list[sa.ColumnElement]:
    c = q.c
    scored = c.score_label.is_not(None)
    generated = c.gen_label.is_not(None)
    calibrated = sa.and_(scored, c.calibration_id.is_not(None))  # a calibrated rule decided the label
    return [
        _json("audio", c.path),
        _json("audio_id", c.audio_id),
        sa.case((generated, _json("answer", c.raw_answer))),
        _json("p_yes", sa.case((scored, c.score_p_yes), else_=c.gen_p_yes)),
        _json("label", sa.case((scored, c.score_label), else_=c.gen_label)),
        sa.case((scored, _json("threshold", c.threshold))),
        sa.case((calibrated, _json("calibration_id", c.calibration_id))),
        sa.case((calibrated, _json("p_calibrated", c.p_calibrated))),
        sa.case((sa.and_(scored, generated), _json("answer_label", c.gen_label))),
        _json("gold", c.gold),
        _windows(sa.case((scored, c.score_windows), else_=c.gen_windows)),
    ]


def _asr_row(row: Any) -> dict[str, Any]:
    out = {
        "audio": row.path,
        "audio_id": row.audio_id,
        "text": row.text,
        "language": row.language,
        "reference": row.reference,
    }
    if len(row.windows or []) > 1:
        out["windows"] = row.windows
    return out


def _cry_row(row: Any) -> dict[str, Any]:
    scored = row.score_label is not None
    out: dict[str, Any] = {"audio": row.path, "audio_id": row.audio_id}
    if row.gen_label is not None:
        out["answer"] = row.raw_answer
    out["p_yes"] = row.score_p_yes if scored else row.gen_p_yes
    out["label"] = row.score_label if scored else row.gen_label
    if scored:
        out["threshold"] = row.threshold
    if scored and row.calibration_id is not None:  # the calibrated rule that decided the label
        out["calibration_id"] = row.calibration_id
        out["p_calibrated"] = row.p_calibrated
    if scored and row.gen_label is not None:
        out["answer_label"] = row.gen_label  # what the normaliser read from the generated answer
    out["gold"] = row.gold
    windows = row.score_windows if scored else row.gen_windows
    if len(windows or []) > 1:
        out["windows"] = windows
    return out


def write_jsonl(
    rows: Iterator[dict[str, Any] | str] | Copier, out: Path | None, stdout: TextIO | None = None
) -> int:
    """Write rows (or what a copier from `export_copy` writes) as JSON Lines to `out` (atomically: a
    partial file never replaces a good one) or stdout.

    Missing folders of `out` are created, and that is said on stderr (a warning naming the top folder
    created), because a typo in --out would otherwise silently make a new tree somewhere on the disk. The
    first row is read before anything is created, so an export that fails (no such run) leaves nothing.
    """
    if out is None:
        if stdout is None:
            raise ValueError("either out or stdout is needed")
        return rows(stdout) if callable(rows) else _dump(rows, stdout)
    out = out.expanduser()
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; give a file name such as labels.jsonl")
    if not callable(rows):
        rows = iter(rows)
        first = next(rows, None)
        rows = itertools.chain([first], rows) if first is not None else rows
    created = _make_parents(out)
    if created is not None:
        log.warning("created folder %s for %s (it did not exist)", created, out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = rows(f) if callable(rows) else _dump(rows, f)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _make_parents(out: Path) -> Path | None:
    """Create the missing folders above `out`; returns the topmost one created (None when none was)."""
    top = None
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{out}: {parent} is a file, not a folder")
            break
        top = parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # permission denied, read-only file system
        raise ConfigError(f"{out}: cannot create its folder: {exc.strerror or exc}") from None
    return top


def _dump(rows: Iterator[dict[str, Any] | str], f: TextIO) -> int:
    """Rows as JSON lines: a dict is encoded here, a str is a line already encoded (export_lines)."""
    n = 0
    for row in rows:
        f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
        f.write("\n")
        n += 1
    return n

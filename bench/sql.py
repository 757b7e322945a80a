"""SQL at scale: build a labels database of a given size with SQL, then time what analysts run on it.

    python bench/sql.py --audio 1000000 --answers 6000000          # the production-scale layout
    python bench/sql.py --audio 10000 --answers 60000               # small (a test runs this)
    python bench/sql.py --audio 200000 --answers 1200000 --before /tmp/main-src --keep

The database is made on the configured server (QWEN_TASKS_DATABASE_URL, or --admin-url) and dropped at
the end unless --keep. It is migrated, then filled with `INSERT ... SELECT FROM generate_series` into the
real tables, every constraint, foreign key and trigger in force:

- N audio, each at one path (`/data/set<k>/clip<i>.wav`), every 50th at a second path, N/100 quarantined
  paths; four datasets (`set0` ... `set3`, `set3` a test set), each clip in one;
- 0.3 N manifest lines (every third clip with one; odd lines audio-QA with a gold label, a question and a
  source, even lines ASR with a reference transcript);
- 40 runs: 6 production cry runs of answers/6 answers each (half the clips of a run each, both methods,
  score and generate; runs overlap, so a clip has answers from several runs), 32 ASR runs sharing
  answers/2 transcriptions, and 2 small evaluation runs; jobs of 1000 clips; the ASR runs' utterance
  scores where a reference exists;
- N/20 human labels (4 cry for each asr one).

With --bulk, the triggers that keep the per-clip tables (0017's `dataset_clip`, `dataset_count`,
`review_item`; 0018's `cry_run_clip`) are off during the fill, and those tables are rebuilt once after it
by their own rebuild functions (after an ANALYZE): the same rows, in minutes rather than an hour at 1 M.
The CLI timings start with `qwen-tasks --help`: the start-up every command pays (an export's rate is also
given without it).

With --before PATH (a checkout of the code to compare with, e.g. `git archive main | tar -x -C PATH`),
the database is migrated only as far as PATH's migrations go, filled, timed with PATH's code (its
queries, its CLI), then migrated to this checkout's migrations (the step is timed: a backfill) and timed
again with this code: before and after on the same rows. Each query's time is the wall time of running it
and fetching every row (psycopg2, on this machine); the CLI commands run as child processes and their
peak memory is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper around each one.
"""

# ruff: noqa: S608  (the SQL below is formatted from integers only)

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tasks.store import database as db  # noqa: E402

CRY_RUNS = 6
ASR_RUNS = 32
JOB_SIZE = 1000

# (name, SQL) of the queries the docs show, besides sql/queries/*.sql; :audio_id, :path, :run_id, :cry_run
# and :dataset are bound per database.
DOC_QUERIES: tuple[tuple[str, str], ...] = (
    (
        "README latest cry label per file",
        "SELECT f.path, l.label, l.p_yes, l.source FROM latest_label l "
        "JOIN audio_file f ON f.audio_id = l.audio_id WHERE l.task = 'cry' ORDER BY f.path",
    ),
    (
        "README same, one dataset",
        "SELECT f.path, l.label, l.p_yes, l.source FROM latest_label l "
        "JOIN audio_file f ON f.audio_id = l.audio_id "
        "JOIN dataset_audio da ON da.audio_id = l.audio_id JOIN dataset d ON d.id = da.dataset_id "
        "WHERE l.task = 'cry' AND d.name = :dataset ORDER BY f.path LIMIT 100",
    ),
    (
        "review.md quality per source",
        "SELECT group_name AS source, n_results, n_gold, round(score_accuracy::numeric, 3) AS acc, "
        "round(score_roc_auc::numeric, 3) AS auc FROM run_quality_by_dataset WHERE grouping = 'source' "
        "AND run_id = (SELECT max(id) FROM label_run WHERE task = 'cry') ORDER BY n_results DESC",
    ),
    (
        "labelling.md run_progress",
        "SELECT run_id, task, status, jobs_done, jobs, clips_labelled, round(rtf::numeric, 3) AS rtf "
        "FROM run_progress ORDER BY run_id DESC LIMIT 10",
    ),
    (
        "labelling.md truncated of a run",
        "SELECT audio_id, text FROM transcription WHERE run_id = :asr_run AND truncated",
    ),
    ("dataset_summary (qwen-tasks datasets)", "SELECT * FROM dataset_summary ORDER BY name"),
)

LOOKUPS: tuple[tuple[str, str], ...] = (
    ("latest_label count(*)", "SELECT count(*) FROM latest_label"),
    ("latest_label count task=cry", "SELECT count(*) FROM latest_label WHERE task = 'cry'"),
    ("latest_label count task=asr", "SELECT count(*) FROM latest_label WHERE task = 'asr'"),
    ("latest_label by audio_id", "SELECT * FROM latest_label WHERE audio_id = :audio_id"),
    ("latest_label by path", "SELECT * FROM latest_label WHERE path = :path"),
    ("latest_label by run (first 100)", "SELECT * FROM latest_label WHERE run_id = :cry_run LIMIT 100"),
    (
        "latest_label by dataset (first 100)",
        "SELECT l.* FROM latest_label l JOIN dataset_audio da ON da.audio_id = l.audio_id "
        "JOIN dataset d ON d.id = da.dataset_id WHERE d.name = :dataset AND l.task = 'cry' "
        "ORDER BY l.audio_id LIMIT 100",
    ),
    ("review_queue by audio_id", "SELECT * FROM review_queue WHERE audio_id = :audio_id"),
    (
        "review_queue by run (first 50)",
        "SELECT * FROM review_queue WHERE run_id = :cry_run ORDER BY priority DESC, audio_id LIMIT 50",
    ),
    ("cry_gold by audio_id", "SELECT * FROM cry_gold WHERE audio_id = :audio_id"),
    ("asr_reference by audio_id", "SELECT * FROM asr_reference WHERE audio_id = :asr_audio_id"),
    ("audio_path by path", "SELECT * FROM audio_path WHERE path = :path"),
    ("audio_path by audio_id", "SELECT * FROM audio_path WHERE audio_id = :audio_id"),
)


def build_sql(n_audio: int, n_answers: int) -> list[tuple[str, str]]:
    """(step, SQL) that fill a fresh, migrated database; ids start at 1 (checked after the audio step)."""
    n = n_audio
    per_run = max(1, n_answers // CRY_RUNS // 2)  # clips per cry run (two answers each)
    if per_run > n:
        raise SystemExit(f"--answers {n_answers}: more than two answers per clip and run for {n} audio")
    n_tx = n_answers // 2
    per_asr = max(1, n_tx // ASR_RUNS)
    manifest = max(2, int(0.3 * n))
    humans = max(1, n // 20)
    return [
        ("seed", "SELECT setseed(0.42)"),
        (
            "audio",
            f"""INSERT INTO audio (sha256, size_bytes, duration_s, sample_rate, channels, frames, format)
            SELECT lpad(to_hex(i), 64, '0'), 32044 + i % 997, 1 + i % 29, 16000, 1, 16000 * (1 + i % 29),
                   'WAV'
            FROM generate_series(1, {n}) i ORDER BY i""",
        ),
        (
            "audio_file",
            f"""INSERT INTO audio_file (path, audio_id, size_bytes, mtime_ns, status, root)
            SELECT '/data/set' || i % 4 || '/clip' || lpad(i::text, 8, '0') || '.wav', i, 32044 + i % 997,
                   1700000000000000000 + i, 'ok', '/data/set' || i % 4
            FROM generate_series(1, {n}) i ORDER BY i;
            INSERT INTO audio_file (path, audio_id, size_bytes, mtime_ns, status, root)
            SELECT '/mirror/clip' || lpad(i::text, 8, '0') || '.wav', i, 32044 + i % 997, 1, 'ok', '/mirror'
            FROM generate_series(50, {n}, 50) i;
            INSERT INTO audio_file (path, status, reason, root)
            SELECT '/data/bad/clip' || i || '.wav', 'quarantined', 'not an audio file', '/data/bad'
            FROM generate_series(1, greatest(1, {n} / 100)) i""",
        ),
        (
            "datasets",
            f"""INSERT INTO dataset (name, split, tasks)
            SELECT 'set' || k, CASE WHEN k = 3 THEN 'test' ELSE 'train' END, ARRAY['asr', 'cry']
            FROM generate_series(0, 3) k ORDER BY k;
            INSERT INTO dataset_source (dataset_id, kind, location)
            SELECT id, 'folder', '/data/' || name FROM dataset;
            INSERT INTO dataset_audio (dataset_id, audio_id)
            SELECT d.id, i FROM generate_series(1, {n}) i JOIN dataset d ON d.name = 'set' || i % 4""",
        ),
        (
            "manifest_item",
            f"""INSERT INTO manifest_item (manifest_path, line_no, kind, audio_path, audio_file_id,
                   reference_text, language, question, gt, gold_label, source, line_hash)
            SELECT '/data/set' || a % 4 || CASE WHEN j % 2 = 1 THEN '/aqa.jsonl' ELSE '/asr.jsonl' END, j,
                   CASE WHEN j % 2 = 1 THEN 'aqa' ELSE 'asr' END,
                   '/data/set' || a % 4 || '/clip' || lpad(a::text, 8, '0') || '.wav', a,
                   CASE WHEN j % 2 = 0 THEN 'the quick brown fox jumps over dog ' || j END,
                   CASE WHEN j % 2 = 0 THEN 'en' END,
                   CASE WHEN j % 2 = 1 THEN 'Is there a baby crying in this audio?' END,
                   CASE WHEN j % 2 = 1 THEN CASE WHEN a::int8 * 7919 % 100 < 40 THEN 'Yes' ELSE 'No' END END,
                   CASE WHEN j % 2 = 1 THEN CASE WHEN a::int8 * 7919 % 100 < 40 THEN 'yes' ELSE 'no' END END,
                   (ARRAY['youtube', 'freesound', 'studio'])[1 + j % 3], j
            FROM (SELECT j, 1 + (j * 3) % {n} AS a FROM generate_series(1, {manifest}) j) s ORDER BY j""",
        ),
        (
            "label_run",
            f"""INSERT INTO label_run (task, model, revision, prompt_version, params, status, n_planned,
                   n_labelled, audio_seconds, purpose, started_at, finished_at)
            SELECT task, 'Qwen/Qwen2-Audio-7B-Instruct', 'r1', task || '-v' || k,
                   jsonb_build_object('method', 'both', 'threshold', 0.5), 'done', size, size, size * 15.0,
                   purpose, now() - interval '30 days' + k * interval '12 hours',
                   now() - interval '30 days' + k * interval '12 hours' + size * interval '10 ms'
            FROM (
                SELECT k, CASE WHEN k % 6 = 0 OR k IN (10, 20) THEN 'cry' ELSE 'asr' END AS task,
                       CASE WHEN k IN (10, 20) THEN least({n}, 1000) WHEN k % 6 = 0 THEN {per_run}
                            ELSE {per_asr} END AS size,
                       CASE WHEN k IN (10, 20) THEN 'evaluation' ELSE 'label' END AS purpose
                FROM generate_series(1, 40) k  -- 6 cry runs (k = 6, 12, ... 36), 2 evaluation, 32 asr
            ) r ORDER BY k""",
        ),
        (
            "run_dataset",
            """INSERT INTO run_dataset (run_id, dataset_id, n_items)
            SELECT r.id, d.id, r.n_planned / 4 FROM label_run r CROSS JOIN dataset d""",
        ),
        (
            "label_job",
            f"""INSERT INTO label_job (run_id, seq, status, n_items, audio_seconds, attempts, claim_seconds,
                   process_seconds, started_at, finished_at)
            SELECT r.id, s, 'done', least({JOB_SIZE}, r.n_planned - s * {JOB_SIZE}), 15000.0, 1, 0.01, 10.0,
                   r.started_at + s * interval '10 s', r.started_at + s * interval '10 s' + interval '9 s'
            FROM label_run r, generate_series(0, (r.n_planned - 1) / {JOB_SIZE}) s ORDER BY r.id, s""",
        ),
        (
            "cry_answer",
            f"""CREATE TEMP TABLE _clip ON COMMIT DROP AS
            SELECT r.id AS run_id, j.id AS job_id,
                   1 + ((r.rank - 1) * {n} / {CRY_RUNS} + x) % {n} AS audio_id, random() AS u, random() AS v
            FROM (SELECT id, n_planned, row_number() OVER (ORDER BY id) AS rank FROM label_run
                  WHERE task = 'cry') r
            CROSS JOIN LATERAL generate_series(0, r.n_planned - 1) x
            JOIN label_job j ON j.run_id = r.id AND j.seq = x / {JOB_SIZE};
            INSERT INTO cry_answer (run_id, job_id, audio_id, method, raw_answer, p_yes, label, threshold)
            SELECT run_id, job_id, audio_id, 'score', NULL, p,
                   CASE WHEN p >= 0.5 THEN 'yes' ELSE 'no' END, 0.5
            FROM (SELECT *, least(1.0, 0.35 * (audio_id * 7919 % 100 < 40)::int + 0.65 * u) AS p
                  FROM _clip) c ORDER BY run_id, audio_id;
            INSERT INTO cry_answer (run_id, job_id, audio_id, method, raw_answer, p_yes, label, truncated)
            SELECT run_id, job_id, audio_id, 'generate',
                   CASE WHEN v < 0.45 THEN 'Yes, a baby is crying.' WHEN v < 0.93 THEN 'No, there is no baby.'
                        ELSE 'I cannot tell.' END, NULL,
                   CASE WHEN v < 0.45 THEN 'yes' WHEN v < 0.93 THEN 'no' ELSE 'unknown' END, v > 0.999
            FROM _clip ORDER BY run_id, audio_id""",
        ),
        (
            "transcription",
            f"""INSERT INTO transcription (run_id, job_id, audio_id, text, language)
            SELECT r.id, j.id, 1 + ((r.rank - 1) * 7919 + x * 3) % {n},
                   CASE WHEN random() < 0.8 THEN 'the quick brown fox jumps over dog '
                        ELSE 'a quick brown fox jumped over the dog ' END || x, 'en'
            FROM (SELECT id, n_planned, row_number() OVER (ORDER BY id) AS rank FROM label_run
                  WHERE task = 'asr') r
            CROSS JOIN LATERAL generate_series(0, r.n_planned - 1) x
            JOIN label_job j ON j.run_id = r.id AND j.seq = x / {JOB_SIZE}
            ORDER BY 1, 3
            ON CONFLICT (run_id, audio_id) DO NOTHING""",
        ),
        (
            "utterance_score",
            """INSERT INTO utterance_score (run_id, audio_id, language, unit, reference_source, n_ref,
                   substitutions, deletions, insertions, error_rate)
            SELECT t.run_id, t.audio_id, 'en', 'word', 'manifest', 8, s, 0, 0, s / 8.0
            FROM (SELECT t.run_id, t.audio_id, (t.id % 4) AS s FROM transcription t
                  WHERE EXISTS (SELECT 1 FROM manifest_item mi WHERE mi.audio_file_id = t.audio_id
                                AND mi.kind = 'asr')) t""",
        ),
        (
            "human_label",
            f"""INSERT INTO human_label (audio_id, task, label, text, reviewer)
            SELECT 1 + (h * 20) % {n}, CASE WHEN h % 5 = 0 THEN 'asr' ELSE 'cry' END,
                   CASE WHEN h % 5 <> 0 THEN (ARRAY['yes', 'no', 'unknown'])[1 + h % 3] END,
                   CASE WHEN h % 5 = 0 THEN 'the quick brown fox ' || h END,
                   'reviewer' || h % 7 || '@example.org'
            FROM generate_series(0, {humans} - 1) h ORDER BY h
            ON CONFLICT (audio_id, task) DO NOTHING""",
        ),
        ("analyze", "ANALYZE"),
    ]


@contextlib.contextmanager
def bench_database(admin_url: str, keep: bool, existing: str | None = None) -> Iterator[str]:
    server = make_url(admin_url).set(drivername="postgresql+psycopg2")
    if existing:
        yield server.set(database=existing).render_as_string(hide_password=False)
        return
    name = f"qwen_tasks_bench_sql_{os.getpid()}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))  # generated identifier
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        if keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            db.get_engine(url).dispose()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate(url: str, migrations_dir: Path) -> list[str]:
    """Apply the migrations of `migrations_dir` not applied yet (as `qwen-tasks db upgrade`)."""
    from qwen_tasks.store import database as db

    return db.upgrade(db.get_engine(url), migrations_dir)


# The triggers that keep per-clip tables (0017, 0018) and the functions that rebuild those tables from
# scratch; --bulk turns the first off while filling and runs the second once after.
KEEPING_TRIGGERS = r"^(clip_lock|keep_facts|keep_run_clips)_"
REBUILDS = ("dataset_counts_rebuild", "review_item_rebuild", "cry_run_clip_rebuild")


def _keeping_triggers(engine: Engine, enable: bool) -> None:
    with engine.begin() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal AND t.tgname ~ :pattern ORDER BY 1, 2"
            ),
            {"pattern": KEEPING_TRIGGERS},
        ).all()
        quote = conn.dialect.identifier_preparer.quote
        for table, trigger in rows:  # identifiers from the catalog, quoted
            action = "ENABLE" if enable else "DISABLE"
            conn.exec_driver_sql(f"ALTER TABLE {quote(table)} {action} TRIGGER {quote(trigger)}")


def _analyze(engine: Engine, log: list[tuple[str, float]]) -> None:
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    log.append(("analyze (before the rebuilds)", time.perf_counter() - start))


def _rebuild(engine: Engine, log: list[tuple[str, float]]) -> None:
    with engine.connect() as conn:
        present = set(
            conn.execute(
                sa.text("SELECT proname FROM pg_proc WHERE proname = ANY (:names)"), {"names": list(REBUILDS)}
            ).scalars()
        )
    for name in (n for n in REBUILDS if n in present):
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            conn.exec_driver_sql(f"SELECT {name}()")  # a name from REBUILDS
        log.append((f"{name}()", time.perf_counter() - start))


def fill(
    engine: Engine, n_audio: int, n_answers: int, log: list[tuple[str, float]], bulk: bool = False
) -> None:
    """Run build_sql's steps. `bulk`: with the per-clip tables' triggers off, rebuilt once before ANALYZE
    (the same rows as with the triggers on: what a TRUNCATE of a source table does)."""
    if bulk:
        _keeping_triggers(engine, enable=False)
    for step, sql in build_sql(n_audio, n_answers):
        if bulk and step == "analyze":  # statistics first: the rebuilds are large joins
            _analyze(engine, log)
            _keeping_triggers(engine, enable=True)
            _rebuild(engine, log)
        start = time.perf_counter()
        with engine.begin() as conn:
            with conn.connection.driver_connection.cursor() as cur:  # no parameters: `%` is `%`
                cur.execute("SET LOCAL synchronous_commit = off")
                cur.execute(sql)
            if step == "audio":
                first = conn.execute(sa.text("SELECT min(id), max(id) FROM audio")).one()
                if tuple(first) != (1, n_audio):
                    raise SystemExit(f"the database is not fresh: audio ids {tuple(first)}")
        log.append((f"{step}", time.perf_counter() - start))


def parameters(engine: Engine) -> dict[str, object]:
    with engine.connect() as conn:
        cry_run = conn.execute(
            sa.text("SELECT max(id) FROM label_run WHERE task = 'cry' AND purpose = 'label'")
        ).scalar_one()
        asr_run = conn.execute(
            sa.text("SELECT max(id) FROM label_run WHERE task = 'asr' AND purpose = 'label'")
        ).scalar_one()
        audio_id = conn.execute(
            sa.text("SELECT audio_id FROM cry_answer WHERE run_id = :r ORDER BY audio_id OFFSET 777 LIMIT 1"),
            {"r": cry_run},
        ).scalar_one()
        asr_audio_id = conn.execute(
            sa.text(
                "SELECT af.audio_id FROM manifest_item mi JOIN audio_file af ON af.id = mi.audio_file_id "
                "WHERE mi.kind = 'asr' ORDER BY mi.id OFFSET 333 LIMIT 1"
            )
        ).scalar_one()
        path = conn.execute(
            sa.text("SELECT path FROM audio_file WHERE audio_id = :a ORDER BY id LIMIT 1"), {"a": audio_id}
        ).scalar_one()
        n_cry = conn.execute(sa.text("SELECT count(*) FROM cry_answer WHERE run_id = :r"), {"r": cry_run})
    return {
        "cry_run": cry_run,
        "asr_run": asr_run,
        "audio_id": audio_id,
        "asr_audio_id": asr_audio_id,
        "path": path,
        "dataset": "set3",
        "cry_run_answers": n_cry.scalar_one(),
    }


def split_statements(sql: str) -> list[str]:
    """The statements of a query file (comments dropped, split at `;` ending a line)."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def time_query(engine: Engine, sql: str, params: dict[str, object], timeout_s: float) -> tuple[float, object]:
    """Wall seconds of running `sql` and fetching every row; the row count, or 'timeout'."""
    named = {k: v for k, v in params.items() if re.search(rf"(?<!:):{k}\b", sql)}
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SET statement_timeout = {int(timeout_s * 1000)}")
        start = time.perf_counter()
        try:
            rows = len(conn.execute(sa.text(sql), named).all())
        except sa.exc.OperationalError as exc:
            if "statement timeout" not in str(exc):
                raise
            return time.perf_counter() - start, "timeout"
        return time.perf_counter() - start, rows


def run_cli(code_root: Path, url: str, args: list[str], timeout_s: float) -> tuple[float, float, str]:
    """(wall seconds, peak MB, note) of `python -m qwen_tasks ARGS` with `code_root`'s code."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,"
        " timeout=float(sys.argv[1]))\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)\n"
        "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')\n"
    )
    env = dict(os.environ, QWEN_TASKS_DATABASE_URL=url, PYTHONPATH=str(code_root))
    start = time.perf_counter()
    try:
        out = subprocess.run(
            [sys.executable, "-c", wrapper, str(timeout_s), sys.executable, "-m", "qwen_tasks", *args],
            cwd=code_root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s + 30,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, float("nan"), "timeout"
    wall = time.perf_counter() - start
    try:
        kb, rc = out.stdout.split()
    except ValueError:
        return wall, float("nan"), f"failed: {out.stderr.strip()[-300:]}"
    note = "" if rc == "0" else f"exit {rc}: {out.stderr.strip().splitlines()[-1:] or ''}"
    return wall, int(kb) / 1024, note


def measure(url: str, code_root: Path, params: dict[str, object], timeout_s: float, tmp: Path) -> list[tuple]:
    """(name, seconds, rows or peak MB, note) of every timed item, with `code_root`'s queries and CLI."""
    engine = db.get_engine(url)
    results = []
    cry, asr = str(params["cry_run"]), str(params["asr_run"])
    commands = [
        ("qwen-tasks --help (start-up)", ["--help"]),
        ("qwen-tasks runs", ["runs"]),
        (f"qwen-tasks metrics --run {cry} (cry)", ["metrics", "--run", cry]),
        (f"qwen-tasks report --run {cry} (cry)", ["report", "--run", cry, "--out", str(tmp / "r.html")]),
        (
            f"qwen-tasks export --run {cry} (cry)",
            ["export", "--task", "cry", "--run", cry, "--out", str(tmp / "cry.jsonl")],
        ),
        (
            f"qwen-tasks export --run {asr} (asr)",
            ["export", "--task", "asr", "--run", asr, "--out", str(tmp / "asr.jsonl")],
        ),
    ]
    startup = None
    for name, args in commands:
        seconds, mb, note = run_cli(code_root, url, args, timeout_s * 10)
        if args == ["--help"]:
            startup = seconds  # the interpreter and the CLI's imports, what every command pays first
        if name.startswith("qwen-tasks export") and not note:
            out = tmp / args[-1].rsplit("/", 1)[-1]
            n = sum(1 for _ in out.open("rb"))
            note = f"{n} rows, {n / seconds:,.0f} rows/s"
            if startup is not None and seconds > startup:
                note += f" ({n / (seconds - startup):,.0f} rows/s after start-up)"
        results.append((name, seconds, f"{mb:.0f} MB", note))
        print(f"  {name}: {seconds:.2f} s, {mb:.0f} MB {note}", file=sys.stderr, flush=True)
    queries = list(DOC_QUERIES)
    for path in sorted((code_root / "sql" / "queries").glob("*.sql")):
        for k, stmt in enumerate(split_statements(path.read_text(encoding="utf-8"))):
            queries.append((f"sql/queries/{path.name}" + (f" #{k + 1}" if k else ""), stmt))
    queries += list(LOOKUPS)
    for name, sql in queries:
        seconds, rows = time_query(engine, sql, params, timeout_s)
        results.append((name, seconds, f"{rows} rows", ""))
        print(f"  {name}: {seconds:.3f} s ({rows} rows)", file=sys.stderr, flush=True)
    return results


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    print(f"\n{title}\n")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--audio", type=int, default=1_000_000)
    parser.add_argument("--answers", type=int, default=6_000_000, help="cry answers (transcriptions: half)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
        or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (e.g. main)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per query, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--database", help="time an existing bench database (kept with --keep): no build")
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    parser.add_argument("--load", type=Path, help="results saved earlier: their 'before' is shown")
    parser.add_argument("--only", choices=("before", "after"), help="time one side only")
    parser.add_argument("--skip-cli", action="store_true", help="time the queries only")
    parser.add_argument(
        "--bulk",
        action="store_true",
        help="fill with the per-clip tables' triggers (0017, 0018) off and rebuild those tables once "
        "after (same rows; a 1 M build in minutes rather than an hour)",
    )
    args = parser.parse_args(argv)

    build_log: list[tuple[str, float]] = []
    runs: dict[str, list] = {}
    if args.load:
        runs["before"] = json.loads(args.load.read_text())["runs"].get("before", [])
    with (
        bench_database(args.admin_url, args.keep or bool(args.database), args.database) as url,
        tempfile.TemporaryDirectory() as tmp,
    ):
        engine = db.get_engine(url)
        if not args.database:
            start = time.perf_counter()
            migrate(url, (args.before or ROOT) / "sql" / "migrations")
            build_log.append(
                ("migrate" + (" (before's)" if args.before else ""), time.perf_counter() - start)
            )
            fill(engine, args.audio, args.answers, build_log, bulk=args.bulk)
        params = parameters(engine)
        print(f"database {make_url(url).database}: {params}", file=sys.stderr, flush=True)
        todo = [("before", args.before), ("after", ROOT)] if args.before else [("after", ROOT)]
        for label, code_root in todo:
            if args.only and label != args.only:
                continue
            if label == "after":
                start = time.perf_counter()
                applied = migrate(url, ROOT / "sql" / "migrations")
                if applied:
                    with engine.begin() as conn:
                        conn.exec_driver_sql("ANALYZE")
                    build_log.append((f"migrate {' '.join(applied)} + ANALYZE", time.perf_counter() - start))
            print(f"timing {label} ({code_root})", file=sys.stderr, flush=True)
            if args.skip_cli:
                runs[label] = measure_queries_only(url, code_root, params, args.timeout)
            else:
                runs[label] = measure(url, code_root, params, args.timeout, Path(tmp))
        with engine.connect() as conn:
            size = conn.execute(
                sa.text("SELECT pg_size_pretty(pg_database_size(current_database()))")
            ).scalar()
            counts = conn.execute(
                sa.text(
                    "SELECT (SELECT count(*) FROM audio), (SELECT count(*) FROM cry_answer), "
                    "(SELECT count(*) FROM transcription), (SELECT count(*) FROM human_label), "
                    "(SELECT count(*) FROM manifest_item), (SELECT count(*) FROM label_run)"
                )
            ).one()
        engine.dispose()

    scale = (
        f"{counts[0]:,} audio, {counts[1]:,} cry answers ({params['cry_run_answers']:,} in run "
        f"{params['cry_run']}), {counts[2]:,} transcriptions, {counts[3]:,} human labels, "
        f"{counts[4]:,} manifest lines, {counts[5]} runs, {size}"
    )
    print(f"\nScale: {scale}")
    if build_log:
        print_table("Build", ["step", "seconds"], [[s, f"{t:.1f}"] for s, t in build_log])
    if args.save:
        args.save.write_text(
            json.dumps(
                {"scale": scale, "params": params, "runs": runs, "build": build_log}, indent=1, default=str
            )
        )
    if "before" in runs and "after" in runs:
        before = {r[0]: r for r in runs["before"]}
        rows = []
        for name, seconds, size_, note in runs["after"]:
            b = before.get(name)
            rows.append(
                [
                    name,
                    _fmt_s(b[1]) if b else "-",
                    b[2] if b else "-",
                    _fmt_s(seconds),
                    size_,
                    note or (b[3] if b else ""),
                ]
            )
        print_table(
            f"Before ({args.before or args.load}) and after ({ROOT})",
            ["what", "before", "rows / peak", "after", "rows / peak", "note"],
            rows,
        )
    else:
        for label, results in runs.items():
            print_table(
                f"Timings ({label})",
                ["what", "seconds", "rows / peak memory", "note"],
                [[n, _fmt_s(s), z, note] for n, s, z, note in results],
            )
    return 0


def measure_queries_only(
    url: str, code_root: Path, params: dict[str, object], timeout_s: float
) -> list[tuple]:
    engine = db.get_engine(url)
    results = []
    queries = list(DOC_QUERIES)
    for path in sorted((code_root / "sql" / "queries").glob("*.sql")):
        for k, stmt in enumerate(split_statements(path.read_text(encoding="utf-8"))):
            queries.append((f"sql/queries/{path.name}" + (f" #{k + 1}" if k else ""), stmt))
    for name, sql in [*queries, *LOOKUPS]:
        seconds, rows = time_query(engine, sql, params, timeout_s)
        results.append((name, seconds, f"{rows} rows", ""))
        print(f"  {name}: {seconds:.3f} s ({rows} rows)", file=sys.stderr, flush=True)
    return results


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    sys.exit(main())

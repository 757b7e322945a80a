"""`make demo`: the nightly Airflow DAG, run once on generated audio with the tiny model, no setup needed.

What a newcomer sees is the scheduled job itself doing the work: the same DAG file the scheduler runs
(`dags/qwen_audio_labelling.py`) is run with `dag.test()` in a project-local AIRFLOW_HOME
(`$QWEN_TASKS_HOME/airflow`), with trigger conf pointing at the samples. The labels go to the embedded
PostgreSQL (or QWEN_TASKS_DATABASE_URL). Running it again is safe: unchanged audio is not labelled twice,
so the second run plans no job and loads no model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from qwen_tasks.dev.airflow_local import (
    DagRunFailed,
    DagTestResult,
    default_home,
    ensure_metadata_db,
    run_dag_test,
)
from qwen_tasks.dev.airflow_local import airflow_env as _airflow_env
from qwen_tasks.dev.samples import SampleSet, write_sample_set
from qwen_tasks.errors import QwenTasksError
from qwen_tasks.records import AudioStatus
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import audio_file, cry_answer, label_run, run_metric, transcription

console = Console(highlight=False, soft_wrap=True)  # long paths stay on one line, copy-pasteable

SQL_EXAMPLES = """\
-- progress and speed of every labelling run
SELECT run_id, task, status, clips_labelled, clips_failed, jobs, round(rtf::numeric, 3) AS rtf
FROM run_progress ORDER BY run_id DESC;
-- transcripts
SELECT f.path, t.text FROM transcription t JOIN audio_file f ON f.audio_id = t.audio_id ORDER BY f.path;
-- cry detection: one row per clip and method
SELECT f.path, c.method, c.label, round(c.p_yes::numeric, 3) AS p_yes, c.raw_answer
FROM cry_answer c JOIN audio_file f ON f.audio_id = c.audio_id ORDER BY f.path, c.method;
-- quality metrics per run
SELECT run_id, name, round(value::numeric, 4) AS value FROM run_metric ORDER BY run_id, name;
-- files that could not be used, and why
SELECT path, reason FROM audio_file WHERE status = 'quarantined';"""


def _step(n: int, text: str) -> None:
    console.print(f"[bold]{n}/5[/] {text}")


def _samples(root: Path) -> tuple[SampleSet, bool]:
    """The sample set; files already there are kept as they are, so a second demo sees unchanged audio."""
    existed = (root / "cry.jsonl").is_file()
    return write_sample_set(root), not existed


def _tiny_model(folder: Path) -> tuple[Path, bool]:
    """The tiny random-weights model (made once; deterministic, so reusing it is the same model)."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder, False
    from qwen_tasks.dev.tiny_model import make_tiny_model

    return make_tiny_model(folder), True


def psql_command(url: sa.URL) -> str:
    """A psql command line for `url`, without its password (the embedded server trusts local users)."""
    import shlex

    host = url.host or url.query.get("host")
    parts = ["psql"]
    if host:
        parts += ["-h", str(host)]
    if url.port:
        parts += ["-p", str(url.port)]
    if url.username:
        parts += ["-U", url.username]
    parts.append(url.database or "")
    return shlex.join(parts)


def _counts(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        count = lambda table, *where: conn.execute(  # noqa: E731
            sa.select(sa.func.count()).select_from(table).where(*where)
        ).scalar_one()
        return {
            "runs": count(label_run),
            "transcriptions": count(transcription),
            "cry answers": count(cry_answer),
            "metrics": count(run_metric),
            "quarantined files": count(audio_file, audio_file.c.status == AudioStatus.QUARANTINED),
        }


def _summary(result: DagTestResult) -> None:
    xcom = result.xcom
    ingest = xcom.get("ingest") or {}
    plan = xcom.get("plan.plan") or {}
    labels = result.states("label_batch")
    console.print(
        f"    DAG run [bold]{result.dag_run_id}[/]: {result.state} in {result.seconds:.0f} s "
        f"(log: {result.log_file})"
    )
    console.print(
        f"    ingest: {ingest.get('new', 0)} new, {ingest.get('changed', 0)} changed, "
        f"{ingest.get('unchanged', 0)} unchanged, {ingest.get('duplicate', 0)} duplicate, "
        f"{ingest.get('quarantined', 0)} quarantined"
    )
    per_task = ", ".join(
        f"{task}: {info.get('jobs', 0)} job(s) / {info.get('items', 0)} clip(s)"
        for task, info in (plan.get("per_task") or {}).items()
    )
    console.print(f"    plan: {plan.get('jobs', 0)} job(s) ({per_task or 'nothing'})")
    if labels == ["skipped"] or not labels:
        console.print("    label_batch: skipped: nothing new to label, no model loaded")
    else:
        done = sum(s == "success" for s in labels)
        console.print(
            f"    label_batch: {done}/{len(labels)} worker slot(s) succeeded (each loads the model once "
            "and labels jobs until the runs are done)"
        )
    report = xcom.get("report") or {}
    if report.get("report"):
        console.print(f"    report: {report['report']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="samples, model and reports")
    parser.add_argument("--airflow-home", type=Path, default=None, help="default: $QWEN_TASKS_HOME/airflow")
    parser.add_argument("--method", default="both", choices=["score", "generate", "both"])
    args = parser.parse_args(argv)
    out = args.out.resolve()
    home = (args.airflow_home or default_home()).resolve()
    try:
        samples, written = _samples(out / "audio")
        _step(
            1,
            f"{len(samples.clips)} sample clips, {len(samples.bad)} broken files and 2 manifests "
            f"{'written to' if written else 'reused from'} {samples.root}",
        )

        t0 = time.perf_counter()
        model, made = _tiny_model(out / "tiny-model")
        _step(2, f"tiny Qwen2-Audio model (random weights) {'written' if made else 'reused'}: {model}"
              + (f" ({time.perf_counter() - t0:.1f} s)" if made else ""))  # fmt: skip

        engine = db.get_engine()
        applied = db.upgrade(engine)
        where = db.printable_location(engine.url)
        _step(3, f"labels database {where} ready ({len(applied)} migration(s) applied)")

        migrated = ensure_metadata_db(home, _airflow_env(home))
        how = f"migrated in {migrated['seconds']:.1f} s" if migrated["migrated"] else "already migrated"
        _step(4, f"Airflow home {home} (SQLite metadata, {how})")

        _step(5, "running the DAG qwen_audio_labelling once with dag.test() ...")
        conf = {
            "audio_dirs": [str(samples.root)],
            "asr_manifests": [str(samples.asr_manifest)],
            "aqa_manifests": [str(samples.aqa_manifest)],
            "tasks": ["asr", "cry"],
            "model": str(model),
            "revision": "",
            "device": "cpu",
            "method": args.method,
            "max_new_tokens": 16,
            "report_dir": str(out / "reports"),
        }
        url = engine.url.render_as_string(hide_password=False)
        result = run_dag_test(
            conf,
            home=home,
            extra_env={"QWEN_TASKS_DATABASE_URL": url, "AIRFLOW_CONN_QWEN_TASKS_DB": None},
        )
        _summary(result)
    except (QwenTasksError, DagRunFailed) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1

    counts = _counts(engine)
    console.print("\n[bold]Where the results are[/]")
    console.print(f"  labels database: {db.printable_location(engine.url)}")
    console.print(f"    open it with:  {psql_command(engine.url)}")
    console.print("  rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    report = (result.xcom.get("report") or {}).get("report")
    console.print(f"  report: {report or 'none yet'}")
    console.print(f"  Airflow home: {home}  (task logs under logs/)")
    console.print("\n[bold]Look at them with SQL[/] (in the psql above, or any PostgreSQL client):")
    console.print(SQL_EXAMPLES, markup=False)
    console.print(
        "\nRun [bold]make demo[/] again: the audio is unchanged, so the DAG plans 0 jobs and loads no model."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

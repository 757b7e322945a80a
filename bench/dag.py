"""DAG benchmark: the same clips through a bare loop, `qwen-tasks label` and the DAG, side by side.

    .venv/bin/python bench/dag.py                    # bench preset, 48 clips (2-6 s), ASR, 16 new tokens
    .venv/bin/python bench/dag.py --clips 16 --slots 1,2
    .venv/bin/python bench/dag.py --celery           # adds (e): the DAG under a real CeleryExecutor

Configurations, each on the same files and the same model (planned again with relabel, so every
configuration labels every clip):
(a) bare: load the model, then `processor` + `model.generate` over the same duration-sorted batches,
    nothing else (no decoding from files, no database) — the floor;
(b) label: `qwen-tasks label` in a subprocess (start-up, plan, model load, decode, label, write);
(c) dag slots=N: the DAG with `dag.test()` (ingest, plan, N label_batch slots, metrics, report);
(d) dag slots=jobs: one slot per job, the shape of the old per-job mapping;
(e) with --celery: the DAG triggered on a real local Airflow (qwen_tasks.dev.airflow_stack: api-server,
    scheduler, dag-processor, --celery-slots Celery workers on the local Redis, a throwaway PostgreSQL
    metadata database), slots = workers = the gpu pool. Its wall time is the DAG run's start to end
    (from the metadata database; the stack's start-up and `airflow dags trigger` are not counted), its
    label_batch tasks' durations are printed too. Each worker gets OMP_NUM_THREADS = cores // slots.
Printed per configuration: wall time, its ratio to (a), and how many times the model was loaded (from
the task log lines "model ... loaded in"). `dag.test()` runs every task in ONE process, where the
backend cache makes later slots reuse the loaded model; under a real executor every slot is its own
process and loads once, so loads per DAG run = slots ((e) shows it, as does
tests/orchestration/test_airflow_stack.py). Target (issue 11): DAG wall time <= 1.3x the bare loop;
loads per DAG run = slots.
Uses a throwaway labels database on the local server (or --admin-url), dropped at the end; (e) stops
every process of its stack and drops its metadata database even when the run fails or is interrupted
(Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from qwen_tasks.dev.airflow_stack import stack_db_prefix  # noqa: E402
from qwen_tasks.store import database as db  # noqa: E402

LOADED = re.compile(r"model \S+ (?:\(revision [^)]*\) )?loaded in ([0-9.]+) s")


def make_clips(folder: Path, n: int) -> None:
    import numpy as np
    import soundfile as sf

    from qwen_tasks.dev.samples import synth_clip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        seconds = float(2.0 + 4.0 * rng.random())
        sf.write(folder / f"d{i:04d}.wav", synth_clip(seconds, 16000, i, cry=i % 3 == 0)[:, 0], 16000)


def bare(model: Path, folder: Path, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """(a): model load + processor/generate over duration-sorted batches of decoded audio."""
    from inference import bare_loop

    from qwen_tasks.ingest.audio_files import load_waveform
    from qwen_tasks.labelling.backends import load_backend
    from qwen_tasks.records import LabelRequest

    waves = sorted((load_waveform(str(p)) for p in sorted(folder.glob("*.wav"))), key=len)
    batches = [waves[i : i + batch_size] for i in range(0, len(waves), batch_size)]
    t0 = time.perf_counter()
    backend = load_backend(str(model), device="cpu")
    loaded = time.perf_counter() - t0
    bare_loop(backend, batches, backend.prompt_text(LabelRequest(task="asr")), max_new_tokens)
    return {"wall_s": time.perf_counter() - t0, "load_s": loaded, "loads": 1}


def label_cli(url: str, model: Path, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """(b): `qwen-tasks label` as a user runs it."""
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": url}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "label", "--task", "asr", "--model", str(model),
         "--device", "cpu", "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens),
         "--relabel", "--json"],
        env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    load = summary["model_load_seconds"]
    return {"wall_s": wall, "load_s": load, "loads": 1, "labelled": summary["labelled"]}


def dag(
    url: str, model: Path, folder: Path, home: Path, slots: int, batch_size: int, max_new_tokens: int
) -> dict[str, float]:
    """(c)/(d): the DAG once with dag.test() (relabel, so it labels every clip again)."""
    from qwen_tasks.dev.airflow_local import run_dag_test

    conf = {
        "audio_dirs": [str(folder)], "tasks": ["asr"], "model": str(model), "device": "cpu",
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "relabel": True, "slots": slots,
        "report_dir": str(home / "reports"),
    }  # fmt: skip
    env = {
        "QWEN_TASKS_DATABASE_URL": url,
        "AIRFLOW_CONN_QWEN_TASKS_DB": None,
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    t0 = time.perf_counter()
    result = run_dag_test(conf, home=home, extra_env=env, timeout=3600)
    wall = time.perf_counter() - t0
    loads = LOADED.findall(Path(result.log_file).read_text(errors="replace"))
    names = [t["name"] for t in result.tasks if t["task_id"] == "label_batch"]
    return {
        "wall_s": wall,
        "load_s": sum(float(s) for s in loads),
        "loads": len(loads),
        "mapped": len(names),
        "labelled": (result.xcom.get("plan.plan") or {}).get("items"),
    }


def celery(
    url: str, admin_url: str, model: Path, folder: Path, home: Path, slots: int, batch_size: int,
    max_new_tokens: int, timeout: float,
) -> dict[str, float]:  # fmt: skip
    """(e): the DAG once on a real CeleryExecutor stack with `slots` workers; the stack always stopped."""
    import sqlalchemy as sa

    from qwen_tasks.dev.airflow_stack import DAG_ID, AirflowStack, AirflowStackError
    from qwen_tasks.store.schema import label_run

    conf = {
        "audio_dirs": [str(folder)], "tasks": ["asr"], "model": str(model), "device": "cpu",
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "relabel": True, "slots": slots,
        "report_dir": str(home / "reports"),
    }  # fmt: skip
    stack = AirflowStack(
        home=home, admin_url=admin_url, labels_url=url, workers=slots,
        env_extra={
            "QWEN_TASKS_MODEL": str(model), "QWEN_TASKS_DEVICE": "cpu", "QWEN_TASKS_AUDIO_DIRS": str(folder),
            "QWEN_TASKS_GPU_POOL_SLOTS": str(slots),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // slots)),
        },
    )  # fmt: skip
    run_id = "bench-celery"
    t0 = time.perf_counter()
    with stack:  # start() here; stop() on the way out, whatever happens inside
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        stack.airflow("dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf))
        state = stack.wait_for_run(run_id, timeout=timeout)
        observed = time.perf_counter() - t1
        tis = stack.task_instances(run_id)
        if state != "success":  # the home (and its logs) goes with the temporary folder: show the tails
            tails = "\n".join(f"--- {name}\n{text[-1500:]}" for name, text in stack.task_logs(run_id).items())
            raise AirflowStackError(f"DAG run {run_id} ended {state}: {tis}\n{tails}")
        run = next(r for r in stack.dag_runs() if r["run_id"] == run_id)
        slots_ti = [t for t in tis if t["task_id"] == "label_batch"]
        logs = stack.task_logs(run_id, "label_batch")
        loads = [float(x) for text in logs.values() for x in LOADED.findall(text)]
        with db.get_engine(url).connect() as conn:
            labelled = conn.execute(
                sa.select(sa.func.sum(label_run.c.n_labelled)).where(
                    label_run.c.params["airflow_dag_run"].astext == run_id
                )
            ).scalar()
    return {
        "wall_s": (run["end_date"] - run["start_date"]).total_seconds(),
        "load_s": sum(loads),
        "loads": len(loads),
        "mapped": len(slots_ti),
        "labelled": labelled,
        "trigger_to_done_s": observed,
        "stack_start_s": started,
        "label_batch_s": [round(float(t["duration"] or 0.0), 1) for t in slots_ti],
        "label_batch_slots": [str(t["rendered_map_index"]).split(":")[0] for t in slots_ti],
    }


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `with`: stack stopped, databases dropped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--slots", default="2", help="comma-separated slot counts for (c)")
    parser.add_argument("--preset", default="bench", help="tiny-model preset (tiny, bench)")
    parser.add_argument("--model", type=Path, help="a model dir (default: build the preset)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
        or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--celery", action="store_true", help="add (e): the DAG under CeleryExecutor")
    parser.add_argument("--celery-slots", type=int, default=2, help="(e): Celery workers = slots")
    parser.add_argument("--celery-timeout", type=float, default=1800, help="(e): seconds for the DAG run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    rows: list[tuple[str, dict[str, float]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="qwen_bench_dag_") as tmp,
        db.scratch_database(args.admin_url, prefix=f"{stack_db_prefix()}_bench") as url,
    ):
        work = Path(tmp)
        model = args.model
        if model is None:
            from qwen_tasks.dev.tiny_model import make_tiny_model

            model = make_tiny_model(work / "model", preset=args.preset)
        folder = work / "clips"
        make_clips(folder, args.clips)
        from qwen_tasks.ingest.register import ingest

        ingest(db.get_engine(url), [folder])
        home = work / "airflow"
        size, tokens = args.batch_size, args.max_new_tokens
        rows.append(("(a) bare processor+generate loop", bare(model, folder, size, tokens)))
        rows.append(("(b) qwen-tasks label", label_cli(url, model, size, tokens)))
        # the first dag.test() in a fresh home pays `airflow db migrate` (once per home): not counted
        from qwen_tasks.dev.airflow_local import airflow_env, ensure_metadata_db

        ensure_metadata_db(home, airflow_env(home))
        jobs = -(-args.clips // args.batch_size)
        for slots in [int(s) for s in args.slots.split(",")]:
            rows.append(
                (f"(c) DAG dag.test() slots={slots}", dag(url, model, folder, home, slots, size, tokens))
            )
        rows.append((f"(d) DAG slots=jobs ({jobs})", dag(url, model, folder, home, jobs, size, tokens)))
        if args.celery:
            n = args.celery_slots
            result = celery(
                url, args.admin_url, model, folder, work / "celery", n, size, tokens, args.celery_timeout
            )
            rows.append((f"(e) DAG CeleryExecutor slots={n}", result))
    base = rows[0][1]["wall_s"]
    if args.json:
        print(json.dumps([{"config": name, **r, "vs_bare": r["wall_s"] / base} for name, r in rows]))
        return
    print(f"{args.clips} clips, batch {args.batch_size}, ASR, {args.max_new_tokens} new tokens, preset "
          f"{args.preset}, CPU; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'configuration':<44} {'wall s':>8} {'x bare':>7} {'loads':>6} {'load s':>7}")
    for name, r in rows:
        ratio = r["wall_s"] / base
        print(f"{name:<44} {r['wall_s']:8.1f} {ratio:7.2f} {int(r['loads']):>6} {r['load_s']:7.1f}")
    for name, r in rows:
        if "label_batch_s" in r:
            print(f"{name[:3]} DAG run start->end {r['wall_s']:.1f} s; trigger->seen done "
                  f"{r['trigger_to_done_s']:.1f} s; label_batch durations {r['label_batch_s']} s on "
                  f"{r['label_batch_slots']}; labelled {r['labelled']}; stack start-up "
                  f"{r['stack_start_s']:.1f} s (not counted)")  # fmt: skip
    print("dag.test() runs all slots in one process (the backend cache reuses the model); under a real "
          "executor each slot loads once: loads per DAG run = slots. Target: DAG <= 1.3x bare.")  # fmt: skip


if __name__ == "__main__":
    main()

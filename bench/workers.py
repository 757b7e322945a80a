"""Workers benchmark: 1, 2 and 4 `qwen-tasks work` processes on the same run (tiny model, CPU).

    .venv/bin/python bench/workers.py                     # 128 clips (0.5-3 s), batch 16, workers 1,2,4
    .venv/bin/python bench/workers.py --workers 1,2 --clips 64 --batch-size 4

For each worker count the same clips are planned again (relabel) and that many worker processes are
started at once. Reported per configuration, from the jobs' own database timestamps and timings:
- jobs/s and clips/s over the span first claim -> last commit (model loading is excluded: it is per
  process and the same for any job queue; it is reported separately);
- claim overhead: time spent in the claim query (`label_job.claim_seconds`) as a share of the job time
  (claim + process). Target (issue 6): < 2 % at the default batch size.
Each worker gets cores // workers torch threads (so 4 workers on 2 cores are oversubscribed, as they
would be in real life: the figures then show contention, not a queue bottleneck).
Uses a throwaway database on the local server (or --admin-url); it is dropped at the end.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tasks.labelling import jobs  # noqa: E402
from qwen_tasks.labelling.backends import planned_model_info  # noqa: E402
from qwen_tasks.records import JobStatus, LabelRequest  # noqa: E402
from qwen_tasks.store import database as db  # noqa: E402
from qwen_tasks.store import schema  # noqa: E402


def make_clips(folder: Path, n: int) -> None:
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        seconds = 0.5 + 2.5 * rng.random()
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.2 * np.sin(2 * np.pi * (150 + i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(folder / f"b{i:05d}.wav", wave.astype("float32"), 16000)


def run_config(
    engine: sa.Engine, url: str, model: Path, workers: int, batch_size: int, lease: float, threads: int
) -> dict[str, object]:
    request = LabelRequest(task="cry")
    info = planned_model_info(str(model), request, device="cpu")
    plan = jobs.plan_run(engine, jobs.RunRequest(
        task="cry", model_info=info, request=request, batch_size=batch_size,
        max_batch_seconds=240.0, relabel=True, params={"device": "cpu"},
    ))  # fmt: skip
    if plan.run_id is None:
        raise SystemExit("nothing planned: did ingest find the clips?")
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": url, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}  # fmt: skip
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qwen_tasks",
                "work",
                "--run",
                str(plan.run_id),
                "--lease-seconds",
                str(lease),
                "--worker-id",
                f"bench-{workers}-{k}",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for k in range(workers)
    ]
    outs = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    j = schema.label_job
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.sum(j.c.n_items),
                sa.func.sum(j.c.claim_seconds),
                sa.func.sum(j.c.process_seconds),
                sa.func.max(j.c.claim_seconds),
                # first job start after its model was loaded (finished_at - process time) -> last commit
                sa.func.extract(
                    "epoch",
                    sa.func.max(j.c.finished_at)
                    - sa.func.min(
                        j.c.finished_at - sa.func.make_interval(0, 0, 0, 0, 0, 0, j.c.process_seconds)
                    ),
                ),
                sa.func.count(sa.distinct(j.c.lease_owner)),
            ).where(j.c.run_id == plan.run_id, j.c.status == JobStatus.DONE)
        ).one()
    n_jobs, clips, claim, process, claim_max, span, owners = row
    span = float(span)
    return {
        "workers": workers,
        "workers_that_did_jobs": owners,
        "jobs": n_jobs,
        "clips": int(clips),
        "batch_size": batch_size,
        "span_s": round(span, 3),
        "jobs_per_s": round(n_jobs / span, 3),
        "clips_per_s": round(int(clips) / span, 2),
        "mean_claim_ms": round(1000 * claim / n_jobs, 3),
        "max_claim_ms": round(1000 * claim_max, 3),
        "mean_job_s": round(process / n_jobs, 3),
        "claim_overhead_pct": round(100 * claim / (claim + process), 4),
        "model_load_s_per_worker": round(sum(o["model_load_seconds"] for o in outs) / workers, 2),
        "wall_incl_startup_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per job (default: the CLI default)")
    parser.add_argument("--lease-seconds", type=float, default=jobs.DEFAULT_LEASE_SECONDS)
    parser.add_argument("--model", type=Path, help="a model dir (default: build the tiny model)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
        or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores // workers)")
    parser.add_argument("--json", action="store_true", help="print results as one JSON list")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    cores = os.cpu_count() or 1

    results = []
    with db.scratch_database(args.admin_url, prefix="qwen_tasks_bench") as url:
        engine = db.get_engine(url)
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model
            if model is None:
                from qwen_tasks.dev.tiny_model import make_tiny_model

                model = make_tiny_model(Path(tmp) / "tiny")
            make_clips(Path(tmp) / "clips", args.clips)
            from qwen_tasks.ingest.register import ingest

            ingest(engine, [Path(tmp) / "clips"])
            for w in counts:
                threads = args.threads or max(1, cores // w)
                res = run_config(engine, url, model, w, args.batch_size, args.lease_seconds, threads)
                res["torch_threads_per_worker"] = threads
                results.append(res)
                if not args.json:
                    print(
                        f"{w} worker(s): {res['jobs']} jobs of <= {args.batch_size} clips in "
                        f"{res['span_s']} s -> {res['jobs_per_s']} jobs/s, {res['clips_per_s']} clips/s; "
                        f"claim {res['mean_claim_ms']} ms mean (max {res['max_claim_ms']}) / "
                        f"{res['mean_job_s']} s per job = {res['claim_overhead_pct']} % overhead; "
                        f"{res['workers_that_did_jobs']} worker(s) did jobs",
                        flush=True,
                    )
    if args.json:
        print(json.dumps(results))
    print(f"cpu cores: {cores}; target: claim overhead < 2 % at the default batch size", file=sys.stderr)


if __name__ == "__main__":
    main()

"""How many wrong gold labels the `gold-conflict` review queue finds, against a `random` queue.

    python bench/review.py                        # 2,000 clips, 10 % flipped gold, 5 data seeds
    python bench/review.py --clips 10000 --seeds 3 --save bench/results/review.json

A throwaway database is made on the configured server (QWEN_TASKS_TEST_DATABASE_URL's, or --admin-url),
migrated, filled and dropped at the end. Per data seed, through the real tables (constraints, foreign keys
and the current_label triggers in force):

- N clips (audio, audio_file) with an audio-QA manifest line each whose gold label is the clip's true
  class (40 % yes) except for a known 10 % picked at random, whose gold is flipped;
- one production `score` run with an out-of-sample p_yes per clip (threshold 0.5), drawn from a
  "calibrated-ish" model: logit = ±mu + sigma · N(0, 1) around the true class (mu 2, sigma 1.5: ROC AUC
  about 0.96 against the true classes), and a second, miscalibrated setting whose logits are all shifted
  by +1.5 (a model that says yes too readily, as an uncalibrated threshold of 0.5 would leave it).

Then, on the same rows, `review.queue.rank` builds queues of 10 % of the clips (N / 10): `gold-conflict`
without a random share, `gold-conflict` with the default share, `uncertainty` (no share) and `random`;
the figure per queue is the share of the flipped labels it holds (recall of the flips in the first 10 %
of the queue) and its precision (flipped / queued). Mean ± standard deviation over the seeds, side by side
in one run; the rank call's wall time is shown too (it is not the point).
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tasks.records import Task  # noqa: E402
from qwen_tasks.review.queue import DEFAULT_RANDOM_SHARE, Strategy, rank  # noqa: E402
from qwen_tasks.store import database as db  # noqa: E402
from qwen_tasks.store import schema  # noqa: E402

FLIP_SHARE = 0.10
YES_SHARE = 0.40
SETTINGS = {"calibrated-ish": 0.0, "says yes too readily (+1.5 logit)": 1.5}
QUEUES = (  # (name, strategy, random share)
    ("gold-conflict", Strategy.GOLD_CONFLICT, 0.0),
    (f"gold-conflict + {DEFAULT_RANDOM_SHARE:.0%} random", Strategy.GOLD_CONFLICT, DEFAULT_RANDOM_SHARE),
    ("uncertainty", Strategy.UNCERTAINTY, 0.0),
    ("random", Strategy.RANDOM, 1.0),
)


def _bench_sql():
    """bench/sql.py's throwaway-database helper (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_sql", ROOT / "bench" / "sql.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill(engine: sa.Engine, n: int, seed: int, bias: float, mu: float, sigma: float) -> set[int]:
    """N clips with (partly flipped) manifest gold and one score run; returns the flipped clips' ids."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < YES_SHARE
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=round(n * FLIP_SHARE), replace=False)] = True
    gold = truth ^ flipped
    logit = np.where(truth, mu, -mu) + sigma * rng.standard_normal(n) + bias
    p_yes = 1.0 / (1.0 + np.exp(-logit))
    with engine.begin() as conn:
        for table in (
            "cry_answer",
            "label_job_item",
            "label_job",
            "label_run",
            "manifest_item",
            "audio_file",
        ):
            conn.execute(sa.text(f"TRUNCATE {table} RESTART IDENTITY CASCADE"))  # noqa: S608 - fixed names
        conn.execute(sa.text("TRUNCATE audio RESTART IDENTITY CASCADE"))
        ids = (
            conn.execute(
                schema.audio.insert().returning(schema.audio.c.id, sort_by_parameter_order=True),
                [
                    {
                        "sha256": f"{seed:08x}{i:056x}",
                        "size_bytes": 32000,
                        "duration_s": 10.0,
                        "sample_rate": 16000,
                        "channels": 1,
                        "frames": 160000,
                        "format": "WAV",
                    }
                    for i in range(n)
                ],  # fmt: skip
            )
            .scalars()
            .all()
        )
        files = (
            conn.execute(
                schema.audio_file.insert().returning(schema.audio_file.c.id, sort_by_parameter_order=True),
                [
                    {"path": f"/bench/clip_{i:06d}.wav", "audio_id": a, "status": "ok"}
                    for i, a in enumerate(ids)
                ],
            )
            .scalars()
            .all()
        )
        conn.execute(
            schema.manifest_item.insert(),
            [
                {
                    "manifest_path": "/bench/cry.jsonl",
                    "line_no": i + 1,
                    "kind": "aqa",
                    "audio_path": f"clip_{i:06d}.wav",
                    "audio_file_id": f,
                    "question": "Is there a baby crying?",
                    "gt": g,
                    "gold_label": g,
                }
                for i, (f, g) in enumerate(zip(files, np.where(gold, "yes", "no").tolist(), strict=True))
            ],  # fmt: skip
        )
        run_id = conn.execute(
            schema.label_run.insert()
            .values(
                task="cry", model="bench-model", prompt_version="v1", status="done", n_planned=n, n_labelled=n
            )
            .returning(schema.label_run.c.id)
        ).scalar_one()
        job_id = conn.execute(
            schema.label_job.insert()
            .values(run_id=run_id, seq=0, status="done", n_items=n)
            .returning(schema.label_job.c.id)
        ).scalar_one()
        conn.execute(
            schema.label_job_item.insert(), [{"job_id": job_id, "run_id": run_id, "audio_id": a} for a in ids]
        )
        conn.execute(
            schema.cry_answer.insert(),
            [
                {
                    "run_id": run_id,
                    "job_id": job_id,
                    "audio_id": a,
                    "method": "score",
                    "p_yes": p,
                    "label": "yes" if p >= 0.5 else "no",
                    "threshold": 0.5,
                }
                for a, p in zip(ids, p_yes.tolist(), strict=True)
            ],  # fmt: skip
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))  # as autovacuum would after a bulk load: planner statistics
    return {a for a, f in zip(ids, flipped.tolist(), strict=True) if f}


def measure(engine: sa.Engine, n: int, flipped: set[int], seed: int) -> dict[str, dict[str, float]]:
    limit = max(1, n // 10)
    out = {}
    with engine.connect() as conn:
        for name, strategy, share in QUEUES:
            start = time.perf_counter()
            clips = rank(
                conn,
                task=Task.CRY,
                dataset_ids=None,
                strategy=strategy,
                limit=limit,
                random_share=share,
                seed=seed,
            )
            seconds = time.perf_counter() - start
            found = sum(1 for c in clips if c.audio_id in flipped)
            out[name] = {
                "recall": found / len(flipped),
                "precision": found / len(clips) if clips else 0.0,
                "queued": len(clips),
                "seconds": seconds,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--mu", type=float, default=2.0, help="class separation of the logits")
    parser.add_argument("--sigma", type=float, default=1.5, help="noise of the logits")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
        or f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--save", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import cleanlab.filter  # noqa: F401 - imported before the first rank call is timed

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with _bench_sql().bench_database(args.admin_url, keep=False) as url:
        engine = db.get_engine(url)
        db.upgrade(engine)
        for setting, bias in SETTINGS.items():
            for seed in range(args.seeds):
                flipped = fill(engine, args.clips, seed, bias, args.mu, args.sigma)
                for name, figures in measure(engine, args.clips, flipped, seed).items():
                    results.setdefault(setting, {}).setdefault(name, []).append(figures)
        engine.dispose()

    print(f"{args.clips} clips, {FLIP_SHARE:.0%} gold flipped, queues of {args.clips // 10} clips, "
          f"{args.seeds} data seeds (mean ± sd)")  # fmt: skip
    print(f"{'model':36} {'queue':28} {'flips found':>14} {'precision':>14} {'rank s':>7}")
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for setting, by_queue in results.items():
        for name, runs in by_queue.items():
            figures = {k: [r[k] for r in runs] for k in ("recall", "precision", "seconds")}
            row = {f"{k}_mean": statistics.fmean(v) for k, v in figures.items()}
            row |= {f"{k}_sd": statistics.pstdev(v) for k, v in figures.items()}
            summary.setdefault(setting, {})[name] = row
            print(
                f"{setting:36} {name:28} {row['recall_mean']:8.1%} ±{row['recall_sd']:4.1%} "
                f"{row['precision_mean']:8.1%} ±{row['precision_sd']:4.1%} {row['seconds_mean']:7.3f}"
            )
    if args.save:
        shown = {k: str(v) for k, v in vars(args).items() if k != "admin_url"}
        args.save.write_text(json.dumps({"args": shown, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ranked review queue (review.queue) against the real PostgreSQL: labels written through the schema
tables (tests/review_seed.py, triggers keep current_label) or by the tiny model through the real worker;
each strategy's order and exclusions, the random share, reviewed clips and dataset scope, what
record_queued stores, and the CLI (`review queue`, `review-export --strategy`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from cleanlab.rank import get_label_quality_scores
from labelling_helpers import ingest_clips, run_cli
from review_seed import (
    CRY_GOLD,
    CRY_P_YES,
    Job,
    add_audio,
    add_cry_answers,
    add_human,
    add_run,
    add_transcripts,
    seed_asr_scenario,
)
from review_seed import seed_cry_scenario as seed_cry
from sqlalchemy.engine import Engine

from qwen_tasks.records import Task
from qwen_tasks.review.queue import QueuedClip, Strategy, rank, record_queued
from qwen_tasks.store import schema

U, D, G, R = Strategy.UNCERTAINTY, Strategy.DISAGREEMENT, Strategy.GOLD_CONFLICT, Strategy.RANDOM


def _rank(engine: Engine, task: str = "cry", **kw: object) -> list[QueuedClip]:
    args: dict[str, object] = {"dataset_ids": None, "limit": 50, "random_share": 0.0, "seed": 1}
    args.update(kw)
    with engine.connect() as conn:
        return rank(conn, task=Task(task), **args)  # type: ignore[arg-type]


def _dataset(engine: Engine, name: str, audio_ids: list[int], task: str = "cry") -> int:
    with engine.begin() as conn:
        dataset_id = conn.execute(
            schema.dataset.insert().values(name=name, tasks=[task]).returning(schema.dataset.c.id)
        ).scalar_one()
        conn.execute(
            schema.dataset_audio.insert(), [{"dataset_id": dataset_id, "audio_id": a} for a in audio_ids]
        )
    return dataset_id


def test_cry_uncertainty_is_closest_to_the_answers_threshold_and_skips_reviewed(engine: Engine) -> None:
    run_id, ids = seed_cry(engine)  # p_yes 0.9 0.8 0.45 0.7 0.2 0.65 0.1 0.3, threshold 0.5
    queue = _rank(engine, strategy=U)
    assert [c.audio_id for c in queue] == [ids[k] for k in (2, 5, 3, 7, 1, 4, 0, 6)]
    assert {(c.strategy, c.run_id, c.task) for c in queue} == {(U, run_id, Task.CRY)}
    assert queue[0].priority == pytest.approx(0.9) and "0.450" in queue[0].reason
    add_human(engine, ids[2], "cry", label="yes")
    add_human(engine, ids[5], "asr", text="a transcript")  # reviewed for the other task: still queued
    assert [c.audio_id for c in _rank(engine, strategy=U, limit=2)] == [ids[5], ids[3]]
    # a newer run decided with another threshold: the distance is to the threshold of the clip's answer
    run2 = add_run(engine, "cry", [Job(0, 1, [ids[0]], process_seconds=1)])
    add_cry_answers(engine, run2, score={ids[0]: 0.82}, threshold=0.8)
    first = _rank(engine, strategy=U)[0]
    assert (first.audio_id, first.run_id) == (ids[0], run2) and first.priority == pytest.approx(0.96)


def test_cry_disagreement_methods_and_versions(engine: Engine) -> None:
    run1, ids = seed_cry(engine)  # score vs generate disagree (both yes/no) only on ids[3]: 0.7 yes vs no
    run2 = add_run(engine, "cry", [Job(0, 5, [ids[0], ids[4], ids[6]], process_seconds=1)], model="other")
    add_cry_answers(engine, run2, score={ids[0]: 0.1, ids[4]: 0.3, ids[6]: 0.6})  # ids[4] agrees (no, no)
    queue = _rank(engine, strategy=D)
    assert [(c.audio_id, c.run_id) for c in queue] == [(ids[0], run2), (ids[6], run2), (ids[3], run1)]
    assert [round(c.priority, 6) for c in queue] == [0.8, 0.5, 0.4]
    assert "other" in queue[0].reason and "tiny-qwen2-audio" in queue[0].reason
    assert "generate answered no" in queue[2].reason


def test_cry_gold_conflict_ranks_contradicted_gold_by_label_quality(engine: Engine) -> None:
    run_id, ids = seed_cry(engine)  # gold yes×4, no×4; contradicted: ids[2] (p 0.45, yes), ids[5] (0.65, no)
    queue = _rank(engine, strategy=G)
    assert [c.audio_id for c in queue[:2]] == [ids[5], ids[2]]
    # priority = 1 − cleanlab's class-adjusted self-confidence of the gold label, over all eight clips
    probs = np.array([[1 - p, p] for p in CRY_P_YES])
    labels = np.array([int(g == "yes") for g in CRY_GOLD])
    quality = get_label_quality_scores(labels, probs, method="self_confidence", adjust_pred_probs=True)
    assert [c.priority for c in queue[:2]] == pytest.approx([1 - quality[5], 1 - quality[2]])
    assert "manifest gold no" in queue[0].reason
    assert all(c.strategy is G for c in queue)
    # a fine-tuned version's p_yes on its own training clips is in-sample: left out
    with engine.begin() as conn:
        conn.execute(schema.label_run.update().values(params={"model_version": "v1"}))
        conn.execute(schema.finetune_split.insert().values(task="cry", audio_id=ids[5], part="train"))
        conn.execute(schema.finetune_split.insert().values(task="cry", audio_id=ids[2], part="heldout"))
    assert ids[5] not in {c.audio_id for c in _rank(engine, strategy=G)}
    assert _rank(engine, strategy=G)[0].audio_id == ids[2]


def test_random_is_seeded_uniform_and_mixed_into_every_strategy(engine: Engine) -> None:
    _, ids = seed_cry(engine)
    add_human(engine, ids[0], "cry", label="yes")
    a, b = _rank(engine, strategy=R, limit=5, seed=7), _rank(engine, strategy=R, limit=5, seed=7)
    assert a == b and len(a) == 5 and all(c.strategy is R and c.priority == 0.0 for c in a)
    assert ids[0] not in {c.audio_id for c in a}
    assert len({tuple(c.audio_id for c in _rank(engine, strategy=R, limit=7, seed=s)) for s in range(6)}) > 1
    mixed = _rank(engine, strategy=U, limit=5, random_share=0.4, seed=3)  # 2 random, spread out
    assert [c.strategy for c in mixed] == [U, R, U, R, U]
    ranked = [c.audio_id for c in mixed if c.strategy is U]
    assert ranked == [ids[2], ids[5], ids[3]]  # the top 3, in order
    assert not {c.audio_id for c in mixed if c.strategy is R} & set(ranked)
    assert "seed 3" in mixed[1].reason
    default = _rank(engine, strategy=U, limit=7, random_share=0.1)  # round(0.7) = 1 random clip
    assert [c.strategy for c in default].count(R) == 1


def test_dataset_scope_and_queued_destination(engine: Engine) -> None:
    _, ids = seed_cry(engine)
    first = _dataset(engine, "first-half", ids[:4])
    queue = _rank(engine, strategy=U, dataset_ids=[first])
    assert [c.audio_id for c in queue] == [ids[2], ids[3], ids[1], ids[0]]
    assert _rank(engine, strategy=R, dataset_ids=[]) == []
    with engine.begin() as conn:
        record_queued(conn, queue[:2], "label-studio:project/3")
        stored = conn.execute(sa.select(schema.review_queued).order_by(schema.review_queued.c.id)).all()
    assert [(r.audio_id, r.task, r.strategy, r.destination) for r in stored] == [
        (ids[2], "cry", "uncertainty", "label-studio:project/3"),
        (ids[3], "cry", "uncertainty", "label-studio:project/3"),
    ]
    assert stored[0].reason == queue[0].reason and stored[0].priority == queue[0].priority
    again = _rank(engine, strategy=U, dataset_ids=[first], exclude_destination="label-studio:project/3")
    assert [c.audio_id for c in again] == [ids[1], ids[0]]


def test_asr_uncertainty_from_a_tiny_model_run(engine: Engine, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real transcripts with their mean_logprob (written by the worker): lowest first."""
    from qwen_tasks.labelling import jobs, worker
    from qwen_tasks.labelling.backends import get_backend, model_info
    from qwen_tasks.records import LabelRequest

    ingest_clips(engine, tmp_path / "a", [1.0, 1.5, 2.0, 2.5])
    backend = get_backend(str(tiny_model_dir), device="cpu")
    request = LabelRequest("asr", max_new_tokens=5)
    planned = jobs.plan_run(engine, jobs.RunRequest(
        task="asr", model_info=model_info(backend, request), request=request, batch_size=4,
        max_batch_seconds=60.0,
    ))  # fmt: skip
    worker.work(
        engine, planned.run_id, worker.WorkerOptions(lease_seconds=30), backend_factory=lambda run: backend
    )
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(schema.transcription.c.audio_id, schema.transcription.c.mean_logprob)
        ).all()
    expected = [a for a, _ in sorted(stored, key=lambda r: (r.mean_logprob, r.audio_id))]
    queue = _rank(engine, "asr", strategy=U)
    assert [c.audio_id for c in queue] == expected
    assert all(c.run_id == planned.run_id for c in queue)
    assert queue[0].priority == pytest.approx(-min(m for _, m in stored))


def test_asr_gold_conflict_and_disagreement(engine: Engine) -> None:
    run1, ids = seed_asr_scenario(engine)  # error rates vs the manifest: 2/6, 0 (zh forms), 2/4
    queue = _rank(engine, "asr", strategy=G)
    assert [(c.audio_id, round(c.priority, 4)) for c in queue] == [(ids[2], 0.5), (ids[0], round(2 / 6, 4))]
    with engine.begin() as conn:  # a confident transcript's errors matter more than an unsure one's
        conn.execute(
            schema.transcription.update()
            .where(schema.transcription.c.audio_id == ids[2])
            .values(mean_logprob=math.log(0.5))
        )
    assert [c.audio_id for c in _rank(engine, "asr", strategy=G)] == [ids[0], ids[2]]
    assert _rank(engine, "asr", strategy=D) == []
    run2 = add_run(engine, "asr", [Job(0, 2, ids[:2], process_seconds=1)], model="other")
    add_transcripts(engine, run2, {ids[0]: "the cat sat on the mat", ids[1]: "今天天气很好"})
    queue = _rank(engine, "asr", strategy=D)
    assert [(c.audio_id, c.run_id) for c in queue] == [(ids[0], run2)]
    assert queue[0].priority == pytest.approx(2 / 6) and "error rate" in queue[0].reason


def test_cli_review_queue_and_ranked_export(engine: Engine, database_url: str, tmp_path: Path) -> None:
    _, ids = seed_cry(engine)
    shown = run_cli(
        ["review", "queue", "--task", "cry", "--strategy", "gold-conflict", "--json"], database_url
    )
    assert shown.returncode == 0, shown.stderr
    clips = json.loads(shown.stdout)["clips"]
    assert [c["audio_id"] for c in clips[:2]] == [ids[5], ids[2]] and clips[0]["reason"]
    table = run_cli(
        ["review", "queue", "--task", "cry", "--strategy", "uncertainty", "--limit", "3"], database_url
    )
    assert table.returncode == 0 and "uncertainty" in table.stderr and "threshold" in table.stderr
    out = tmp_path / "review" / "cry.json"
    exported = run_cli(
        ["review-export", "--task", "cry", "--out", str(out), "--strategy", "uncertainty", "--limit", "4",
         "--random-share", "0.25", "--json"],
        database_url,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert f"4 task(s) from the uncertainty queue written to {out}" in exported.stderr
    tasks = json.loads(out.read_text())
    assert len(tasks) == 4 and [t["data"]["strategy"] for t in tasks].count("random") == 1
    assert all(t["data"]["reasons"] and t["predictions"][0]["result"] for t in tasks)
    assert tasks[0]["data"]["audio_id"] == ids[2] and tasks[0]["data"]["question"]
    with engine.connect() as conn:
        stored = conn.execute(sa.select(schema.review_queued)).all()
    assert {r.destination for r in stored} == {f"file:{out.resolve()}"}
    assert sorted(r.audio_id for r in stored) == sorted(t["data"]["audio_id"] for t in tasks)
    with_run = run_cli(
        ["review-export", "--task", "cry", "--out", str(out), "--strategy", "random", "--run", "1"],
        database_url,
    )
    assert with_run.returncode == 1 and "leave out --run" in with_run.stderr
    bad = run_cli(["review", "queue", "--task", "cry", "--strategy", "loudest"], database_url)
    assert bad.returncode == 1 and "--strategy must be one of" in bad.stderr and "Traceback" not in bad.stderr
    share = run_cli(
        ["review", "queue", "--task", "cry", "--strategy", "random", "--random-share", "2"], database_url
    )
    assert share.returncode == 1 and "--random-share must be between 0 and 1" in share.stderr
    unused = add_audio(engine, 1, start=50)
    assert unused[0] not in {c["audio_id"] for c in clips}  # no label: never queued

"""Run metrics computed from a seeded database, against hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa
from review_seed import (
    Job,
    add_audio,
    add_cry_answers,
    add_gold,
    add_human,
    add_run,
    seed_asr_scenario,
    seed_cry_scenario,
)
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling.jobs import latest_run_ids
from qwen_tasks.quality.metrics import (
    best_threshold,
    binary_scores,
    compute_run_metrics,
    load_run_metrics,
    roc_auc,
    threshold_sweep,
)
from qwen_tasks.store import schema


def test_binary_scores_hand_computed() -> None:
    gold = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    pred = ["yes", "no", "yes", "yes", "no", "no", "unknown", "unknown"]
    s = binary_scores(gold, pred)
    assert (s.tp, s.fn, s.fp, s.tn, s.unknown_yes, s.unknown_no) == (2, 1, 1, 2, 1, 1)
    assert s.accuracy == pytest.approx(4 / 6)
    assert s.accuracy_strict == pytest.approx(4 / 8)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 / 3)


def test_binary_scores_edge_cases() -> None:
    nothing = binary_scores([], [])
    assert nothing.accuracy is None and nothing.precision is None and nothing.f1 is None
    all_unknown = binary_scores(["yes", "no"], ["unknown", "unknown"])
    assert all_unknown.accuracy is None and all_unknown.accuracy_strict == 0
    never_yes = binary_scores(["yes", "no"], ["no", "no"])
    assert never_yes.precision is None and never_yes.recall == 0
    with pytest.raises(ValueError, match="length"):
        binary_scores(["yes"], [])


def test_roc_auc_and_single_class() -> None:
    gold = ["yes", "yes", "no", "no"]
    assert roc_auc(gold, [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert roc_auc(["yes", "yes"], [0.2, 0.9]) is None


def test_threshold_sweep_best_f1() -> None:
    gold = ["yes", "yes", "no", "no"]
    sweep = threshold_sweep(gold, [0.9, 0.35, 0.3, 0.1], thresholds=(0.2, 0.32, 0.5))
    assert [r["f1"] for r in sweep] == pytest.approx([0.8, 1.0, 2 / 3])
    assert best_threshold(sweep)["threshold"] == 0.32
    assert best_threshold([{"threshold": 0.5, "f1": None}]) is None


def test_cry_run_metrics_hand_computed(engine: Engine) -> None:
    run_id, _ = seed_cry_scenario(engine)
    m = compute_run_metrics(engine, run_id)
    assert m["run_id"] == run_id and m["task"] == "cry"
    assert m["n_results"] == 8 and m["n_gold"] == 8 and m["n_failed"] == 0
    # score: p_yes [.9 .8 .45 .7 | .2 .65 .1 .3] at 0.5 -> tp 3, fn 1, fp 1, tn 3
    assert m["score.accuracy"] == pytest.approx(0.75)
    assert m["score.precision"] == pytest.approx(0.75)
    assert m["score.recall"] == pytest.approx(0.75)
    assert m["score.f1"] == pytest.approx(0.75)
    assert m["score.unknown_rate"] == 0
    assert m["score.roc_auc"] == pytest.approx(15 / 16)
    # p >= 0.35 .. 0.45 catches all 4 positives and one negative: F1 = 2*.8*1/1.8; tie -> nearest 0.5
    assert m["score.best_threshold"] == pytest.approx(0.45)
    # generate: yes yes unk no | no yes no unk
    assert m["generate.accuracy"] == pytest.approx(4 / 6)
    assert m["generate.accuracy_strict"] == pytest.approx(4 / 8)
    assert m["generate.unknown_rate"] == pytest.approx(2 / 8)
    assert m["generate.precision"] == pytest.approx(2 / 3)
    assert m["methods.agreement"] == pytest.approx(5 / 6)
    # throughput: 8 items and 80 s of audio in 20 s wall, 16 s busy
    assert m["throughput.items_per_s"] == pytest.approx(0.4)
    assert m["throughput.audio_s_per_s"] == pytest.approx(4.0)
    assert m["throughput.rtf"] == pytest.approx(0.2)

    stored = load_run_metrics(engine, run_id)
    confusion = stored["score.confusion"]["details"]
    assert (confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"]) == (3, 1, 1, 3)
    gen = stored["generate.confusion"]["details"]
    assert (gen["tp"], gen["fp"], gen["fn"], gen["tn"]) == (2, 1, 1, 2)
    assert (gen["unknown_gold_yes"], gen["unknown_gold_no"]) == (1, 1)
    sweep = stored["score.best_threshold"]["details"]["sweep"]
    assert len(sweep) == 19 and stored["score.best_threshold"]["details"]["best"]["f1"] == pytest.approx(
        8 / 9
    )


def test_human_label_overrides_manifest_gold(engine: Engine) -> None:
    run_id, ids = seed_cry_scenario(engine)
    # the reviewer says clip 3 (manifest: yes, p_yes .45 -> no) has no crying: a false negative becomes a tn
    add_human(engine, ids[2], "cry", label="no")
    m = compute_run_metrics(engine, run_id)
    assert m["score.accuracy"] == pytest.approx(7 / 8)
    assert m["score.recall"] == pytest.approx(1.0)
    # a human "unknown" removes the gold for that clip altogether
    add_human(engine, ids[0], "cry", label="unknown")
    assert compute_run_metrics(engine, run_id)["n_gold"] == 7


def test_single_class_gold_gives_null_auc_not_a_crash(engine: Engine) -> None:
    ids = add_audio(engine, 3)
    add_gold(engine, dict.fromkeys(ids, "yes"))
    run_id = add_run(engine, "cry", [Job(0, 3, ids, process_seconds=1)])
    add_cry_answers(engine, run_id, score=dict(zip(ids, [0.9, 0.2, 0.7], strict=True)))
    m = compute_run_metrics(engine, run_id)
    assert m["score.roc_auc"] is None
    assert m["score.precision"] == 1.0 and m["score.recall"] == pytest.approx(2 / 3)
    details = load_run_metrics(engine, run_id)["score.roc_auc"]["details"]
    assert "single class" in details["note"]


def test_run_without_gold_or_results(engine: Engine) -> None:
    ids = add_audio(engine, 2)
    run_id = add_run(engine, "cry", [Job(0, 2, ids, process_seconds=1)])
    add_cry_answers(engine, run_id, score={ids[0]: 0.7, ids[1]: 0.1})
    m = compute_run_metrics(engine, run_id)
    assert m["n_gold"] == 0 and m["score.accuracy"] is None and m["score.roc_auc"] is None
    empty = add_run(engine, "asr", [])
    m = compute_run_metrics(engine, empty)
    assert m["n_results"] == 0 and "wer" not in m and "throughput.rtf" not in m


def test_asr_run_metrics_hand_computed(engine: Engine) -> None:
    run_id, ids = seed_asr_scenario(engine)
    m = compute_run_metrics(engine, run_id)
    assert m["n_reference"] == 3
    # en: "the cat sat on the mat" vs "the cat sit on mat": 1 S + 1 D over 6 words
    assert m["wer"] == pytest.approx(2 / 6)
    assert m["en.error_rate"] == pytest.approx(2 / 6)
    # zh: traditional ref = simplified hyp (0 of 6) and 高兴 -> 开心 (2 of 4): CER 2/10
    assert m["cer"] == pytest.approx(0.2)
    assert m["zh.error_rate"] == pytest.approx(0.2)
    assert m["error_rate"] == pytest.approx(4 / 16)
    # the official Qwen2-Audio scoring counts the traditional 氣 against 气: 1 + 2 of 10 characters
    assert m["cer_official"] == pytest.approx(0.3)
    assert m["wer_official"] == pytest.approx(2 / 6)
    stored = load_run_metrics(engine, run_id)
    assert stored["cer_official"]["details"]["n_ref"] == 10
    top = stored["substitutions"]["details"]["top"]
    assert {"reference": "高兴", "hypothesis": "开心", "count": 1} in top
    assert {"reference": "sat", "hypothesis": "sit", "count": 1} in top
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.utterance_score).order_by(schema.utterance_score.c.audio_id)
        ).all()
    assert [(r.language, r.unit, r.n_ref, r.error_rate) for r in rows] == [
        ("en", "word", 6, pytest.approx(2 / 6)),
        ("zh", "char", 6, 0.0),
        ("zh", "char", 4, 0.5),
    ]


def test_human_transcript_overrides_reference(engine: Engine) -> None:
    run_id, ids = seed_asr_scenario(engine)
    add_human(engine, ids[2], "asr", text="我很开心")  # the reviewer hears 开心: the model was right
    m = compute_run_metrics(engine, run_id)
    assert m["cer"] == 0
    with engine.connect() as conn:
        source = conn.execute(
            sa.select(schema.utterance_score.c.reference_source).where(
                schema.utterance_score.c.audio_id == ids[2]
            )
        ).scalar_one()
    assert source == "human"


def test_recompute_replaces_and_run_quality_view(engine: Engine) -> None:
    cry_run, _ = seed_cry_scenario(engine)
    asr_run, _ = seed_asr_scenario(engine)
    compute_run_metrics(engine, cry_run)
    compute_run_metrics(engine, cry_run)  # idempotent: replaces, no duplicate-key error
    compute_run_metrics(engine, asr_run)
    assert latest_run_ids(engine) == sorted([cry_run, asr_run])
    with engine.connect() as conn:
        rows = {r.run_id: r for r in conn.execute(sa.text("SELECT * FROM run_quality")).all()}
    assert rows[cry_run].score_accuracy == pytest.approx(0.75)
    assert rows[cry_run].score_roc_auc == pytest.approx(15 / 16)
    assert rows[cry_run].generate_unknown_rate == pytest.approx(0.25)
    assert rows[cry_run].wer is None
    assert rows[asr_run].cer == pytest.approx(0.2)
    assert rows[asr_run].wer == pytest.approx(2 / 6)


def test_unknown_run_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="run 999 does not exist"):
        compute_run_metrics(engine, 999)


def test_metrics_cli_json(engine: Engine, database_url: str) -> None:
    cry_run, _ = seed_cry_scenario(engine)
    asr_run, _ = seed_asr_scenario(engine)
    out = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "metrics", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["runs"]
    assert [r["run_id"] for r in runs] == sorted([cry_run, asr_run])
    by_task = {r["task"]: r for r in runs}
    assert by_task["cry"]["metrics"]["score.f1"] == pytest.approx(0.75)
    assert by_task["asr"]["metrics"]["cer"] == pytest.approx(0.2)
    one = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "metrics", "--run", str(cry_run)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert one.returncode == 0, one.stderr
    assert "score.accuracy" in one.stdout + one.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "qwen_tasks", "metrics", "--run", "12345"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 1 and "run 12345 does not exist" in missing.stderr

"""`qwen-tasks calibrate` end to end, as a user runs it: real subprocesses, tiny model, real database.

Label (no gold yet: one-line refusal), ingest gold, calibrate, label again: every score label records the
rule it was decided with and is decided by it; an explicit --threshold wins over the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import run_cli, write_clips
from sqlalchemy.engine import Engine

from qwen_tasks.labelling import decision
from qwen_tasks.labelling.options import DEFAULT_QUESTION
from qwen_tasks.review.export import export_lines, export_rows
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _answers(engine: Engine, run_id: int) -> list:
    c = schema.cry_answer.c
    with engine.connect() as conn:
        return conn.execute(
            sa.select(c.p_yes, c.label, c.threshold, c.calibration_id, c.p_calibrated)
            .where(c.run_id == run_id, c.method == "score")
            .order_by(c.audio_id)
        ).all()


def test_calibrate_base_model_then_label_with_it(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = ["--model", str(tiny_model_dir)]
    empty = run_cli(["calibrate", "--task", "cry", *model, "--json"], database_url)
    assert empty.returncode == 1
    assert last_json(empty.stdout)["error"].startswith("no cry labelling run of ")
    assert len(empty.stderr.strip().splitlines()) == 1 and "Traceback" not in empty.stderr

    folder = tmp_path / "audio"
    paths = write_clips(folder, [1.0 + 0.1 * i for i in range(12)])
    assert (
        run_cli(["ingest", str(folder), "--dataset", "clips", "--tasks", "cry"], database_url).returncode == 0
    )
    label = ["label", "--task", "cry", *model, "--device", "cpu", "--method", "score", "--json"]
    first = run_cli(label, database_url)
    assert first.returncode == 0, first.stderr
    first_run = last_json(first.stdout)["run_id"]

    no_gold = run_cli(["calibrate", "--task", "cry", *model], database_url)
    assert no_gold.returncode == 1
    assert no_gold.stderr.strip().splitlines() == [
        f"error: run {first_run} has no score answers with a held-out gold / reviewed label to calibrate on "
        "(label with --method score or both; review or ingest gold labels)"
    ]

    manifest = folder / "cry.jsonl"  # the question the first run asked: the same prompt, the same p_yes
    manifest.write_text(
        "".join(
            json.dumps({"question": DEFAULT_QUESTION, "audio": p.name, "gt": "yes" if i % 3 else "no"}) + "\n"
            for i, p in enumerate(paths)
        )
    )
    ingested = run_cli(["ingest", "--manifest", str(manifest), "--dataset", "clips"], database_url)
    assert ingested.returncode == 0, ingested.stderr

    fitted = run_cli(["calibrate", "--task", "cry", *model, "--calibration", "platt", "--json"], database_url)
    assert fitted.returncode == 0, fitted.stderr
    out = last_json(fitted.stdout)
    assert out["run_id"] == first_run and out["n_labels"] == 12 and out["n_yes"] == 8
    assert out["method"] == "platt" and out["objective"] == "max_f1"
    with engine.connect() as conn:
        rule = decision.load(conn, out["calibration_id"])
    assert rule is not None and rule.threshold == out["threshold"] and rule.params == out["params"]

    chosen = run_cli(["calibrate", "--task", "cry", *model, "--run", str(first_run), "--json"], database_url)
    assert chosen.returncode == 0 and last_json(chosen.stdout)["threshold"] == out["threshold"]
    with engine.connect() as conn:  # the same fit stored again: the newest rule is the one used
        rule = decision.load(conn, last_json(chosen.stdout)["calibration_id"])
    assert rule is not None and rule.id == out["calibration_id"] + 1
    missing = run_cli(["calibrate", "--task", "cry", *model, "--run", "999999"], database_url)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"error: no cry labelling run of {tiny_model_dir} with id 999999 to calibrate (run: qwen-tasks label "
        "--task cry)"
    ]

    # a new run decides with the (newest) rule and records it on every label
    again = run_cli([*label, "--relabel"], database_url)
    assert again.returncode == 0, again.stderr
    run_id = last_json(again.stdout)["run_id"]
    rows = _answers(engine, run_id)
    assert len(rows) == 12
    for r in rows:
        assert r.calibration_id == rule.id and r.threshold == rule.threshold
        assert r.p_calibrated == rule.apply(r.p_yes)  # the same numbers as the stored rule gives here
        assert r.label == ("yes" if r.p_calibrated >= rule.threshold else "no")
    # the raw p_yes is untouched: the same model on the same clips gave the same p_yes as before
    assert [r.p_yes for r in rows] == pytest.approx([r.p_yes for r in _answers(engine, first_run)], abs=1e-6)

    # the review and export surfaces show the rule beside p_yes: `export` lines (COPY and Python paths)
    # and Label Studio tasks carry calibration_id, threshold and p_calibrated
    out_file = tmp_path / "labels.jsonl"
    exported = run_cli(
        ["export", "--task", "cry", "--run", str(run_id), "--out", str(out_file)], database_url
    )
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert sorted((x["p_yes"], x["calibration_id"], x["threshold"], x["p_calibrated"], x["label"])
                  for x in lines) == sorted(
        (r.p_yes, rule.id, rule.threshold, r.p_calibrated, r.label) for r in rows)  # fmt: skip
    assert list(export_rows(engine, "cry", run_id)) == [
        json.loads(t) for t in export_lines(engine, "cry", run_id)
    ]
    ls_file = tmp_path / "review" / "cry.json"
    review = ["review-export", "--task", "cry", "--strategy", "random", "--limit", "12",
              "--out", str(ls_file)]  # fmt: skip
    assert run_cli(review, database_url).returncode == 0
    tasks = json.loads(ls_file.read_text())
    assert len(tasks) == 12
    p_calibrated = {r.p_yes: r.p_calibrated for r in rows}
    for t in tasks:
        data = t["data"]
        assert (data["calibration_id"], data["threshold"]) == (rule.id, rule.threshold)
        assert data["p_calibrated"] == pytest.approx(p_calibrated[data["p_yes"]])

    # an explicit --threshold wins: plain p_yes >= 0.3, no rule recorded
    manual = run_cli([*label, "--relabel", "--threshold", "0.3"], database_url)
    assert manual.returncode == 0, manual.stderr
    for r in _answers(engine, last_json(manual.stdout)["run_id"]):
        assert r.calibration_id is None and r.p_calibrated is None and r.threshold == 0.3
        assert r.label == ("yes" if r.p_yes >= 0.3 else "no")
    plain = list(export_rows(engine, "cry", last_json(manual.stdout)["run_id"]))
    assert plain and all("calibration_id" not in x and "p_calibrated" not in x for x in plain)

    metrics = run_cli(["metrics", "--run", str(run_id), "--json"], database_url)
    assert metrics.returncode == 0, metrics.stderr
    result = last_json(metrics.stdout)["runs"][0]
    assert result["details"]["score.ece"]["of"] == "p_calibrated"
    assert result["details"]["score.coverage"] == {"decided": 12, "total": 12}
    table = run_cli(["metrics", "--run", str(run_id)], database_url)
    assert "(coverage 12/12 = 100.0 %)" in table.stderr

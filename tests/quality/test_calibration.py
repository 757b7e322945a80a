"""Calibrated decisions: threshold selection, Platt / isotonic fits stored and re-applied, ECE and coverage.

The expected thresholds are found here by brute force over a fine grid with sklearn's own scores, not by
the code under test; fitted maps are compared with sklearn models fitted here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from review_seed import CRY_GOLD, CRY_P_YES, seed_cry_scenario
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_score
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling import decision
from qwen_tasks.quality import calibration
from qwen_tasks.quality.metrics import compute_run_metrics, load_run_metrics
from qwen_tasks.quality.report import write_report
from qwen_tasks.records import Calibration, LabelRequest
from qwen_tasks.store import schema

GRID = np.round(np.arange(0.0, 1.0005, 0.0005), 4)  # thresholds tried by brute force

# 12 scores, overlapping classes: no threshold separates them
SCORES = [0.05, 0.12, 0.2, 0.31, 0.38, 0.44, 0.52, 0.58, 0.66, 0.73, 0.81, 0.93]
GOLD = [False, False, True, False, False, True, False, True, True, False, True, True]


def _brute_force(scores, gold, metric):
    """(value, predicted-yes set) of `metric` for every grid threshold (score >= t is yes)."""
    s, g = np.asarray(scores), np.asarray(gold)
    out = []
    for t in GRID:
        pred = s >= t
        if not pred.any():
            continue
        out.append((float(t), metric(g, pred), frozenset(np.flatnonzero(pred))))
    return out


def _yes_set(scores, t):
    return frozenset(np.flatnonzero(np.asarray(scores) >= t))


def test_max_f1_threshold_is_the_brute_force_best() -> None:
    choice = calibration.select_threshold(SCORES, GOLD)
    rows = _brute_force(SCORES, GOLD, lambda g, p: f1_score(g, p))
    best = max(f for _, f, _ in rows)
    assert choice.objective == "max_f1" and choice.note is None
    assert choice.f1 == pytest.approx(best)
    # the grid thresholds with the best F1 decide exactly as the chosen one does
    assert _yes_set(SCORES, choice.threshold) in {y for _, f, y in rows if f == pytest.approx(best)}
    # and it sits halfway between two held-out scores, not on one
    assert choice.threshold not in SCORES
    below = max(s for s in SCORES if s < choice.threshold)
    above = min(s for s in SCORES if s >= choice.threshold)
    assert choice.threshold == pytest.approx((below + above) / 2)


def test_target_precision_is_the_lowest_threshold_reaching_it() -> None:
    choice = calibration.select_threshold(SCORES, GOLD, target_precision=0.75)
    rows = _brute_force(SCORES, GOLD, lambda g, p: precision_score(g, p))
    lowest = min(t for t, prec, _ in rows if prec >= 0.75)
    assert choice.objective == "precision>=0.75" and choice.precision >= 0.75
    # the same decisions as the lowest grid threshold reaching it (the rule's own sits mid-gap)
    assert _yes_set(SCORES, choice.threshold) == _yes_set(SCORES, lowest)


def test_an_unreachable_precision_keeps_the_max_f1_threshold_and_says_so() -> None:
    gold = [True, False] * 6  # alternating: the top score is a no, precision 1 is out of reach
    scores = [0.1 * (i % 6) + 0.05 for i in range(12)]
    choice = calibration.select_threshold(scores, gold, target_precision=1.0)
    default = calibration.select_threshold(scores, gold)
    assert choice.threshold == default.threshold and choice.objective == "max_f1"
    assert "no threshold reaches precision 1" in choice.note


def test_platt_fit_matches_sklearn_and_survives_storage(engine: Engine) -> None:
    fitted = calibration.fit_calibration(SCORES, GOLD, "platt")
    z = np.array([[math.log(p / (1 - p))] for p in SCORES])
    reference = LogisticRegression(C=1.0).fit(z, np.array(GOLD, dtype=int))
    for p, expected in zip(SCORES, reference.predict_proba(z)[:, 1], strict=True):
        assert fitted.apply(p) == pytest.approx(expected, abs=1e-12)
    _stored_rule_applies_identically(engine, fitted)


def test_isotonic_fit_matches_sklearn_and_survives_storage(engine: Engine) -> None:
    fitted = calibration.fit_calibration(SCORES, GOLD, "isotonic")
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(SCORES, GOLD)
    probes = [0.0, 0.01, *SCORES, 0.5, 0.555, 0.99, 1.0]
    for p, expected in zip(probes, reference.predict(probes), strict=True):
        assert fitted.apply(p) == pytest.approx(expected, abs=1e-12)
    assert all(b >= a for a, b in zip(fitted.y, fitted.y[1:], strict=False))  # monotone
    _stored_rule_applies_identically(engine, fitted)


def _stored_rule_applies_identically(engine: Engine, rule: Calibration) -> None:
    """Stored in decision_calibration, read back as planning reads it and sent through the run's request
    JSON as a worker gets it: the same numbers, the same decisions."""
    from sqlalchemy.dialects.postgresql import insert

    with engine.begin() as conn:
        conn.execute(insert(schema.dataset).values(name="d", tasks=["cry"]))
        stored = decision.store(
            conn,
            rule,
            {
                "model": "/m",
                "revision": "",
                "prompt_template": "p1",
                "objective": "max_f1",
                "n_labels": 12,
                "n_yes": 6,
            },  # fmt: skip
        )
    with engine.connect() as conn:
        loaded = decision.load(conn, stored.id)
    assert loaded == stored and loaded.id is not None
    with engine.connect() as conn:  # a base model's rule applies to a run of its prompt over any dataset
        assert decision.for_base(conn, "/m", "", "p1", [1]) == stored
        assert decision.for_base(conn, "/m", "", "p2", [1]) is None  # never to another prompt's scores
    import dataclasses

    as_json = {**dataclasses.asdict(LabelRequest(task="cry", calibration=loaded)), "methods": ["score"]}
    request = LabelRequest(**as_json)
    for p in [0.0, *SCORES, 1.0]:
        decided = request.decide(p)
        assert decided.p_calibrated == rule.apply(p)
        assert decided.label == ("yes" if rule.apply(p) >= rule.threshold else "no")
        assert decided.calibration_id == stored.id and decided.threshold == rule.threshold


def test_a_rule_needs_both_classes_and_valid_options() -> None:
    with pytest.raises(ConfigError, match="both classes, got 3 yes and 0 no"):
        calibration.fit_rule([0.2, 0.5, 0.9], [True, True, True])
    with pytest.raises(ConfigError, match="--calibration must be none, platt or isotonic"):
        calibration.fit_rule(SCORES, GOLD, "beta")
    with pytest.raises(ConfigError, match=r"--target-precision must be in \(0, 1\]"):
        calibration.fit_rule(SCORES, GOLD, target_precision=1.5)


def test_run_metrics_have_ece_from_sql_bins_and_coverage(engine: Engine) -> None:
    run_id, _ = seed_cry_scenario(engine)
    compute_run_metrics(engine, run_id)
    m = load_run_metrics(engine, run_id)
    # ECE over 10 equal-width bins, computed here from the seeded scores
    bins: dict[int, list] = {}
    for p, g in zip(CRY_P_YES, CRY_GOLD, strict=True):
        bins.setdefault(min(int(p * 10), 9), []).append((p, g == "yes"))
    expected = sum(
        abs(np.mean([p for p, _ in b]) - np.mean([g for _, g in b])) * len(b) for b in bins.values()
    )
    assert m["score.ece"]["value"] == pytest.approx(expected / len(CRY_P_YES))
    assert m["score.ece"]["details"]["of"] == "p_yes"
    assert len(m["score.ece"]["details"]["bins"]) == len(bins)
    # coverage: decided / clips with gold, per method
    score_cov = m["score.coverage"]["details"]
    assert score_cov == {"decided": 8, "total": 8} and m["score.coverage"]["value"] == 1.0
    gen = m["generate.accuracy"]["details"]
    assert m["generate.coverage"]["details"] == {"decided": gen["decided"], "total": 8}
    shown = calibration.shown("generate.accuracy", m["generate.accuracy"]["value"], {
        n: v["details"] for n, v in m.items()
    })  # fmt: skip
    share = gen["decided"] / 8
    assert (
        shown
        == f"{m['generate.accuracy']['value']:.3f} (coverage {gen['decided']}/8 = {share:.1%})".replace(
            "%", " %"
        )
    )


def test_report_shows_coverage_ece_and_a_reliability_diagram(engine: Engine, tmp_path: Path) -> None:
    run_id, _ = seed_cry_scenario(engine)
    page = write_report(engine, [run_id], tmp_path / "r.html").read_text(encoding="utf-8")
    assert re.search(r"<td>score\.accuracy</td><td[^>]*>0\.\d{3} \(coverage 8/8 = 100\.0 %\)</td>", page)
    assert re.search(r"<td>generate\.accuracy</td><td[^>]*>[01]\.\d{3} \(coverage \d/8 = ", page)
    assert "<td>score.ece</td>" in page
    assert page.count('<img alt="plot"') == 4  # p_yes histogram, ROC, reliability, throughput
    with engine.connect() as conn:
        n_bins = conn.execute(
            sa.select(
                sa.func.count(sa.distinct(sa.func.least(sa.func.floor(schema.cry_answer.c.p_yes * 10), 9)))
            ).where(schema.cry_answer.c.run_id == run_id, schema.cry_answer.c.method == "score")
        ).scalar_one()
    assert n_bins == len(load_run_metrics(engine, run_id)["score.ece"]["details"]["bins"])

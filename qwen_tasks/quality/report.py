"""One self-contained HTML report per set of runs: metrics, plots and the worst items to listen to.

Self-contained (plots are inline base64 PNGs, styles inline) so the file can be mailed, attached to an
Airflow run or opened from a shared drive with nothing else. A run's metrics are the stored ones when
they were computed from what the database holds now (`quality.metrics.current_run_metrics`), else they
are recomputed (and stored) first, so a report never shows numbers older than the labels it describes.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling.jobs import latest_run_ids
from qwen_tasks.quality.calibration import any_calibrated, draw_reliability, run_bins, shown
from qwen_tasks.quality.metrics import (
    GROUP_FIGURES,
    current_run_metrics,
    load_group_metrics,
    require_datasets,
    run_answers,
)
from qwen_tasks.records import JobStatus
from qwen_tasks.store.schema import (
    asr_reference,
    audio_path,
    cry_answer,
    cry_gold,
    dataset,
    dataset_audio,
    label_job,
    label_run,
    transcription,
    utterance_score,
)

WORST = 15


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{max-width:520px;border:1px solid #eee}
.muted{color:#777}code{font-size:.85em;word-break:break-all}
tr.selected td{background:#fff6d5;font-weight:bold}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return _esc(value)


def _png(fig: Any) -> str:
    """An <img> with the figure inline as base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def _table(
    headers: list[str],
    rows: list[list[Any]],
    numeric: set[int] | None = None,
    selected: set[int] | None = None,
) -> str:
    """An HTML table; `selected`: indexes of rows to highlight."""
    numeric = numeric or set()
    selected = selected or set()
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        ('<tr class="selected">' if n in selected else "<tr>")
        + "".join(
            f'<td class="num">{_fmt(v)}</td>' if i in numeric else f"<td>{_fmt(v)}</td>"
            for i, v in enumerate(r)
        )
        + "</tr>"
        for n, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>" if rows else '<p class="muted">none</p>'


# --- plots --------------------------------------------------------------------------------------------


def _throughput_plot(conn: sa.Connection, run_id: int) -> str | None:
    jobs = conn.execute(
        sa.select(label_job.c.finished_at, label_job.c.n_items)
        .where(
            label_job.c.run_id == run_id,
            label_job.c.status == JobStatus.DONE,
            label_job.c.finished_at.is_not(None),
        )
        .order_by(label_job.c.finished_at)
    ).all()
    start = conn.execute(
        sa.select(sa.func.min(label_job.c.started_at)).where(label_job.c.run_id == run_id)
    ).scalar()
    if not jobs or start is None:
        return None
    fig, ax = _figure(
        f"Run {run_id}: items labelled over time", "seconds since the first job started", "items"
    )
    xs, ys, total = [0.0], [0], 0
    for job in jobs:
        total += job.n_items
        xs.append((job.finished_at - start).total_seconds())
        ys.append(total)
    ax.step(xs, ys, where="post")
    ax.plot(xs, ys, "o", markersize=3)
    return _png(fig)


def _cry_plots(conn: sa.Connection, answers: Any, run_id: int) -> list[str]:
    """p_yes histogram by gold label and ROC curve, from counts aggregated in the database (`answers`: the
    section's answers with their gold label, a subquery): the plot data stay a few hundred numbers
    whatever the run's size."""
    a = answers.c
    has_score = conn.execute(
        sa.select(sa.exists().where(a.method == "score", a.p_yes.is_not(None)).select_from(answers))
    ).scalar_one()
    scored = sa.and_(a.p_yes.is_not(None), a.method == "score" if has_score else sa.true())
    bins = [i / 20 for i in range(21)]
    bucket = sa.func.least(sa.func.floor(a.p_yes * 20), 19).label("bucket")
    counts = conn.execute(
        sa.select(a.gold_label, bucket, sa.func.count().label("n"))
        .where(scored)
        .group_by(a.gold_label, bucket)
    ).all()
    plots: list[str] = []
    if not counts:
        return plots
    threshold = conn.execute(
        sa.select(a.threshold).where(scored, a.threshold.is_not(None)).limit(1)
    ).scalar_one_or_none()
    fig, ax = _figure(f"Run {run_id}: p_yes by gold label", "p_yes", "clips")
    groups = [("gold yes", "yes", "#d62728"), ("gold no", "no", "#1f77b4"), ("no gold", None, "#999999")]
    for name, gold, color in groups:
        weights = [0] * 20
        for r in counts:
            if r.gold_label == gold:
                weights[int(r.bucket)] += r.n
        if sum(weights):
            centres = [(bins[i] + bins[i + 1]) / 2 for i in range(20)]
            ax.hist(
                centres, bins=bins, weights=weights, alpha=0.6, label=f"{name} ({sum(weights)})", color=color
            )
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.legend()
    plots.append(_png(fig))
    # ROC: cumulative counts over p_yes rounded to 1e-3 (at most 1001 points), highest first
    level = sa.func.round(sa.cast(a.p_yes, sa.Numeric), 3).label("level")
    roc = conn.execute(
        sa.select(
            level,
            sa.func.count().filter(a.gold_label == "yes").label("pos"),
            sa.func.count().filter(a.gold_label == "no").label("neg"),
        )
        .where(scored, a.gold_label.is_not(None))
        .group_by(level)
        .order_by(level.desc())
    ).all()
    pos, neg = sum(r.pos for r in roc), sum(r.neg for r in roc)
    if pos and neg:
        fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
        for r in roc:
            tp, fp = tp + r.pos, fp + r.neg
            fpr.append(fp / neg)
            tpr.append(tp / pos)
        fig, ax = _figure(f"Run {run_id}: ROC curve", "false positive rate", "true positive rate")
        ax.plot(fpr, tpr, marker=".")
        ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        plots.append(_png(fig))
    return plots


def _wer_plot(rates: list[float], run_id: int) -> str | None:
    if not rates:
        return None
    fig, ax = _figure(f"Run {run_id}: utterance error rate (WER/CER)", "error rate", "utterances")
    top = max(1.0, max(rates))
    ax.hist(rates, bins=[top * i / 20 for i in range(21)], color="#2ca02c")
    return _png(fig)


# --- sections -----------------------------------------------------------------------------------------


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    details = {name: m["details"] or {} for name, m in metrics.items()}  # accuracy with its coverage
    rows = [
        [name, shown(name, m["value"], details)]
        for name, m in metrics.items()
        if not name.endswith(".confusion")
    ]
    return _table(["metric", "value"], rows, numeric={1})


def _confusion_tables(metrics: dict[str, dict[str, Any]]) -> str:
    out = []
    for method in ("score", "generate"):
        d = (metrics.get(f"{method}.confusion") or {}).get("details")
        if not d:
            continue
        out.append(f"<h4>{method}: confusion matrix (rows: gold)</h4>")
        out.append(
            _table(
                ["", "predicted no", "predicted yes", "unknown"],
                [
                    ["gold no", d["tn"], d["fp"], d["unknown_gold_no"]],
                    ["gold yes", d["fn"], d["tp"], d["unknown_gold_yes"]],
                ],
                numeric={1, 2, 3},
            )
        )
    return "".join(out)


def _cry_section(
    conn: sa.Connection, run_id: int, metrics: dict[str, dict[str, Any]], members: sa.Select | None = None
) -> tuple[str, list[str]]:
    """`members`: a query of the audio ids to show (one dataset's), None for the whole run. The section's
    answers and their gold label are read from `cry_run_clip` (quality.metrics.run_answers: one row per
    clip, kept by triggers) by every query below, not joined to cry_gold again."""
    answers = run_answers(run_id, members)
    a = answers.c
    parts = [_confusion_tables(metrics)]
    plots = _cry_plots(conn, answers, run_id)
    bins = run_bins(conn, answers)  # reliability diagram and ECE (quality.calibration)
    if bins:
        fig, ax = _figure(f"Run {run_id}: reliability (score)", "mean probability", "share of gold yes")
        draw_reliability(ax, bins, "p_calibrated" if any_calibrated(conn, answers) else "p_yes")
        plots.append(_png(fig))
    best = (metrics.get("score.best_threshold") or {}).get("details", {}).get("best")
    if best:
        parts.append(
            f"<p>Best-F1 threshold for p_yes: <b>{best['threshold']:g}</b> (F1 {_fmt(best['f1'])}, precision "
            f"{_fmt(best['precision'])}, recall {_fmt(best['recall'])}).</p>"
        )
    # the worst items only: sorted and cut in the database
    wrongness = sa.case((a.p_yes.is_(None), 1.0), (a.gold_label == "no", a.p_yes), else_=1.0 - a.p_yes)
    # the path and the raw answer: lookups the planner makes for the rows returned only
    path = sa.select(audio_path.c.path).where(audio_path.c.audio_id == a.audio_id).scalar_subquery()
    raw = (
        sa.select(cry_answer.c.raw_answer)
        .where(
            cry_answer.c.run_id == run_id,
            cry_answer.c.audio_id == a.audio_id,
            cry_answer.c.method == a.method,
        )
        .scalar_subquery()
    )
    shown = (
        a.audio_id,
        path.label("path"),
        a.method,
        a.gold_label,
        a.label,
        a.p_yes,
        raw.label("raw_answer"),
    )
    wrong = conn.execute(
        sa.select(*shown)
        .where(a.gold_label.is_not(None), a.label.in_(("yes", "no")), a.label != a.gold_label)
        .order_by(wrongness.desc(), a.audio_id, a.method)
        .limit(WORST)
    ).all()
    parts.append("<h3>Most confident mistakes</h3>")
    parts.append(
        _table(
            ["audio", "path", "method", "gold", "label", "p_yes", "answer"],
            [[r.audio_id, r.path, r.method, r.gold_label, r.label, r.p_yes, r.raw_answer] for r in wrong],
            numeric={0, 5},
        )
    )
    unknown = conn.execute(
        sa.select(*shown).where(a.label == "unknown").order_by(a.audio_id, a.method).limit(WORST)
    ).all()
    parts.append("<h3>Unknown answers</h3>")
    parts.append(
        _table(
            ["audio", "path", "method", "gold", "answer"],
            [[r.audio_id, r.path, r.method, r.gold_label, r.raw_answer] for r in unknown],
            numeric={0},
        )
    )
    return "".join(parts), plots


def _asr_section(
    conn: sa.Connection, run_id: int, metrics: dict[str, dict[str, Any]], members: sa.Select | None = None
) -> tuple[str, list[str]]:
    """`members`: a query of the audio ids to show (one dataset's), None for the whole run."""
    rows = conn.execute(
        sa.select(
            utterance_score.c.audio_id,
            utterance_score.c.language,
            utterance_score.c.unit,
            utterance_score.c.error_rate,
            utterance_score.c.n_ref,
            transcription.c.text,
            asr_reference.c.reference_text,
            audio_path.c.path,
        )
        .select_from(
            utterance_score.join(
                transcription,
                sa.and_(
                    transcription.c.run_id == utterance_score.c.run_id,
                    transcription.c.audio_id == utterance_score.c.audio_id,
                ),
            )
            .outerjoin(asr_reference, asr_reference.c.audio_id == utterance_score.c.audio_id)
            .outerjoin(audio_path, audio_path.c.audio_id == utterance_score.c.audio_id)
        )
        .where(utterance_score.c.run_id == run_id)
        .where(sa.true() if members is None else utterance_score.c.audio_id.in_(members))
        .order_by(utterance_score.c.error_rate.desc().nulls_last(), utterance_score.c.audio_id)
    ).all()
    plots = [p for p in [_wer_plot([r.error_rate for r in rows if r.error_rate is not None], run_id)] if p]
    parts = []
    top = (metrics.get("substitutions") or {}).get("details", {}).get("top") or []
    parts.append("<h3>Most frequent substitutions (reference → model)</h3>")
    parts.append(
        _table(
            ["reference", "model wrote", "count"],
            [[t["reference"], t["hypothesis"], t["count"]] for t in top],
            {2},
        )
    )
    parts.append("<h3>Worst utterances</h3>")
    parts.append(
        _table(
            ["audio", "path", "lang", "error rate", "reference", "transcript"],
            [[r.audio_id, r.path, r.language, r.error_rate, r.reference_text, r.text] for r in rows[:WORST]],
            numeric={0, 3},
        )
    )
    return "".join(parts), plots


def _group_tables(
    task: str, groups: dict[str, dict[str, dict[str, dict[str, Any]]]], selected: str | None
) -> str:
    """The run's key figures per dataset and per manifest source (run_metric_group); `selected`: the
    dataset to highlight."""
    figures = list(GROUP_FIGURES[task])
    parts = []
    for grouping, title in (("dataset", "By dataset"), ("source", "By manifest source")):
        by_group = groups.get(grouping) or {}
        names = sorted(by_group)
        rows = [[name, *(by_group[name].get(f, {}).get("value") for f in figures)] for name in names]
        parts.append(f"<h3>{title}</h3>")
        parts.append(
            _table(
                [grouping, *figures],
                rows,
                numeric=set(range(1, len(figures) + 1)),
                selected={names.index(selected)} if grouping == "dataset" and selected in names else None,
            )
        )
    return "".join(parts)


def _run_section(engine: Engine, run_id: int, dataset_name: str | None = None) -> str:
    """One run: its metrics, plots, worst items and per-dataset / per-source tables. With `dataset_name`
    (a dataset the run covered), the metrics, plots (but throughput) and worst items are that dataset's
    clips' and its row of the per-dataset table is highlighted."""
    metrics = current_run_metrics(engine, run_id)  # stored figures, recomputed when their inputs changed
    groups = load_group_metrics(engine, run_id)
    members = None
    scope = ""
    if dataset_name is not None:
        if dataset_name in groups.get("dataset", {}):
            metrics = groups["dataset"][dataset_name]
            members = (
                sa.select(dataset_audio.c.audio_id)
                .join(dataset, dataset.c.id == dataset_audio.c.dataset_id)
                .where(dataset.c.name == dataset_name)
            )
            scope = f"<p><b>Dataset {_esc(dataset_name)}</b>: metrics, plots and items of its clips only.</p>"
        else:
            scope = (
                f'<p class="muted">Run {run_id} did not cover dataset {_esc(dataset_name)}: '
                "whole-run figures.</p>"
            )
    with engine.connect() as conn:
        run = conn.execute(sa.select(label_run).where(label_run.c.id == run_id)).one()
        if run.task == "cry":
            body, plots = _cry_section(conn, run_id, metrics, members)
        else:
            body, plots = _asr_section(conn, run_id, metrics, members)
        throughput = _throughput_plot(conn, run_id)
    if throughput:
        plots.append(throughput)
    cut = metrics.get("truncated") or metrics.get("generate.truncated")  # text that hit its token cap
    truncated = f"{int(cut['value'])} truncated ({cut['details']['rate']:.1%}), " if cut else ""
    header = (
        f"<h2>Run {run.id}: {_esc(run.task)} — {_esc(run.model)}</h2>"
        f'<p class="muted">prompt {_esc(run.prompt_version)}, status {_esc(run.status)}, '
        f"{run.n_labelled} labelled, {run.n_failed} failed, {truncated}{run.audio_seconds:.1f} s of audio, "
        f"created {_esc(run.created_at)}</p>"
    )
    return (
        header
        + scope
        + f'<div class="plots">{"".join(plots)}</div>'
        + _metrics_table(metrics)
        + _group_tables(run.task, groups, dataset_name)
        + body
    )


# --- a fine-tuned version: base vs candidate on the same held-out audio -----------------------------------


def _version_section(engine: Engine, name: str) -> tuple[str, list[int]]:
    """Side by side for one model version: headline metrics, overlaid ROC (cry) or error rates and top
    substitutions (ASR), from its two evaluation runs. Returns the HTML and those run ids."""
    from qwen_tasks.labelling.registry import require_version

    version = require_version(engine, name)
    runs = [r for r in (version.base_run_id, version.candidate_run_id) if r is not None]
    header = (
        f"<h2>Model version {_esc(name)}: base vs fine-tuned on the same held-out audio</h2>"
        f'<p class="muted">{_esc(version.task)}, status {_esc(version.status)}'
        f"{' (forced)' if version.forced else ''}, base {_esc(version.base_model)}, revision "
        f"<code>{_esc(version.revision)}</code>, adapter <code>{_esc(version.adapter_path)}</code></p>"
    )
    if len(runs) < 2:
        return header + '<p class="muted">not evaluated yet (its fine-tune was interrupted)</p>', runs
    metrics = {
        role: current_run_metrics(engine, run_id)
        for role, run_id in zip(("base", "candidate"), runs, strict=True)
    }
    names = sorted(set(metrics["base"]) | set(metrics["candidate"]))
    skip = (".confusion", "substitutions", ".best_threshold", "throughput.")
    rows = [
        [n, metrics["base"].get(n, {}).get("value"), metrics["candidate"].get(n, {}).get("value")]
        for n in names
        if not any(k in n for k in skip)
    ]
    body = _table(["metric", f"base (run {runs[0]})", f"fine-tuned (run {runs[1]})"], rows, numeric={1, 2})
    gate = (version.metrics or {}).get("gate") or {}
    reasons = "".join(f"<li>{_esc(r)}</li>" for r in gate.get("reasons", []))
    body += f"<p>Promotion gate: <b>{'passed' if gate.get('passed') else 'failed'}</b></p><ul>{reasons}</ul>"
    plots: list[str] = []
    with engine.connect() as conn:
        if version.task == "cry":
            plot = _overlaid_roc(conn, runs)
            if plot:
                plots.append(plot)
        else:
            for role, title in (("base", "base"), ("candidate", "fine-tuned")):
                details = (metrics[role].get("substitutions") or {}).get("details") or {}
                pairs = details.get("top") or []
                body += f"<h3>Top substitutions, {title}</h3>" + _table(
                    ["reference", "hypothesis", "count"],
                    [[p["reference"], p["hypothesis"], p["count"]] for p in pairs[:10]],
                    numeric={2},
                )
    return header + f'<div class="plots">{"".join(plots)}</div>' + body, runs


def _overlaid_roc(conn: sa.Connection, runs: list[int]) -> str | None:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = _figure(
        "ROC on held-out audio: base vs fine-tuned", "false positive rate", "true positive rate"
    )
    drawn = False
    for role, run_id, color in (("base", runs[0], "#1f77b4"), ("fine-tuned", runs[1], "#d62728")):
        rows = conn.execute(
            sa.select(cry_answer.c.p_yes, cry_gold.c.gold_label)
            .join(cry_gold, cry_gold.c.audio_id == cry_answer.c.audio_id)
            .where(
                cry_answer.c.run_id == run_id, cry_answer.c.method == "score", cry_answer.c.p_yes.is_not(None)
            )
        ).all()
        gold = [r.gold_label == "yes" for r in rows]
        if len(set(gold)) < 2:
            continue
        fpr, tpr, _ = roc_curve(gold, [r.p_yes for r in rows])
        auc = roc_auc_score(gold, [r.p_yes for r in rows])
        ax.plot(fpr, tpr, marker=".", color=color, label=f"{role} (run {run_id}), AUC {auc:.3f}")
        drawn = True
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    return _png(fig)


def write_report(
    engine: Engine,
    run_ids: list[int] | None,
    out: Path,
    *,
    versions: list[str] | None = None,
    dataset: str | None = None,
) -> Path:
    """Write the HTML report of `run_ids` (default: the latest run of each task) and return its path.

    `versions`: fine-tuned model versions to compare with their base first (their two evaluation runs
    are added to the runs). `dataset`: the runs default to the latest run of each task that covered it,
    and each run's section shows that dataset's clips (see _run_section); ConfigError when unknown.
    `out` ending in .html/.htm is the file; anything else is taken as a folder for `report.html`.
    """
    dataset_id = require_datasets(engine, [dataset])[dataset] if dataset is not None else None
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html"
    comparisons: list[str] = []
    version_runs: list[int] = []
    for name in versions or []:
        section, runs = _version_section(engine, name)
        comparisons.append(section)
        version_runs.extend(runs)
    if run_ids:
        ids = list(run_ids)
    elif versions:
        ids = []
    else:
        ids = latest_run_ids(engine, dataset_id=dataset_id)  # newest of every task (that covered the dataset)
    ids += [r for r in version_runs if r not in ids]
    with engine.connect() as conn:
        known = set(conn.execute(sa.select(label_run.c.id).where(label_run.c.id.in_(ids))).scalars())
    missing = [i for i in ids if i not in known]
    if missing:
        raise ConfigError(f"run(s) {', '.join(map(str, missing))} do not exist")
    sections = comparisons + [_run_section(engine, run_id, dataset) for run_id in ids]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(sections) or '<p class="muted">No labelling runs yet.</p>'
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>qwen-tasks report: runs {_esc(', '.join(map(str, ids)) or 'none')}</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<h1>Labelling report</h1><p class="muted">Generated {generated} for run(s) '
        f"{_esc(', '.join(map(str, ids)) or 'none')}"
        f"{f', dataset {_esc(dataset)}' if dataset else ''}. Gold labels and references: human review "
        "first, then manifests.</p>"
        f"{body}</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out

"""Metrics per dataset and per manifest source: real ingest, real labelling with the tiny Qwen2-Audio, and
the stored per-group figures checked against an independent computation over the stored rows."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import run_cli, write_clips
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import worker
from qwen_tasks.labelling.backends import get_backend
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.quality.metrics import compute_run_metrics, load_group_metrics, load_run_metrics
from qwen_tasks.quality.report import write_report
from qwen_tasks.store import schema

# clip index -> (dataset, gold, source) for cry; gold alternates so both classes are in each dataset
CRY = {
    "nursery": [
        ("yes", "freesound"),
        ("no", "freesound"),
        ("yes", "youtube"),
        ("no", "youtube"),
        ("no", None),
    ],
    "street": [("no", "youtube"), ("yes", "youtube"), ("no", "freesound"), ("yes", None)],
}
ASR = {
    "read": [("the cat sat on the mat", "librispeech"), ("a dog ran home", "librispeech"), ("hello", None)],
    "chat": [("good morning to you", "commonvoice"), ("see you later", "librispeech")],
}


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):  # noqa: ANN201 - a Backend
    return get_backend(str(tiny_model_dir), device="cpu")


def _manifest(path: Path, lines: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _ingest(engine: Engine, tmp_path: Path, spec: dict, task: str, seed: int) -> dict[str, list[int]]:
    """Clips per dataset folder and one manifest per dataset, ingested as that dataset (the real ingest);
    returns dataset -> audio ids in clip order. Odd ASR datasets use the stock {"audio", "gt", "source"}
    lines."""
    out = {}
    for n, (name, items) in enumerate(spec.items()):
        folder = tmp_path / name
        paths = write_clips(folder, [1.0 + 0.25 * i for i in range(len(items))], seed=10 * seed + n)
        lines = []
        for path, (value, source) in zip(paths, items, strict=True):
            line = {"audio": str(path), "source": source} if source else {"audio": str(path)}
            if task == "cry":
                line |= {"question": "Is there a baby crying?", "gt": value}
            elif n % 2:
                line |= {"gt": value}
            else:
                line |= {"text": value, "language": "en"}
            lines.append(line)
        manifest = _manifest(tmp_path / f"{name}.jsonl", lines)
        summary = ingest(
            engine, [folder], [(manifest, "aqa" if task == "cry" else "asr")], dataset=name, tasks=[task]
        )
        assert summary.new == len(paths) and not summary.manifest_errors
        with engine.connect() as conn:
            rows = conn.execute(sa.select(schema.audio_file.c.path, schema.audio_file.c.audio_id)).all()
        by_path = {os.path.realpath(r.path): r.audio_id for r in rows}
        out[name] = [by_path[os.path.realpath(p)] for p in paths]
    return out


def _label(engine: Engine, backend, tiny_model_dir: Path, task: str, **kw: object) -> int:  # noqa: ANN001
    options = LabelOptions.from_mapping(
        {"tasks": [task], "model": str(tiny_model_dir), "device": "cpu", "batch_size": 4, **kw}
    )
    summary = worker.label(engine, options, backend_factory=lambda run: backend)
    assert summary.status == "done" and summary.failed == 0
    return summary.run_id


def _cry_rows(engine: Engine, run_id: int, method: str) -> dict[int, tuple[str, float | None, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                schema.cry_answer.c.audio_id, schema.cry_answer.c.label, schema.cry_answer.c.p_yes
            ).where(schema.cry_answer.c.run_id == run_id, schema.cry_answer.c.method == method)
        ).all()
        gold = dict(conn.execute(sa.select(schema.cry_gold.c.audio_id, schema.cry_gold.c.gold_label)).all())
    return {r.audio_id: (r.label, r.p_yes, gold.get(r.audio_id)) for r in rows}


def _expected_cry(engine: Engine, run_id: int, clips: Sequence[int]) -> dict[str, float | None]:
    """The figures over `clips` computed independently (scikit-learn on the stored answers and gold)."""
    out: dict[str, float | None] = {}
    for method in ("score", "generate"):
        rows = {a: v for a, v in _cry_rows(engine, run_id, method).items() if a in set(clips)}
        if not rows and method == "generate":
            continue  # a score-only run
        assert len(rows) == len(clips)
        decided = [(g, label) for label, _, g in rows.values() if g and label in ("yes", "no")]
        out[f"{method}.unknown_rate"] = sum(label == "unknown" for label, _, _ in rows.values()) / len(rows)
        out[f"{method}.accuracy"] = accuracy_score(*zip(*decided, strict=True)) if decided else None
        out[f"{method}.f1"] = (
            f1_score(*zip(*decided, strict=True), pos_label="yes", zero_division=0)
            if decided and any(label == "yes" for _, label in decided)
            else None
        )
        scored = [(g == "yes", p) for _, p, g in rows.values() if g and p is not None]
        if scored and len({y for y, _ in scored}) == 2:
            out[f"{method}.roc_auc"] = roc_auc_score(*zip(*scored, strict=True))
    return out


def _view(engine: Engine, run_id: int) -> dict[tuple[str, str], sa.Row]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.run_quality_by_dataset).where(schema.run_quality_by_dataset.c.run_id == run_id)
        ).all()
    return {(r.grouping, r.group_name): r for r in rows}


def test_cry_figures_per_dataset_and_source(
    engine: Engine,
    tmp_path: Path,
    backend,
    tiny_model_dir: Path,  # noqa: ANN001
) -> None:
    ids = _ingest(engine, tmp_path, CRY, "cry", seed=1)
    run_id = _label(engine, backend, tiny_model_dir, "cry", method="both")
    whole = compute_run_metrics(engine, run_id)
    groups = load_group_metrics(engine, run_id)
    assert sorted(groups["dataset"]) == ["nursery", "street"]
    for name, clips in ids.items():
        stored = {k: v["value"] for k, v in groups["dataset"][name].items()}
        assert stored["n_results"] == len(clips) and stored["n_gold"] == len(clips)
        expected = _expected_cry(engine, run_id, clips)
        for figure, value in expected.items():
            assert stored.get(figure) == pytest.approx(value), (name, figure)
        assert "score.roc_auc" in expected  # both gold classes in each dataset: AUC is defined
        # the details are the whole-run ones, restricted: confusion counts add up to the dataset's clips
        confusion = groups["dataset"][name]["score.confusion"]["details"]
        assert confusion["tp"] + confusion["fp"] + confusion["fn"] + confusion["tn"] == len(clips)
    # the whole run's figures are the same computation over every clip, and stay in run_metric
    everything = [a for clips in ids.values() for a in clips]
    for figure, value in _expected_cry(engine, run_id, everything).items():
        assert whole[figure] == pytest.approx(value), figure
    assert load_run_metrics(engine, run_id)["n_results"]["value"] == len(everything)

    # sources: the aqa lines' `source`; clips without one are in no group
    by_source = {"freesound": [], "youtube": []}
    for name, items in CRY.items():
        for audio_id, (_, source) in zip(ids[name], items, strict=True):
            if source:
                by_source[source].append(audio_id)
    assert sorted(groups["source"]) == ["freesound", "youtube"]
    for source, clips in by_source.items():
        stored = {k: v["value"] for k, v in groups["source"][source].items()}
        assert stored["n_results"] == len(clips)
        for figure, value in _expected_cry(engine, run_id, clips).items():
            assert stored.get(figure) == pytest.approx(value), (source, figure)

    # the view: one row per group, the run_quality columns, the dataset's split
    view = _view(engine, run_id)
    assert sorted(view) == [("dataset", "nursery"), ("dataset", "street"), ("source", "freesound"),
                            ("source", "youtube")]  # fmt: skip
    nursery = view[("dataset", "nursery")]
    assert nursery.task == "cry" and nursery.split == "train" and nursery.n_gold == 5
    assert nursery.score_accuracy == pytest.approx(groups["dataset"]["nursery"]["score.accuracy"]["value"])
    assert nursery.score_roc_auc == pytest.approx(groups["dataset"]["nursery"]["score.roc_auc"]["value"])
    assert nursery.generate_unknown_rate == pytest.approx(
        _expected_cry(engine, run_id, ids["nursery"])["generate.unknown_rate"]
    )
    assert view[("source", "youtube")].split is None and view[("source", "youtube")].n_results == 4
    assert nursery.wer is None


def test_datasets_covered_or_all_latest_source_line_wins_and_replaced(
    engine: Engine,
    tmp_path: Path,
    backend,  # noqa: ANN001
    tiny_model_dir: Path,
) -> None:
    _ingest(engine, tmp_path, {"nursery": CRY["nursery"]}, "cry", seed=2)
    run_id = _label(engine, backend, tiny_model_dir, "cry")
    clip0, clip1 = tmp_path / "nursery" / "clip_000.wav", tmp_path / "nursery" / "clip_001.wav"
    ingest(engine, [clip0, clip1], dataset="subset", tasks=["cry"])  # joined after the run was planned

    def dataset_sizes() -> dict[str, float]:
        compute_run_metrics(engine, run_id)
        return {
            k: v["n_results"]["value"]
            for k, v in load_group_metrics(engine, run_id, "dataset")["dataset"].items()
        }

    assert dataset_sizes() == {"nursery": 5}  # the datasets the run covered (run_dataset, from planning)
    with engine.begin() as conn:  # a run planned before datasets: every dataset its clips belong to
        conn.execute(sa.delete(schema.run_dataset).where(schema.run_dataset.c.run_id == run_id))
    assert dataset_sizes() == {"nursery": 5, "subset": 2}
    # a later manifest line names another source for clip 0: the latest line with a source wins; an asr
    # line's source does not count for cry
    later = _manifest(tmp_path / "later.jsonl", [{"audio": str(clip0), "gt": "yes", "source": "hospital"}])
    asr = _manifest(tmp_path / "speech.jsonl", [{"audio": str(clip0), "text": "hi", "source": "asr-only"}])
    ingest(engine, [], [(later, "aqa"), (asr, "asr")])  # datasets "later" and "speech" (manifest stems)
    assert dataset_sizes() == {"nursery": 5, "subset": 2, "later": 1, "speech": 1}
    groups = load_group_metrics(engine, run_id)
    assert {k: v["n_results"]["value"] for k, v in groups["source"].items()} == {
        "freesound": 1,
        "hospital": 1,
        "youtube": 2,
    }
    with engine.connect() as conn:  # replaced, not accumulated
        names = conn.execute(
            sa.select(sa.func.count(sa.distinct(schema.run_metric_group.c.group_name))).where(
                schema.run_metric_group.c.run_id == run_id
            )
        ).scalar_one()
    assert names == 7


def test_asr_wer_per_dataset_and_source(
    engine: Engine,
    tmp_path: Path,
    backend,
    tiny_model_dir: Path,  # noqa: ANN001
) -> None:
    ids = _ingest(engine, tmp_path, ASR, "asr", seed=3)
    run_id = _label(engine, backend, tiny_model_dir, "asr", max_new_tokens=8)
    whole = compute_run_metrics(engine, run_id)
    with engine.connect() as conn:
        utterances = {
            r.audio_id: r for r in conn.execute(sa.select(schema.utterance_score).where(
                schema.utterance_score.c.run_id == run_id))
        }  # fmt: skip

    def wer(clips: Sequence[int]) -> float:  # corpus WER: edits over reference words, from the stored rows
        rows = [utterances[a] for a in clips]
        return sum(r.substitutions + r.deletions + r.insertions for r in rows) / sum(r.n_ref for r in rows)

    view = _view(engine, run_id)
    everything = [a for clips in ids.values() for a in clips]
    assert whole["wer"] == pytest.approx(wer(everything))
    for name, clips in ids.items():
        row = view[("dataset", name)]
        assert row.task == "asr" and row.n_results == len(clips) and row.n_reference == len(clips)
        assert row.wer == pytest.approx(wer(clips)) and row.cer is None and row.score_accuracy is None
    librispeech = [ids["read"][0], ids["read"][1], ids["chat"][1]]
    assert view[("source", "librispeech")].wer == pytest.approx(wer(librispeech))
    assert view[("source", "commonvoice")].wer == pytest.approx(wer([ids["chat"][0]]))
    assert sorted(k for k in view if k[0] == "source") == [
        ("source", "commonvoice"),
        ("source", "librispeech"),
    ]


def test_metrics_and_report_cli_with_dataset(
    engine: Engine,
    database_url: str,
    tmp_path: Path,
    backend,
    tiny_model_dir: Path,  # noqa: ANN001
) -> None:
    ids = _ingest(engine, tmp_path, CRY, "cry", seed=4)
    first = _label(engine, backend, tiny_model_dir, "cry")
    more = _ingest(engine, tmp_path / "more", {"attic": [("yes", None), ("no", None)]}, "cry", seed=5)
    second = _label(engine, backend, tiny_model_dir, "cry")  # labels only the new clips: covers attic only

    out = run_cli(["metrics", "--dataset", "street", "--json"], database_url)
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)["runs"]
    assert result["run_id"] == first  # the newest cry run that covered street, not the newest cry run
    expected = _expected_cry(engine, first, ids["street"])
    assert result["datasets"]["street"]["score.accuracy"] == pytest.approx(expected["score.accuracy"])
    assert result["datasets"]["street"]["score.roc_auc"] == pytest.approx(expected["score.roc_auc"])
    assert result["datasets"]["street"]["n_results"] == 4
    assert sorted(result["groups"]["dataset"]) == ["nursery", "street"]

    both = run_cli(["metrics", "--dataset", "street", "--dataset", "attic", "--json"], database_url)
    runs = json.loads(both.stdout)["runs"]
    assert [r["run_id"] for r in runs] == [first, second]
    assert runs[1]["datasets"] == {"street": None, "attic": runs[1]["groups"]["dataset"]["attic"]}
    assert runs[1]["datasets"]["attic"]["n_results"] == len(more["attic"])

    text = run_cli(["metrics", "--dataset", "nursery"], database_url)
    assert text.returncode == 0, text.stderr
    assert f"run {first}, dataset nursery" in text.stderr  # its slice, all figures
    assert "street" not in text.stderr and "youtube" not in text.stderr  # that dataset's slice only
    slice_accuracy = json.loads(out.stdout)["runs"][0]["groups"]["dataset"]["nursery"]["score.accuracy"]
    assert re.search(rf"score\.accuracy +│ +{slice_accuracy:.4g} │", text.stderr)
    plain = run_cli(["metrics"], database_url)  # no --dataset: a compact table per grouping
    assert f"run {second} by dataset" in plain.stderr and f"run {first} by" not in plain.stderr
    assert "attic" in plain.stderr

    unknown = run_cli(["metrics", "--dataset", "no-such-set"], database_url)
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "--dataset 'no-such-set': no such dataset" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    page_path = tmp_path / "street.html"
    report = run_cli(["report", "--dataset", "street", "--out", str(page_path)], database_url)
    assert report.returncode == 0, report.stderr
    page = page_path.read_text(encoding="utf-8")
    assert f"Run {first}: cry" in page and f"Run {second}: cry" not in page
    assert "<h3>By dataset</h3>" in page and "<h3>By manifest source</h3>" in page
    assert re.search(r'<tr class="selected"><td>street</td>', page)
    assert "<td>nursery</td>" in page and "<td>youtube</td>" in page
    assert "<b>Dataset street</b>" in page
    # the dataset's confusion matrix: its 4 clips, not the run's 9
    counts = re.search(
        r"score: confusion matrix.*?<td>gold no</td>"
        r'<td class="num">(\d+)</td><td class="num">(\d+)</td><td class="num">\d+</td></tr>'
        r'<tr><td>gold yes</td><td class="num">(\d+)</td><td class="num">(\d+)</td>',
        page,
    )
    assert counts and sum(int(c) for c in counts.groups()) == 4
    bad = run_cli(["report", "--dataset", "nope", "--out", str(tmp_path / "x.html")], database_url)
    assert (
        bad.returncode == 1
        and "--dataset 'nope': no such dataset" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def test_whole_report_has_group_tables(engine: Engine, tmp_path: Path, backend, tiny_model_dir: Path) -> None:  # noqa: ANN001
    _ingest(engine, tmp_path, CRY, "cry", seed=6)
    _label(engine, backend, tiny_model_dir, "cry")
    page = write_report(engine, None, tmp_path / "all.html").read_text(encoding="utf-8")
    assert '<tr class="selected">' not in page
    for name in ("nursery", "street", "freesound", "youtube"):
        assert f"<td>{name}</td>" in page
    with pytest.raises(ConfigError, match="--dataset 'nope': no such dataset"):
        write_report(engine, None, tmp_path / "x.html", dataset="nope")

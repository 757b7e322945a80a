"""Fine-tuning from reviewed labels: split, training, held-out evaluation, gate, registry, versions.

Everything goes through the real path: ingest of real files and manifests, the real trainer (peft LoRA on
the tiny random-init Qwen2-Audio), real labelling runs for the evaluation, the CLI in subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa
from labelling_helpers import count, run_cli, write_clips
from sqlalchemy.engine import Engine

from qwen_tasks.dev.samples import write_cry_training_set
from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune import data as finetune_data
from qwen_tasks.finetune.data import Prepared, Row, data_digest, heldout_ids
from qwen_tasks.finetune.options import FinetuneOptions, dag_param_specs, options_from_params
from qwen_tasks.finetune.run import FinetuneSummary, run_finetune
from qwen_tasks.finetune.train import train_version
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import jobs, registry
from qwen_tasks.quality.metrics import load_run_metrics
from qwen_tasks.records import LabelRequest, ModelVersionStatus
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


def noise_set(root: Path, n: int, seed: int = 1) -> Path:
    """n one-second noise clips with alternating gold labels: nothing to learn (like contract.sh's set)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = root / "cry.jsonl"
    with manifest.open("w") as f:
        for i in range(n):
            sf.write(root / f"g{i:03d}.wav", (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
            row = {
                "question": "Is there a baby crying?",
                "audio": f"g{i:03d}.wav",
                "gt": "yes" if i % 2 else "no",
            }
            f.write(json.dumps(row) + "\n")
    return manifest


def ingest_into(
    engine: Engine,
    paths: Sequence[Path],
    manifests: Sequence[tuple[Path, str]] = (),
    *,
    dataset: str,
    split: str | None = None,
    tasks: Sequence[str] | None = None,
) -> None:
    """Ingest `paths` / `manifests` into the named dataset (the real ingest: membership by content)."""
    summary = ingest(
        engine, list(paths), manifests=list(manifests), dataset=dataset, split=split, tasks=tasks
    )
    assert summary.quarantined == 0, summary.to_dict()


def ingest_manifest(engine: Engine, manifest: Path, dataset: str | None = None, split: str = "train") -> None:
    """A cry manifest and its folder; the dataset is the manifest's stem unless named."""
    ingest_into(engine, [manifest.parent], [(manifest, "aqa")], dataset=dataset or manifest.stem, split=split)


def members(engine: Engine, name: str) -> set[int]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.select(schema.dataset_audio.c.audio_id)
                .join(schema.dataset, schema.dataset.c.id == schema.dataset_audio.c.dataset_id)
                .where(schema.dataset.c.name == name)
            ).scalars()
        )


def options(model: Path, tmp_path: Path, **changes) -> FinetuneOptions:
    base = {
        "task": "cry",
        "base": str(model),
        "device": "cpu",
        "min_clips": 4,
        "epochs": 1,
        "batch_size": 8,
        "out_dir": str(tmp_path / "adapter"),
        "name": "v1",
        "eval_method": "score",
    }
    return FinetuneOptions(**{**base, **changes})


def prepare(engine: Engine, opts: FinetuneOptions) -> tuple[Prepared, list[Row], list[Row]]:
    """`prepare`'s counts, training rows and held-out rows."""
    data = finetune_data.prepare(engine, opts)
    return data.prepared, list(data.train), list(data.heldout)


def _split(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.finetune_split.c.audio_id, schema.finetune_split.c.part)).all()
    return {int(a): p for a, p in rows}


def test_split_is_stratified_stored_and_never_leaks(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    ingest_manifest(engine, noise_set(tmp_path / "a", 30))
    prepared, train, heldout = prepare(engine, options(tiny_model_dir, tmp_path, heldout_fraction=0.3))
    assert {r.audio_id for r in train}.isdisjoint({r.audio_id for r in heldout})
    assert prepared.heldout == {"no": 4, "yes": 4} and prepared.train == {"no": 11, "yes": 11}
    first = _split(engine)
    assert sorted(a for a, p in first.items() if p == "heldout") == sorted(r.audio_id for r in heldout)
    # more labelled audio arrives: old assignments are kept, the new audio is split with the same ratio
    ingest_manifest(engine, noise_set(tmp_path / "b", 20, seed=2))
    _, train2, heldout2 = prepare(engine, options(tiny_model_dir, tmp_path, heldout_fraction=0.3))
    second = _split(engine)
    assert all(second[a] == p for a, p in first.items())
    assert {r.audio_id for r in train2}.isdisjoint({r.audio_id for r in heldout2})
    assert len(heldout2) == 16  # round(0.3 * 25) = 8 per class
    # the same bytes under another path are the same audio: one row, so they cannot sit on both sides
    dup = tmp_path / "c"
    dup.mkdir()
    (dup / "copy.wav").write_bytes((tmp_path / "a" / "g000.wav").read_bytes())
    ingest(engine, [dup])
    assert count(engine, schema.audio) == 50


def test_refuses_too_few_clips_or_one_class_in_one_line(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    manifest = noise_set(tmp_path / "few", 10)
    ingest_manifest(engine, manifest)
    out = run_cli(["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu"], url)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "too few labelled clips (no 5, yes 5); need at least 20 per class (--min-clips)" in out.stderr
    with engine.begin() as conn:
        conn.execute(sa.update(schema.manifest_item).values(gold_label="yes"))
    out = run_cli(["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu"], url)
    assert out.returncode == 1 and "only one class among the labelled clips (yes 10)" in out.stderr
    assert count(engine, schema.model_version) == 0


def test_a_candidate_that_does_not_beat_the_base_is_rejected(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Noise with alternating labels: nothing to learn, so held-out AUC/F1 cannot improve by the margin."""
    ingest_manifest(engine, noise_set(tmp_path / "noise", 24))
    url = engine.url.render_as_string(hide_password=False)
    while_evaluating: list[dict] = []

    def registered(step: str) -> None:  # trained and registered, its evaluation not started
        while_evaluating.extend(json.loads(run_cli(["models", "--json"], url).stdout))

    summary = run_finetune(
        engine, options(tiny_model_dir, tmp_path, lr=1e-6, min_improvement=0.05), on_step=registered
    )
    # before its evaluation was stored it was listed as evaluating, not as a candidate that beat the base
    (listed,) = while_evaluating
    assert (listed["status"], listed["stored_status"], listed["gate_passed"]) == (
        "evaluating",
        "candidate",
        None,
    )
    assert summary.status == "rejected" and not summary.gate["passed"]
    version = registry.require_version(engine, "v1")
    assert version.status is ModelVersionStatus.REJECTED
    assert version.base_run_id == summary.base_run_id and version.candidate_run_id == summary.candidate_run_id
    refused = run_cli(["models", "promote", "v1"], url)
    assert refused.returncode == 1 and "promotion of v1 refused" in refused.stderr
    assert registry.promoted_version(engine, "cry") is None
    forced = run_cli(["models", "promote", "v1", "--force"], url)
    assert forced.returncode == 0, forced.stderr
    promoted = registry.promoted_version(engine, "cry")
    assert promoted is not None and promoted.name == "v1" and promoted.forced
    listed = json.loads(run_cli(["models", "--json"], url).stdout)
    assert listed[0]["name"] == "v1" and listed[0]["status"] == "promoted" and listed[0]["forced"] is True


def test_it_learns_the_synthetic_cry_set_and_the_gate_passes(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    manifest = write_cry_training_set(tmp_path / "learnable", n=72)
    ingest_manifest(engine, manifest)
    summary = run_finetune(
        engine,
        options(tiny_model_dir, tmp_path, epochs=3, heldout_fraction=0.33, promote=True, eval_method="both"),
    )
    assert summary.train == {"no": 24, "yes": 24} and summary.heldout == {"no": 12, "yes": 12}
    assert summary.candidate["score.roc_auc"] > summary.base["score.roc_auc"] + 0.1
    assert summary.candidate["score.roc_auc"] >= 0.9
    assert summary.gate["passed"] and summary.promoted and summary.status == "promoted"
    # the evaluation runs are real runs over exactly the held-out audio, kept out of production labels
    heldout = sorted(a for a, p in _split(engine).items() if p == "heldout")
    with engine.connect() as conn:
        for run_id in (summary.base_run_id, summary.candidate_run_id):
            ids = sorted(
                conn.execute(
                    sa.select(schema.cry_answer.c.audio_id).where(
                        schema.cry_answer.c.run_id == run_id, schema.cry_answer.c.method == "score"
                    )
                ).scalars()
            )
            assert ids == heldout
        purposes = set(conn.execute(sa.select(schema.label_run.c.purpose)).scalars())
        n_latest = conn.execute(
            sa.text("SELECT count(*) FROM latest_label WHERE source = 'model'")
        ).scalar_one()
        quality = conn.execute(sa.text("SELECT * FROM model_version_quality WHERE name = 'v1'")).one()
    assert purposes == {"evaluation"} and n_latest == 0
    assert quality.candidate_roc_auc == pytest.approx(summary.candidate["score.roc_auc"])
    # generate answers became decisive: the candidate answers yes/no where the base rambles
    assert summary.candidate["generate.unknown_rate"] < summary.base["generate.unknown_rate"]
    # the gate decoded as `label --task cry --method both` does (the task's default budget, not a cap of
    # its own), and the figures count the answers that hit it
    expected = label_request("cry", method="both", model=str(tiny_model_dir))
    assert expected["max_new_tokens"] is None
    for run_id in (summary.base_run_id, summary.candidate_run_id):
        assert jobs.get_run(engine, run_id).params["request"] == expected
        assert load_run_metrics(engine, run_id)["generate.truncated"]["details"]["n"] == 24
    _promoted_version_labels_with_its_calibration(engine, tiny_model_dir, summary)


def _promoted_version_labels_with_its_calibration(
    engine: Engine, model: Path, summary: FinetuneSummary
) -> None:
    """The version's decision rules were fitted on held-out clips (its own question: the candidate
    evaluation run; the manifest's question those clips ask: a run of its own) and stored for it; `label`
    with the base model (the promoted version applies) asks each clip its manifest question, decides with
    that question's rule and records it on every label."""
    from qwen_tasks.labelling.options import LabelOptions
    from qwen_tasks.labelling.planning import plan
    from qwen_tasks.labelling.worker import WorkerOptions, work

    own = summary.calibration
    assert own["method"] == "platt" and own["n_labels"] == 24 and own["run_id"] == summary.candidate_run_id
    asked = own["questions"]["Is there a baby crying in this audio?"]  # write_cry_training_set's question
    assert asked["n_labels"] == 24 and asked["run_id"] not in (summary.base_run_id, summary.candidate_run_id)
    rules = schema.decision_calibration.c
    with engine.connect() as conn:
        stored = {
            r.id: r
            for r in conn.execute(
                sa.select(schema.decision_calibration, schema.label_run.c.prompt_template.label("run_prompt"))
                .join(schema.label_run, schema.label_run.c.id == rules.source_run_id)
                .join(schema.model_version, schema.model_version.c.id == rules.model_version_id)
                .where(schema.model_version.c.name == "v1")
            )
        }
    assert set(stored) == {own["id"], asked["id"]}
    assert all(r.prompt_template == r.run_prompt for r in stored.values())  # a rule per prompt
    assert stored[own["id"]].prompt_template != stored[asked["id"]].prompt_template
    opts = LabelOptions.from_mapping(
        {"tasks": ["cry"], "model": str(model), "method": "score", "device": "cpu", "limit": 6}
    )
    planned = plan(engine, opts)
    assert planned.per_task["cry"]["model_version"] == "v1"
    # one run (every clip asks the manifest's question), decided with that question's rule
    assert planned.per_task["cry"]["calibration_ids"] == {planned.new_run_ids[0]: asked["id"]}
    work(engine, planned.run_ids, WorkerOptions(device="cpu"))
    rule = registry_rule(engine, asked["id"])
    c = schema.cry_answer.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.p_yes, c.label, c.threshold, c.calibration_id, c.p_calibrated).where(
                c.run_id.in_(planned.run_ids)
            )
        ).all()
    assert len(rows) == 6
    for r in rows:
        assert (r.calibration_id, r.threshold, r.p_calibrated) == (
            rule.id,
            rule.threshold,
            rule.apply(r.p_yes),
        )
        assert r.label == ("yes" if r.p_calibrated >= rule.threshold else "no")


def registry_rule(engine: Engine, calibration_id: int):
    from qwen_tasks.labelling import decision

    with engine.connect() as conn:
        return decision.load(conn, calibration_id)


def label_request(task: str, **options: object) -> dict:
    """The request a `label` run of `task` stores (label_run.params["request"])."""
    from qwen_tasks.labelling.options import LabelOptions

    return stored(LabelOptions.from_mapping(options).request(task))


def stored(request: LabelRequest) -> dict:
    """A request as label_run.params stores it (JSON: a list of methods)."""
    return {**dataclasses.asdict(request), "methods": list(request.methods)}


@pytest.mark.parametrize(
    ("task", "changes", "label_options"),
    [
        ("asr", {"language": "zh"}, {"language": "zh"}),
        ("cry", {"eval_method": "both"}, {"method": "both"}),
        ("cry", {"eval_method": "score", "question": "Crying?"}, {"question": "Crying?"}),
    ],
)
def test_evaluation_requests_are_label_requests(
    tmp_path: Path, tiny_model_dir: Path, task: str, changes: dict, label_options: dict
) -> None:
    opts = options(tiny_model_dir, tmp_path, task=task, **changes)
    expected = label_request(task, model=str(tiny_model_dir), **label_options)
    assert stored(opts.eval_request()) == expected
    assert expected["max_new_tokens"] is None  # the task's default budget per window


def test_versions_never_mix_and_adapter_labels_match_the_in_memory_model(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from qwen_tasks.ingest.audio_files import load_waveform
    from qwen_tasks.records import AudioClip, LabelRequest

    ingest_manifest(engine, write_cry_training_set(tmp_path / "learnable", n=40))
    url = engine.url.render_as_string(hide_password=False)
    base_run = run_cli(
        ["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu", "--json"], url
    )
    assert base_run.returncode == 0, base_run.stderr
    trained = train_version(engine, options(tiny_model_dir, tmp_path, epochs=2), keep_backend=True)
    version_run = run_cli(["label", "--task", "cry", "--model", "v1", "--device", "cpu", "--json"], url)
    assert version_run.returncode == 0, version_run.stderr
    a, b = json.loads(base_run.stdout), json.loads(version_run.stdout)
    assert a["labelled"] == b["labelled"] == 40  # the version labels everything again: a new key
    with engine.connect() as conn:
        runs = {r.id: r for r in conn.execute(sa.select(schema.label_run)).all()}
        p_yes = dict(
            conn.execute(
                sa.select(schema.cry_answer.c.audio_id, schema.cry_answer.c.p_yes).where(
                    schema.cry_answer.c.run_id == b["run_id"]
                )
            ).all()
        )
        paths = dict(conn.execute(sa.select(schema.audio_path.c.audio_id, schema.audio_path.c.path)).all())
    assert runs[a["run_id"]].revision == "" and runs[b["run_id"]].revision == trained.revision
    assert trained.revision == f"lora.{trained.adapter_sha256[:16]}"
    assert runs[b["run_id"]].params["adapter"] == trained.adapter_path
    # the in-memory model (adapter unmerged) and the version loaded by `label --model v1` (merged) agree
    # `label` asks each clip its own manifest question (view cry_question): so is the in-memory model
    request = LabelRequest("cry", question="Is there a baby crying in this audio?")
    clips = [AudioClip(i, paths[i], load_waveform(paths[i])) for i in sorted(p_yes)]
    in_memory = [r.p_yes for r in trained.backend.label(clips, request)]
    stored = [p_yes[c.audio_id] for c in clips]
    assert max(abs(x - y) for x, y in zip(in_memory, stored, strict=True)) < 1e-4
    # a worker holding the base model (no adapter) refuses the version's run: labels never mix
    from qwen_tasks.errors import ModelError
    from qwen_tasks.labelling import jobs
    from qwen_tasks.labelling.backends import load_backend
    from qwen_tasks.labelling.worker import check_backend

    with pytest.raises(ModelError, match="was planned for model"):
        check_backend(jobs.get_run(engine, b["run_id"]), load_backend(str(tiny_model_dir), device="cpu"))


def test_a_killed_finetune_leaves_no_promoted_row_and_can_run_again(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    ingest_manifest(engine, write_cry_training_set(tmp_path / "learnable", n=48))
    url = engine.url.render_as_string(hide_password=False)
    args = ["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu", "--name", "k1"]
    args += ["--min-clips", "4", "--out", str(tmp_path / "k1")]
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": url}
    slow = ["--epochs", "30", "--batch-size", "2", "--promote"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_tasks", *args, *slow], env=env, stderr=subprocess.PIPE, text=True
    )
    seen = ""
    deadline = time.monotonic() + 240
    while (
        "training" not in seen and time.monotonic() < deadline
    ):  # the progress bar starts with the first step
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "training" in seen, seen
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert count(engine, schema.model_version) == 0
    assert registry.promoted_version(engine, "cry") is None
    again = run_cli([*args, "--epochs", "1"], url, QWEN_TASKS_PROGRESS_SECONDS="0.2")
    assert again.returncode == 0, again.stderr
    # stderr is a pipe, not a terminal: progress lines instead of a bar that only renders on a TTY
    training = re.findall(
        r"training: (\d+)/(\d+) steps \(\d+%\), .*epoch 1, loss [0-9.]+, clips/s", again.stderr
    )
    assert training and training[-1][0] == training[-1][1], again.stderr
    for role in ("base", "candidate"):
        assert re.search(rf"held-out {role} run \d+: (\d+)/\1 clips \(100%\), .* RTF", again.stderr), (
            again.stderr
        )
    version = registry.require_version(engine, "k1")
    assert version.metrics is not None and version.status is not ModelVersionStatus.PROMOTED
    assert (tmp_path / "k1" / "adapter_model.safetensors").is_file()


# --- datasets: train scope, test sets never trained on, evaluations side by side --------------------------


def _add_copies(manifest: Path, sources: dict[Path, str]) -> None:
    """Append (copies of) other clips with their gold label to a cry manifest: same bytes, same audio."""
    with manifest.open("a") as f:
        for i, (src, gold) in enumerate(sources.items()):
            name = f"copy_{i}.wav"
            (manifest.parent / name).write_bytes(src.read_bytes())
            f.write(json.dumps({"question": "Is there a baby crying?", "audio": name, "gt": gold}) + "\n")


def _answered(engine: Engine, run_id: int) -> list[int]:
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                sa.select(schema.cry_answer.c.audio_id).where(
                    schema.cry_answer.c.run_id == run_id, schema.cry_answer.c.method == "score"
                )
            ).scalars()
        )


def test_a_test_dataset_is_never_trained_on_and_is_evaluated_beside_the_heldout_split(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The measured problem: an evaluation set ingested with gold labels became training data. Test clips
    are never training rows — new ones, ones the stored split had put on the training side, and ones
    added to the test set later — and every version is evaluated on the test set beside its held-out
    split (two evaluation runs each, model_version_test, the views, `models --json`, the CLI table)."""
    ingest_manifest(engine, write_cry_training_set(tmp_path / "train", n=40), dataset="train-a")
    opts = options(tiny_model_dir, tmp_path, heldout_fraction=0.25)
    first, train0, _ = prepare(engine, opts)  # stores the split: 30 training clips
    assert first.train == {"no": 15, "yes": 15} and first.test_datasets == []
    with engine.connect() as conn:
        paths = dict(conn.execute(sa.select(schema.audio_path.c.audio_id, schema.audio_path.c.path)).all())
    yes, no = (next(r for r in train0 if r.answer == a) for a in ("yes", "no"))
    # the evaluation set arrives with gold: 12 new clips and copies of two stored training clips
    eval_manifest = write_cry_training_set(tmp_path / "eval", n=12, seed=1)
    _add_copies(eval_manifest, {Path(paths[yes.audio_id]): "yes", Path(paths[no.audio_id]): "no"})
    ingest_manifest(engine, eval_manifest, dataset="eval", split="test")
    test_ids = members(engine, "eval")
    assert len(test_ids) == 14 and {yes.audio_id, no.audio_id} <= test_ids
    assert _split(engine)[yes.audio_id] == "train"  # stored before it joined the test set

    url = engine.url.render_as_string(hide_password=False)
    args = ["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu", "--name", "v2"]
    args += ["--min-clips", "4", "--epochs", "1", "--heldout-fraction", "0.25", "--eval-method", "score"]
    out = run_cli([*args, "--out", str(tmp_path / "v2"), "--json"], url)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["train"] == {"no": 14, "yes": 14} and summary["heldout"] == {"no": 5, "yes": 5}
    assert summary["skipped"]["in_test_dataset"] == 14 and summary["datasets"] == ["train-a"]
    assert set(summary["test"]) == {"eval"}  # default: every labelled test dataset of the task
    # the side-by-side table: held-out (the gate) and the test set, base vs tuned
    assert "heldout (gate)" in out.stderr and "AUC base" in out.stderr and "│ eval" in out.stderr
    # no test clip got a training assignment (the two copies keep their old, now ignored, 'train' row)
    split = _split(engine)
    assert not [a for a in test_ids - {yes.audio_id, no.audio_id} if a in split]
    # the version's training data: counts and digest over exactly the clips outside the test set
    v2 = registry.require_version(engine, "v2")
    expected = [r for r in train0 if r.audio_id not in test_ids]
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.model_version).where(schema.model_version.c.name == "v2")).one()
    assert row.counts["train"] == {"no": 14, "yes": 14} and row.counts["examples"] == len(expected) == 28
    assert row.counts["datasets"] == ["train-a"]
    assert row.data_digest == data_digest(opts, expected, v2.prompt_version)
    assert row.data_digest != data_digest(opts, train0, v2.prompt_version)

    # evaluations: held-out runs as before, and two evaluation runs over exactly the test set's clips
    heldout = sorted(a for a, p in split.items() if p == "heldout")
    assert (
        _answered(engine, summary["base_run_id"]) == _answered(engine, summary["candidate_run_id"]) == heldout
    )
    t = summary["test"]["eval"]
    for run_id in (t["base_run_id"], t["candidate_run_id"]):
        assert _answered(engine, run_id) == sorted(test_ids)
    with engine.connect() as conn:
        tests = conn.execute(sa.select(schema.model_version_test)).all()
        purposes = set(conn.execute(sa.select(schema.label_run.c.purpose)).scalars())
        evals = conn.execute(
            sa.text(
                "SELECT * FROM model_version_evaluation WHERE name = 'v2' ORDER BY dataset_id NULLS FIRST"
            )
        ).all()
        quality = conn.execute(sa.text("SELECT * FROM model_version_quality WHERE name = 'v2'")).one()
    assert [(r.version_id, r.base_run_id, r.candidate_run_id) for r in tests] == [
        (v2.id, t["base_run_id"], t["candidate_run_id"])
    ]
    assert purposes == {"evaluation"}
    assert [(e.evaluated_on, e.n_gold) for e in evals] == [("heldout", 10), ("eval", 14)]
    assert evals[1].candidate_roc_auc == pytest.approx(t["candidate"]["score.roc_auc"])
    assert evals[1].base_f1 == t["base"].get("score.f1")
    assert quality.test_datasets == ["eval"]
    assert v2.metrics["test"]["eval"]["candidate"] == t["candidate"]
    assert summary["gate"]["compared"]["score.roc_auc"]["candidate"] == summary["candidate"]["score.roc_auc"]
    listed = json.loads(run_cli(["models", "--json"], url).stdout)
    assert listed[0]["test_datasets"] == ["eval"]
    assert [(e["evaluated_on"], e["n_gold"]) for e in listed[0]["evaluations"]] == [
        ("heldout", 10),
        ("eval", 14),
    ]
    assert listed[0]["evaluations"][1]["candidate"]["roc_auc"] == pytest.approx(
        t["candidate"]["score.roc_auc"]
    )
    shown = run_cli(["models"], url)
    assert shown.returncode == 0 and "side by side: v2" in shown.stdout and "│ eval" in shown.stdout

    # more gold ingested into the test dataset later changes no version's training data
    ingest_manifest(
        engine, write_cry_training_set(tmp_path / "eval-more", n=8, seed=2), dataset="eval", split="test"
    )
    assert len(members(engine, "eval")) == 22
    again = run_finetune(engine, replace(opts, name="v3", out_dir=str(tmp_path / "v3")))
    assert again.train == summary["train"] and again.skipped["in_test_dataset"] == 22
    with engine.connect() as conn:
        digests = dict(
            conn.execute(sa.select(schema.model_version.c.name, schema.model_version.c.data_digest)).all()
        )
    assert digests["v3"] == digests["v2"]
    split = _split(engine)
    assert not [a for a in members(engine, "eval") - {yes.audio_id, no.audio_id} if a in split]
    assert _answered(engine, again.test["eval"]["candidate_run_id"]) == sorted(members(engine, "eval"))


def test_dataset_restricts_training_to_that_dataset(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    ingest_manifest(engine, write_cry_training_set(tmp_path / "a", n=24, seed=3), dataset="set-a")
    ingest_manifest(engine, noise_set(tmp_path / "b", 16), dataset="set-b")
    a_ids, b_ids = members(engine, "set-a"), members(engine, "set-b")
    # default scope: every train dataset of the task
    _, train, heldout = prepare(engine, options(tiny_model_dir, tmp_path))
    assert {r.audio_id for r in [*train, *heldout]} == a_ids | b_ids
    # --dataset set-a: only its clips, on both sides; the others are counted as outside the scope
    only_a = options(tiny_model_dir, tmp_path, datasets=("set-a",))
    prepared, train, heldout = prepare(engine, only_a)
    assert {r.audio_id for r in [*train, *heldout]} == a_ids
    assert prepared.datasets == ["set-a"] and prepared.skipped["outside_datasets"] == len(b_ids) == 16
    assert heldout_ids(engine, only_a) == sorted(r.audio_id for r in heldout)
    # and the version trained with it records exactly that data
    trained = train_version(engine, only_a)
    assert trained.prepared.train == prepared.train and trained.prepared.datasets == ["set-a"]
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.model_version)).one()
    assert row.counts["datasets"] == ["set-a"] and row.hyperparams["datasets"] == ["set-a"]
    assert row.counts["examples"] == len(train)
    assert row.data_digest == data_digest(only_a.resolved(), train, row.prompt_version)


def test_dataset_names_are_checked_in_one_line(engine: Engine, tmp_path: Path, tiny_model_dir: Path) -> None:
    ingest_manifest(engine, noise_set(tmp_path / "a", 16), dataset="set-a")
    ingest_manifest(engine, noise_set(tmp_path / "t", 8, seed=2), dataset="eval", split="test")
    write_clips(tmp_path / "speech", [1.0, 1.5])
    ingest_into(engine, [tmp_path / "speech"], dataset="spoken", tasks=("asr",))
    write_clips(tmp_path / "unlabelled", [1.0, 2.0], seed=5)
    ingest_into(engine, [tmp_path / "unlabelled"], dataset="no-gold", split="test", tasks=("cry",))
    cases = [
        (
            {"datasets": ("nope",)},
            "--dataset 'nope': no such dataset (known: eval, no-gold, set-a, spoken)",
        ),
        ({"datasets": ("eval",)}, "--dataset 'eval' is a test dataset: its clips are never trained on"),
        ({"test_datasets": ("set-a",)}, "--test-dataset 'set-a' is a train dataset"),
        ({"datasets": ("spoken",)}, "--dataset 'spoken' is not labelled for cry (its tasks: asr)"),
        ({"test_datasets": ("no-gold",)}, "--test-dataset 'no-gold': none of its clips has a gold label"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError) as caught:
            prepare(engine, options(tiny_model_dir, tmp_path, **change))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert count(engine, schema.finetune_split) == 0  # checked before anything is stored or loaded
    # the default test sets are the labelled ones: no-gold is left out, eval is in
    prepared, _, _ = prepare(engine, options(tiny_model_dir, tmp_path))
    assert prepared.datasets == ["set-a"] and prepared.test_datasets == ["eval"]
    url = engine.url.render_as_string(hide_password=False)
    for extra, message in ((["--test-dataset", "set-a"], "--test-dataset 'set-a' is a train dataset"),
                           (["--dataset", "nope"], "--dataset 'nope': no such dataset")):  # fmt: skip
        out = run_cli(
            ["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu", *extra], url
        )
        assert out.returncode == 1 and message in out.stderr, out.stderr
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert count(engine, schema.model_version) == 0


def test_the_dag_params_carry_the_dataset_scope() -> None:
    specs = dag_param_specs()
    assert specs["datasets"]["default"] == [] and specs["test_datasets"]["type"] == "array"
    opts = options_from_params({"task": "cry", "datasets": ["set-a"], "test_datasets": ["eval", "x"]})
    assert opts.datasets == ("set-a",) and opts.test_datasets == ("eval", "x")
    assert options_from_params({"task": "cry", "datasets": []}).datasets == ()


def test_the_dag_form_offers_calibration_and_target_precision() -> None:
    """The fine-tune form's calibration and target precision come from FinetuneOptions (one declaration):
    its defaults, the methods quality.calibration knows; the Airflow Param refuses what the options refuse,
    and what the form sends reaches FinetuneOptions."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    specs = dag_param_specs()
    d = FinetuneOptions()
    assert specs["calibration"]["default"] == d.calibration == "platt"
    assert specs["calibration"]["enum"] == ["none", "platt", "isotonic"]
    assert specs["target_precision"]["default"] is d.target_precision is None

    def param(name: str) -> Param:
        spec = dict(specs[name])
        return Param(spec.pop("default"), **spec)

    assert param("calibration").resolve("isotonic") == "isotonic"
    assert param("target_precision").resolve(0.95) == 0.95 and param("target_precision").resolve(None) is None
    for name, bad in (("calibration", "sigmoid"), ("target_precision", 1.5), ("target_precision", 0)):
        with pytest.raises(ParamValidationError):
            param(name).resolve(bad)
    opts = options_from_params({"task": "cry", "calibration": "isotonic", "target_precision": 0.95})
    assert (opts.calibration, opts.target_precision) == ("isotonic", 0.95)
    assert options_from_params({"task": "cry", "target_precision": None}).target_precision is None
    with pytest.raises(ConfigError, match="--target-precision must be in"):
        options_from_params({"task": "cry", "target_precision": 2})


# --- prepare once: training and evaluation take its result -----------------------------------------------


class _Statements:
    """The SQL the engine sends while active: how often the split is assigned (its advisory lock) and how
    often the labelled clips are looked up (`labelled_rows`' query) or the stored split is read."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, str]] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        self.seen.append((statement, repr(parameters)))

    def __enter__(self) -> _Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)

    @property
    def split_assignments(self) -> int:
        return sum(1 for s, p in self.seen if "pg_advisory_xact_lock" in s and "qwen_tasks.split:" in p)

    @property
    def labelled_lookups(self) -> int:
        return sum(1 for s, _ in self.seen if "AS in_scope" in s)

    @property
    def split_reads(self) -> int:
        return sum(1 for s, _ in self.seen if "finetune_split" in s)


def test_prepare_runs_once_and_training_uses_exactly_its_result(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`run_finetune` prepares once (one split assignment, one look-up of the labelled clips) and hands the
    result to training and evaluation; `train_version` given a prepared result trains on exactly its
    training rows, even when more labelled audio arrived after `prepare`, and does not touch the split."""
    ingest_manifest(engine, noise_set(tmp_path / "a", 24), dataset="set-a")
    seen: list[Prepared] = []
    with _Statements(engine) as sql:
        summary = run_finetune(engine, options(tiny_model_dir, tmp_path, lr=1e-6), on_prepared=seen.append)
    assert (sql.split_assignments, sql.labelled_lookups) == (1, 1)
    (prepared,) = seen
    assert summary.train == prepared.train == {"no": 8, "yes": 8}
    heldout = sorted(a for a, p in _split(engine).items() if p == "heldout")
    assert _answered(engine, summary.base_run_id) == _answered(engine, summary.candidate_run_id) == heldout

    opts = options(tiny_model_dir, tmp_path, name="v2", out_dir=str(tmp_path / "v2"))
    data = finetune_data.prepare(engine, opts)
    assert len(data.train) == 16 and data.heldout_ids == heldout
    before = _split(engine)
    # more labelled audio arrives between prepare and training: training uses what prepare found
    ingest_manifest(engine, noise_set(tmp_path / "b", 10, seed=2), dataset="set-a")
    with _Statements(engine) as sql:
        trained = train_version(engine, opts, data)
    assert (sql.split_assignments, sql.labelled_lookups, sql.split_reads) == (0, 0, 0)
    assert _split(engine) == before  # the new audio got no split row: nothing prepared again
    assert trained.prepared == data.prepared
    with engine.connect() as conn:
        row = conn.execute(sa.select(schema.model_version).where(schema.model_version.c.name == "v2")).one()
    assert row.counts["examples"] == len(data.train) and row.counts["train"] == data.prepared.train
    assert row.data_digest == data_digest(opts.resolved(), data.train, row.prompt_version)
    # the prepared result of another task is refused, not trained on
    with pytest.raises(ConfigError, match="prepared data is for cry"):
        train_version(engine, options(tiny_model_dir, tmp_path, task="asr", name="v3"), data)

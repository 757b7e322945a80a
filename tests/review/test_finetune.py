"""Fine-tuning from reviewed labels: split, training, held-out evaluation, gate, registry, versions.

Everything goes through the real path: ingest of real files and manifests, the real trainer (peft LoRA on
the tiny random-init Qwen2-Audio), real labelling runs for the evaluation, the CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sqlalchemy as sa
from labelling_helpers import count, run_cli
from sqlalchemy.engine import Engine

from qwen_tasks.dev.samples import write_cry_training_set
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import registry
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.review import finetune
from qwen_tasks.review.finetune import FinetuneOptions
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


def ingest_manifest(engine: Engine, manifest: Path) -> None:
    summary = ingest(engine, [manifest.parent], manifests=[(manifest, "aqa")])
    assert summary.quarantined == 0, summary.to_dict()


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


def _split(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.finetune_split.c.audio_id, schema.finetune_split.c.part)).all()
    return {int(a): p for a, p in rows}


def test_split_is_stratified_stored_and_never_leaks(
    engine: Engine, tmp_path: Path, tiny_model_dir: Path
) -> None:
    ingest_manifest(engine, noise_set(tmp_path / "a", 30))
    prepared, train, heldout = finetune.prepare(
        engine, options(tiny_model_dir, tmp_path, heldout_fraction=0.3)
    )
    assert {r.audio_id for r in train}.isdisjoint({r.audio_id for r in heldout})
    assert prepared.heldout == {"no": 4, "yes": 4} and prepared.train == {"no": 11, "yes": 11}
    first = _split(engine)
    assert sorted(a for a, p in first.items() if p == "heldout") == sorted(r.audio_id for r in heldout)
    # more labelled audio arrives: old assignments are kept, the new audio is split with the same ratio
    ingest_manifest(engine, noise_set(tmp_path / "b", 20, seed=2))
    _, train2, heldout2 = finetune.prepare(engine, options(tiny_model_dir, tmp_path, heldout_fraction=0.3))
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

    summary = finetune.run_finetune(
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
    summary = finetune.run_finetune(
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
    trained = finetune.train_version(engine, options(tiny_model_dir, tmp_path, epochs=2), keep_backend=True)
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
    request = LabelRequest("cry")
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
    again = run_cli([*args, "--epochs", "1"], url)
    assert again.returncode == 0, again.stderr
    version = registry.require_version(engine, "k1")
    assert version.metrics is not None and version.status is not ModelVersionStatus.PROMOTED
    assert (tmp_path / "k1" / "adapter_model.safetensors").is_file()

"""The original Qwen-Audio backend (`trust_remote_code`) and its own environment, `.venv-qwen-audio`.

Fast lane, in the main environment (transformers 5, which cannot run the remote code): loading refuses
before touching any weights and names the command to use; a worker refuses a Qwen-Audio run without
claiming a job; the asset copy, the ffmpeg check and the batch-invariance fix on real tensors.

Real end to end (slow): the Qwen-Audio environment (`make install-qwen-audio`) labels a tiny random
checkpoint built from the public QwenLM/Qwen-Audio code (`tests/qwen_audio_tiny.py`) through the CLI and
the real database: ingest -> label --task cry --method both / --task asr, rows, provenance and batch 1
vs 8. It needs a copy of that repository in QWEN_AUDIO_CODE_DIR (docs/models.md says how) and skips with
the reason otherwise; CI cannot reach GitHub, so it skips there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from labelling_helpers import CLI, count, ingest_clips, random_audio, real_shaped, run_cli
from services import require_ffmpeg, require_qwen_audio_code, require_qwen_audio_python
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ModelError, WrongEnvironment
from qwen_tasks.labelling import environments, prompts, worker
from qwen_tasks.labelling.backends import load_backend, qwen_audio, required_python
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.records import LabelRequest
from qwen_tasks.store import schema

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "tests" / "qwen_audio_tiny.py"
# What a worker of either environment imports (the DAG's label slot runs `orchestration.steps` there too).
WORKER_MODULES = (
    "qwen_tasks.cli", "qwen_tasks.labelling.worker", "qwen_tasks.labelling.jobs",
    "qwen_tasks.orchestration.steps", "qwen_tasks.store.database", "qwen_tasks.ingest.audio_files",
    "qwen_tasks.labelling.answers", "qwen_tasks.review.export", "qwen_tasks.labelling.backends",
    "qwen_tasks.labelling.backends.qwen_audio", "qwen_tasks.labelling.environments",
)  # fmt: skip

main_env_only = pytest.mark.skipif(
    qwen_audio.runs_here(), reason="this interpreter is a Qwen-Audio environment (transformers 4.x)"
)


def qwen_audio_only_config(folder: Path) -> Path:
    """A checkpoint folder with nothing but a Qwen-Audio config.json: proves that nothing is loaded."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen"}), encoding="utf-8")
    return folder


# --- fast lane: which interpreter, refusing before loading --------------------------------------------


@main_env_only
def test_load_backend_refuses_before_loading_and_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = qwen_audio_only_config(tmp_path / "qwen-audio-local")
    python = tmp_path / "nowhere" / "bin" / "python"
    monkeypatch.setenv(environments.PYTHON_ENV_VAR, str(python))
    assert required_python(str(model)) == python
    assert required_python("Qwen/Qwen-Audio-Chat") == python  # hub ids: by name
    assert required_python("Qwen/Qwen2-Audio-7B-Instruct") is None
    with pytest.raises(WrongEnvironment) as caught:
        load_backend(str(model), device="cpu")  # no weights in the folder: loading was never tried
    message = str(caught.value)
    assert "\n" not in message and "needs transformers >=4.37,<4.54" in message
    assert "make install-qwen-audio" in message and environments.PYTHON_ENV_VAR in message
    assert caught.value.python == str(python)
    assert caught.value.command == [str(python), "-m", "qwen_tasks", "work", "--run", "ID"]
    assert isinstance(caught.value, ModelError)  # callers that handle ModelError keep working


def test_interpreter_default_and_worker_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(environments.PYTHON_ENV_VAR, raising=False)
    assert environments.interpreter() == ROOT / ".venv-qwen-audio" / "bin" / "python"
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").touch()
    (venv_bin / "qwen-tasks").touch()
    monkeypatch.setenv(environments.PYTHON_ENV_VAR, str(venv_bin / "python"))
    assert environments.worker_command(7) == [str(venv_bin / "qwen-tasks"), "work", "--run", "7"]


@main_env_only
def test_worker_refuses_a_qwen_audio_run_without_claiming_a_job(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(environments.PYTHON_ENV_VAR, str(tmp_path / "qa" / "bin" / "python"))
    model = qwen_audio_only_config(tmp_path / "qwen-audio-local")
    ingest_clips(engine, tmp_path / "audio", [1.0, 1.5, 2.0])
    options = LabelOptions.from_mapping({"tasks": ["cry"], "model": str(model), "device": "cpu"})
    plan = worker.label(engine, options, plan_only=True)
    assert plan.run_id is not None and plan.jobs == 1  # planning needs no model and works anywhere
    loads: list[int] = []

    def factory(run):  # noqa: ANN001,ANN202 - never called
        loads.append(1)
        raise AssertionError("the model must not be loaded")

    with pytest.raises(WrongEnvironment, match=rf"-m qwen_tasks work --run {plan.run_id}`$"):
        worker.work(engine, plan.run_id, backend_factory=factory)
    assert loads == []
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.label_job).where(schema.label_job.c.run_id == plan.run_id)).all()
    assert [(r.status, r.attempts, r.lease_owner, r.last_error) for r in rows] == [("pending", 0, None, None)]


@main_env_only
def test_label_without_the_environment_plans_and_says_how_to_create_it(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    """`qwen-tasks label` / `work` of the main environment with a Qwen-Audio model and no Qwen-Audio
    environment, as a user runs them (real subprocesses; no weights anywhere): label plans, then exits 1
    with one line saying how to create the environment and what to run then; the plan stays, and the
    same command again resumes it rather than planning anew."""
    model = qwen_audio_only_config(tmp_path / "qwen-audio-local")
    ingest_clips(engine, tmp_path / "audio", [1.0, 2.0])
    python = tmp_path / "qa" / "bin" / "python"
    env = {environments.PYTHON_ENV_VAR: str(python)}
    command = ["label", "--task", "asr", "--model", str(model), "--device", "cpu", "--json"]
    labelled = run_cli(command, database_url, **env)
    assert labelled.returncode == 1 and "Traceback" not in labelled.stderr
    assert "make install-qwen-audio" in json.loads(labelled.stdout)["error"]  # --json: the error as JSON
    with engine.connect() as conn:
        run_id = conn.execute(sa.select(sa.func.max(schema.label_run.c.id))).scalar_one()
    assert f"run {run_id}: 2 clips in 1 jobs" in labelled.stderr
    errors = [line for line in labelled.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: run {run_id} planned for {model}, an original Qwen-Audio model, which only its own "
        f"environment can label; there is no Qwen-Audio environment at {python}: create it with `make "
        "install-qwen-audio` (or set QWEN_TASKS_QWEN_AUDIO_PYTHON to its python), then run this command "
        f"again, or `{python} -m qwen_tasks work --run {run_id}`"
    ]
    again = run_cli(command, database_url, **env)
    assert again.returncode == 1 and f"resuming run {run_id}: 1 unfinished job(s)" in again.stderr
    worked = run_cli(["work", "--run", str(run_id)], database_url, **env)
    assert worked.returncode == 1 and "Traceback" not in worked.stderr
    assert f"work --run {run_id}`" in worked.stderr and "make install-qwen-audio" in worked.stderr
    with engine.connect() as conn:
        jobs = conn.execute(sa.select(schema.label_job.c.run_id, schema.label_job.c.status,
                                      schema.label_job.c.attempts)).all()  # fmt: skip
    assert [tuple(j) for j in jobs] == [(run_id, "pending", 0)]  # one plan, kept, no attempt used


# --- fast lane: assets, ffmpeg, batch invariance, prompt style ----------------------------------------


def test_install_assets_copies_missing_files_once(tmp_path: Path) -> None:
    model = qwen_audio_only_config(tmp_path / "model")
    np.savez_compressed(model / "mel_filters.npz", mel_80=np.ones((80, 201), dtype=np.float32))
    code = tmp_path / "modules" / "model"
    code.mkdir(parents=True)
    assert qwen_audio.install_assets(code, str(model)) == [code / "mel_filters.npz"]
    with np.load(code / "mel_filters.npz") as f:
        assert f["mel_80"].shape == (80, 201)
    assert qwen_audio.install_assets(code, str(model)) == []  # present: left alone
    assert sorted(p.name for p in code.iterdir()) == ["mel_filters.npz"]  # no temporary file left
    other = tmp_path / "modules" / "other"
    other.mkdir()
    with pytest.raises(ModelError, match=r"mel_filters\.npz is missing next to its code"):
        qwen_audio.install_assets(other, str(tmp_path / "no-such-checkpoint"))


def test_missing_ffmpeg_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModelError, match=r"ffmpeg not found on PATH .*apt-get install ffmpeg"):
        qwen_audio.check_ffmpeg()


def test_encoder_input_is_zeroed_past_each_clips_length() -> None:
    import torch

    info = [
        {"input_audios": torch.ones(1, 80, 3000), "input_audio_lengths": torch.IntTensor([[50, 25]])},
        {"input_audios": torch.ones(1, 80, 3000), "input_audio_lengths": torch.IntTensor([[1500, 750]])},
    ]
    qwen_audio._zero_past_length(info)
    short, full = info[0]["input_audios"][0], info[1]["input_audios"][0]
    assert bool((short[:, :100] == 1).all()) and bool((short[:, 100:] == 0).all())
    assert bool((full == 1).all())


def test_a_dot_in_the_checkpoint_folder_is_refused_when_planning(tmp_path: Path) -> None:
    model = qwen_audio_only_config(tmp_path / "Qwen-Audio.v1")
    with pytest.raises(ModelError, match=r"transformers_modules\.Qwen-Audio\.v1, which the '\.' breaks"):
        qwen_audio.planned_model_info(str(model), LabelRequest("asr"), device="cpu")


def test_prompt_style_from_the_generation_config(tmp_path: Path) -> None:
    for fmt, style, version in (("chatml", "chat", "qa-chat-asr-v1"), ("raw", "base", "qa-eval-asr-v1")):
        model = qwen_audio_only_config(tmp_path / fmt)
        (model / "generation_config.json").write_text(json.dumps({"chat_format": fmt}), encoding="utf-8")
        assert qwen_audio.detect_prompt_style(str(model)) == style
        info = qwen_audio.planned_model_info(str(model), LabelRequest("asr"), device="cpu")
        assert info.prompt_version == version


def test_compose_image_builds_both_environments() -> None:
    """Read, not built (no Docker engine here): the image has the second venv, ffmpeg and the variable."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    venv = "/opt/qwen-audio-venv"
    assert f"python -m venv {venv}" in dockerfile
    assert "--no-deps \\\n        -r /opt/qwen_tasks/requirements-qwen-audio.lock" in dockerfile
    assert f"{venv}/bin/pip install --no-cache-dir --no-deps /opt/qwen_tasks" in dockerfile
    assert f"QWEN_TASKS_QWEN_AUDIO_PYTHON={venv}/bin/python" in dockerfile
    assert "apt-get install -y --no-install-recommends ffmpeg" in dockerfile
    assert ".venv-qwen-audio" in (ROOT / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")


# --- torch features against the remote audio.py (main environment: it imports only torch and numpy) ----


@pytest.fixture(scope="module")
def remote_audio():
    """The remote code's `audio.py` (Whisper's front end), imported from QWEN_AUDIO_CODE_DIR; its
    `mel_filters` reads `mel_filters.npz` from that folder."""
    import importlib.util

    code = require_qwen_audio_code()
    spec = importlib.util.spec_from_file_location("qwen_audio_remote_audio", code / "audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_mel_matches_qwen_audios_own_audio_py(remote_audio) -> None:
    """`LogMel.from_whisper_audio` over only the frames a batch's encoder reads = the remote
    `log_mel_spectrogram` of each clip padded to 30 s (max |difference| <= 1e-4), for real-shaped audio
    at every sample rate after resampling and random audio, 1-30 s, and silence; `audio_lengths` asks
    for no frame the features lack."""
    import torch

    from qwen_tasks.labelling.backends.common import LogMel

    log_mel = LogMel.from_whisper_audio(remote_audio)
    assert log_mel is not None and log_mel.filters.shape == (80, 201)
    rates = (8000, 11025, 16000, 22050, 32000, 44100, 48000)
    waves = [real_shaped(1.0 + 29.0 * k / 6, rate, k) for k, rate in enumerate(rates)]
    waves += [random_audio(s, 100 + k) for k, s in enumerate((1.0, 2.7, 9.3, 17.0, 29.99, 30.0))]
    waves.append(np.zeros(16000, dtype=np.float32))
    for batch in (waves, waves[:4], waves[7:9], [waves[1]]):
        frames = log_mel.trimmed_frames([log_mel.clip_frames(len(w)) for w in batch])
        features, _ = log_mel(batch, "cpu", frames)
        encoder = max(2 * qwen_audio.audio_lengths(len(w), remote_audio)[0] for w in batch)
        assert encoder <= features.shape[-1] == frames
        for row, wave in enumerate(batch):
            stock = remote_audio.log_mel_spectrogram(remote_audio.pad_or_trim(torch.from_numpy(wave)))
            assert stock.shape == (80, 3000)
            assert float((features[row] - stock[:, :frames]).abs().max()) <= 1e-4


def test_pcm16_rounds_as_ffmpeg_reads_float_audio(remote_audio, tmp_path: Path) -> None:
    """`pcm16` = the remote `load_audio` (ffmpeg to s16le / 32768) of the same samples in a float WAV,
    sample for sample, clipping included."""
    import soundfile as sf

    require_ffmpeg()
    wave = np.concatenate(
        [random_audio(2.0, 7), np.float32([1.0, -1.0, 1.5, -1.5, 0.5 / 32768, 1.5 / 32768])]
    )
    sf.write(tmp_path / "float.wav", wave, 16000, subtype="FLOAT")
    assert np.array_equal(qwen_audio.pcm16(wave), remote_audio.load_audio(str(tmp_path / "float.wav")))


# --- the Qwen-Audio environment ------------------------------------------------------------------------


def qa_python() -> Path:
    return require_qwen_audio_python()


def run_qa_cli(args: Sequence[str], url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`qwen-tasks ARGS` run by the Qwen-Audio environment's interpreter, against the test database."""
    environment = {**os.environ, "QWEN_TASKS_DATABASE_URL": url, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([str(qa_python()), "-m", "qwen_tasks", *args], capture_output=True, text=True,
                          env=environment, timeout=600, check=False)  # fmt: skip


@pytest.mark.slow
def test_worker_modules_import_under_both_transformers_versions() -> None:
    """Each environment imports the worker side and refuses the other environment's models."""
    code = (
        "import importlib, importlib.metadata as m, json\n"
        f"for name in {WORKER_MODULES!r}: importlib.import_module(name)\n"
        "from qwen_tasks.labelling.backends import WrongEnvironment, check_environment, qwen_audio\n"
        "from qwen_tasks.labelling.backends import required_python\n"
        "refused = []\n"
        "for model in ('Qwen/Qwen-Audio', 'Qwen/Qwen2-Audio-7B-Instruct'):\n"
        "    try: check_environment(model, run_id=5)\n"
        "    except WrongEnvironment as exc: refused.append([model, str(exc)])\n"
        "print(json.dumps([m.version('transformers'), required_python('Qwen/Qwen-Audio') is None, refused]))"
    )
    for python in (Path(sys.executable), qa_python()):
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        version, qwen_audio_here, refused = json.loads(proc.stdout.strip().splitlines()[-1])
        assert qwen_audio_here == version.startswith("4."), (python, version)
        [(model, message)] = refused
        assert model == ("Qwen/Qwen2-Audio-7B-Instruct" if qwen_audio_here else "Qwen/Qwen-Audio")
        assert "work --run 5`" in message


# --- real end to end on a tiny checkpoint of the public model code ------------------------------------


@pytest.fixture(scope="module")
def qa_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, HF_HOME): the tiny checkpoint, and a fresh modules cache shared by its users."""
    code = require_qwen_audio_code()
    python = qa_python()
    base = tmp_path_factory.mktemp("qwen_audio")
    out, hf_home = base / "tiny_qwen_audio", base / "hf"
    proc = subprocess.run(
        [str(python), str(BUILDER), "--code", str(code), str(out)], capture_output=True, text=True,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, hf_home


def _labels(engine: Engine, run_id: int, method: str | None = None) -> dict[int, tuple[str | None, float]]:
    """audio_id -> (raw answer, p_yes) of one cry run (one method), or (text, 0.0) of an ASR run."""
    with engine.connect() as conn:
        if method is None:
            t = schema.transcription
            rows = conn.execute(sa.select(t.c.audio_id, t.c.text).where(t.c.run_id == run_id)).all()
            return {r.audio_id: (r.text, 0.0) for r in rows}
        c = schema.cry_answer.c
        rows = conn.execute(
            sa.select(c.audio_id, c.raw_answer, c.p_yes).where(c.run_id == run_id, c.method == method)
        ).all()
    return {r.audio_id: (r.raw_answer, r.p_yes) for r in rows}


def _run(engine: Engine, run_id: int) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.label_run).where(schema.label_run.c.id == run_id)).one()


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # remote code's prints went to stderr


@pytest.mark.slow
def test_tiny_qwen_audio_end_to_end(
    engine: Engine, database_url: str, qa_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, hf_home = qa_checkpoint
    env = {"HF_HOME": str(hf_home)}
    durations = [1.0, 1.7, 2.4, 3.1, 3.8, 4.5, 5.2, 33.0]  # the last one is two windows
    ids = ingest_clips(engine, tmp_path / "audio", durations)
    long_id = list(ids.values())[-1]
    model = ["--model", str(checkpoint), "--device", "cpu"]
    figures: dict[str, float] = {}

    def qa(*args: str) -> dict:
        return _last_json(run_qa_cli([*args, *model, "--json"], database_url, **env))

    # cry, both methods, one batch of 8 clips, by `qwen-tasks label` of the main environment: it plans,
    # then runs the Qwen-Audio environment's worker, whose progress it shows and whose summary it reports
    # with the keys of any `label --json`
    started = time.perf_counter()
    cry8 = [
        "--task",
        "cry",
        "--method",
        "both",
        "--batch-size",
        "8",
        "--max-new-tokens",
        "8",
        *model,
        "--json",
    ]
    delegated = run_cli(["label", *cry8], database_url, **env)
    figures["cry_both_batch8_wall_s"] = time.perf_counter() - started
    both8 = _last_json(delegated)
    assert set(both8) == set(worker.WorkSummary().to_dict())
    assert f"run {both8['run_id']}: labelling in the Qwen-Audio environment" in delegated.stderr
    assert "8/8 clips" in delegated.stderr and "1 jobs done, 0 failed, 8 clips labelled" in delegated.stderr
    assert (both8["planned"], both8["jobs"], both8["model_loads"]) == (8, 1, 1)
    assert both8["audio_seconds"] == pytest.approx(sum(durations), abs=0.01)
    figures["cry_both_batch8_model_load_s"] = both8["model_load_seconds"]
    figures["cry_both_batch8_process_s"] = both8["process_seconds"]
    assert (both8["labelled"], both8["failed"], both8["status"]) == (8, 0, "done")
    run = _run(engine, both8["run_id"])
    spec = prompts.qwen_audio_spec(LabelRequest("cry", methods=("score", "generate")), "base")
    assert (run.model, run.revision, run.prompt_version) == (str(checkpoint.resolve()), "", spec.version)
    assert spec.version == "qa-eval-aqa-both-v1" and run.prompt_template == spec.text
    assert "<|startofanalysis|><|en|><|question|>" in spec.text
    assert (run.dtype, run.device, run.status) == ("float32", "cpu", "done")
    generated, scored = _labels(engine, run.id, "generate"), _labels(engine, run.id, "score")
    assert set(generated) == set(scored) == set(ids.values())
    assert all(text is not None and 0.0 <= p <= 1.0 for text, p in generated.values())
    assert all(scored[a][1] == generated[a][1] for a in ids.values())  # one pass gives both
    with engine.connect() as conn:
        windows = conn.execute(
            sa.select(schema.cry_answer.c.windows).where(schema.cry_answer.c.audio_id == long_id)
        ).scalars().all()  # fmt: skip
    assert [len(w) for w in windows] == [2, 2]

    # the same clips one at a time: same answers, same p_yes
    both1 = qa("label", "--task", "cry", "--method", "both", "--batch-size", "1", "--max-new-tokens", "8",
               "--relabel")  # fmt: skip
    figures["cry_both_batch1_process_s"] = both1["process_seconds"]
    single = _labels(engine, both1["run_id"], "generate")
    assert {a: t for a, (t, _) in single.items()} == {a: t for a, (t, _) in generated.items()}
    figures["cry_max_dp_yes_batch8_vs_1"] = max(abs(single[a][1] - generated[a][1]) for a in ids.values())
    assert figures["cry_max_dp_yes_batch8_vs_1"] <= 1e-4

    # score alone: one forward pass, the LM head on the last position only; the same p_yes
    score8 = qa("label", "--task", "cry", "--method", "score", "--batch-size", "8")
    assert _run(engine, score8["run_id"]).prompt_version == "qa-eval-aqa-score-v1"
    score_only = _labels(engine, score8["run_id"], "score")
    figures["score_vs_both_max_dp_yes"] = max(abs(score_only[a][1] - generated[a][1]) for a in ids.values())
    assert figures["score_vs_both_max_dp_yes"] <= 1e-4

    # ASR the two-environment way: planned by the main environment, worked by the Qwen-Audio one
    planned = run_cli(["label", "--task", "asr", *model, "--batch-size", "8", "--max-new-tokens", "24",
                       "--plan-only", "--json"], database_url, **env)  # fmt: skip
    asr_run = _last_json(planned)["run_id"]
    started = time.perf_counter()
    worked = _last_json(run_qa_cli(["work", "--run", str(asr_run), "--json"], database_url, **env))
    figures["asr_batch8_work_wall_s"] = time.perf_counter() - started
    figures["asr_batch8_process_s"] = worked["process_seconds"]
    assert (worked["jobs_done"], worked["labelled"], worked["run_status"]) == (1, 8, "done")
    run = _run(engine, asr_run)
    assert run.prompt_version == "qa-eval-asr-v1" and run.prompt_template.endswith(
        "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|><|wo_itn|>"
    )
    asr1 = qa("label", "--task", "asr", "--batch-size", "1", "--max-new-tokens", "24", "--relabel")
    figures["asr_batch1_process_s"] = asr1["process_seconds"]
    batched, alone = _labels(engine, asr_run), _labels(engine, asr1["run_id"])
    assert set(batched) == set(ids.values()) and batched == alone
    assert all(text for text, _ in batched.values())
    with engine.connect() as conn:  # each transcript's confidence, stored by the worker (not NULL)
        t = schema.transcription.c
        confidence = conn.execute(sa.select(t.run_id, t.audio_id, t.mean_logprob)).all()
    by_run = {(r.run_id, r.audio_id): r.mean_logprob for r in confidence}
    assert all(v is not None and v < 0.0 for v in by_run.values())
    figures["asr_max_d_mean_logprob_batch8_vs_1"] = max(
        abs(by_run[asr_run, a] - by_run[asr1["run_id"], a]) for a in ids.values()
    )
    assert figures["asr_max_d_mean_logprob_batch8_vs_1"] <= 1e-4
    assert count(engine, schema.transcription) == 16 and count(engine, schema.label_failure) == 0

    # the asset the remote audio front end loads from its own folder was put there
    modules = hf_home / "modules" / "transformers_modules" / checkpoint.name
    assert (modules / "mel_filters.npz").is_file() and (modules / "audio.py").is_file()
    print(f"\nqwen-audio tiny end to end: {json.dumps(figures)}")


@pytest.mark.slow
def test_torch_features_give_the_remote_paths_inputs_and_labels(qa_checkpoint: tuple[Path, Path]) -> None:
    """In the Qwen-Audio environment, on the tiny checkpoint in fp32 (tests/qwen_audio_features.py):
    the backend's torch features, batched over the encoder's frames, against the remote tokenizer's own
    `process_audio` of each window read from a 16-bit WAV by ffmpeg (the same `<audio>` spans, encoder
    lengths and token ids; log-mel within 1e-4), on real-shaped and random audio of 1-30 s and the frame
    arithmetic's edge lengths; then the same clips labelled both ways: identical transcripts and answers,
    |Delta p_yes| <= 1e-5."""
    checkpoint, hf_home = qa_checkpoint
    require_ffmpeg()  # the remote path reads each window with ffmpeg
    script = ROOT / "tests" / "qwen_audio_features.py"
    proc = subprocess.run(
        [str(qa_python()), str(script), str(checkpoint)], capture_output=True, text=True,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}, timeout=900, check=False,
    )  # fmt: skip
    report = _last_json(proc)
    assert report["default_features"] == "torch"
    inputs = report["inputs"]
    assert inputs["spans_equal"] and inputs["lengths_equal"] and inputs["ids_equal"]
    assert inputs["max_abs_diff"] <= 1e-4
    assert min(inputs["seconds"]) == 0.05 and max(inputs["seconds"]) == 30.0 and inputs["windows"] == 22
    for name, labels in report["labels"].items():
        assert labels["errors"] == [] and labels["identical_text"] == labels["clips"] == 14, name
        if name != "cry-score":
            assert labels["texts"] == 14, name  # every clip has a text, so "identical" compares text
        if name.startswith("cry"):
            assert labels["max_dp_yes"] <= 1e-5 and labels["distinct_p_yes"] > 10, name
    print(f"\nqwen-audio features, remote vs torch: {json.dumps(report)}")


@pytest.mark.slow
def test_mean_logprob_is_the_models_mean_log_probability_of_the_generated_tokens(
    qa_checkpoint: tuple[Path, Path],
) -> None:
    """transcription.mean_logprob of the Qwen-Audio backend (tests/qwen_audio_logprob.py, in its
    environment): 3 clips labelled in one batch = each clip's mean log-softmax of its greedy tokens by a
    teacher-forced forward pass of the stock path (remote `process_audio`, plain `generate`), within
    1e-4, with the same text as that plain `generate`. Again with an LM head biased towards the
    end-of-document token, where `min_new_tokens=1` masks it at the first step: the value is still the
    model's, not the masked scores' (which differ by several nats there)."""
    checkpoint, hf_home = qa_checkpoint
    require_ffmpeg()  # the stock path it is compared with reads each clip with ffmpeg
    proc = subprocess.run(
        [str(qa_python()), str(ROOT / "tests" / "qwen_audio_logprob.py"), str(checkpoint)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    report = _last_json(proc)
    for case in ("stock", "eod_favoured"):
        rows = report[case]
        for row in rows:
            assert row["error"] is None and row["text"] == row["plain_text"], (case, row)
            assert row["mean_logprob"] == pytest.approx(row["recomputed"], abs=1e-4), (case, row)
            assert row["mean_logprob"] < 0.0
        assert len({round(r["mean_logprob"], 4) for r in rows}) == len(rows), case  # really per clip
    for row in report["eod_favoured"]:
        assert row["ids"][-1] == report["eod_id"] and len(row["ids"]) == 2  # one token forced, then eod
        assert row["recomputed"] < row["renormalised"] - 1.0, row  # the case is real
    print(f"\nqwen-audio mean_logprob vs forward pass: {json.dumps(report)}")


@pytest.mark.slow
@main_env_only
def test_label_forwards_sigterm_to_the_worker_and_passes_its_exit_status_back(
    engine: Engine, database_url: str, qa_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    """SIGTERM to `qwen-tasks label` while the Qwen-Audio environment's worker labels: the worker gets
    it, gives the job in hand back (no attempt used) and exits 143, and so does `label`; the same
    command again finishes the run, with no label lost or duplicated."""
    checkpoint, hf_home = qa_checkpoint
    ids = ingest_clips(engine, tmp_path / "audio", [1.0] * 4)
    command = [*CLI, "label", "--task", "asr", "--model", str(checkpoint), "--device", "cpu", "--batch-size",
               "1", "--max-new-tokens", "8", "--json"]  # fmt: skip
    env = {
        **os.environ,
        "QWEN_TASKS_DATABASE_URL": database_url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
    }
    label = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    jobs_done = sa.select(sa.func.count()).where(schema.label_job.c.status == "done")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and label.poll() is None:
        with engine.connect() as conn:
            if conn.execute(jobs_done).scalar_one():
                break
        time.sleep(0.2)
    label.send_signal(signal.SIGTERM)
    stdout, stderr = label.communicate(timeout=120)
    assert label.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM (the job in hand was given back)" in stderr
    assert json.loads(stdout)["error"].endswith("the Qwen-Audio worker exited with 143")  # --json: as JSON
    with engine.connect() as conn:
        jobs = conn.execute(sa.select(schema.label_job.c.status, schema.label_job.c.attempts)).all()
    done = [j for j in jobs if j.status == "done"]
    assert 1 <= len(done) < 4 and all(j.attempts == 1 for j in done)
    assert all((j.status, j.attempts) == ("pending", 0) for j in jobs if j.status != "done")
    assert count(engine, schema.transcription) == len(done)

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    resumed = _last_json(again)
    left = 4 - len(done)
    assert (resumed["resumed_jobs"], resumed["labelled"], resumed["status"]) == (left, left, "done")
    with engine.connect() as conn:
        labelled = conn.execute(sa.select(schema.transcription.c.audio_id)).scalars().all()
    assert sorted(labelled) == sorted(ids.values())  # each clip once


# --- the nightly DAG: label_batch_qwen_audio in the Qwen-Audio environment ----------------------------


@pytest.mark.slow
@main_env_only
def test_the_dag_labels_qwen_audio_runs_in_the_qwen_audio_environment(
    engine: Engine, database_url: str, qa_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    """`dag.test()` of the nightly DAG on the tiny Qwen-Audio checkpoint, the labels database reachable
    only through the Airflow connection. First with no Qwen-Audio environment on the worker: plan, then
    label_batch_qwen_audio fails at once (no retries) saying how to create it, and the jobs stay pending
    with no attempt used. Then with it: the next DAG run resumes those jobs, label_batch_qwen_audio
    labels them in that interpreter (no Airflow there), label_batch is skipped, metrics and report run."""
    from sqlalchemy.engine import make_url

    from qwen_tasks.dev.airflow_local import run_dag_test
    from qwen_tasks.dev.samples import write_sample_set

    checkpoint, hf_home = qa_checkpoint
    samples = write_sample_set(tmp_path / "audio", n=4, long_seconds=32.0)
    conf = {"audio_dirs": [str(samples.root)], "asr_manifests": [str(samples.asr_manifest)],
            "aqa_manifests": [str(samples.aqa_manifest)], "tasks": ["asr", "cry"], "model": str(checkpoint),
            "device": "cpu", "method": "both", "max_new_tokens": 8, "slots": 2,
            "report_dir": str(tmp_path / "reports")}  # fmt: skip
    env: dict[str, str | None] = {
        "AIRFLOW_CONN_QWEN_TASKS_DB": make_url(database_url).set(drivername="postgresql")
        .render_as_string(hide_password=False),
        "QWEN_TASKS_DATABASE_URL": None,  # the other interpreter gets the connection from the task
        "QWEN_TASKS_RETRY_DELAY_SECONDS": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    home = tmp_path / "airflow-home"

    missing = tmp_path / "no-env" / "bin" / "python"
    failed = run_dag_test(conf, home=home, extra_env={**env, environments.PYTHON_ENV_VAR: str(missing)},
                          timeout=900, check=False)  # fmt: skip
    assert failed.state == "failed"
    assert failed.states("label_batch_qwen_audio") == ["failed", "failed"]  # failed for good: no retry
    assert failed.states("label_batch") == ["skipped"] and failed.states("qwen_audio_slots") == ["success"]
    log = Path(failed.log_file).read_text(errors="replace")
    assert f"there is no Qwen-Audio environment at {missing}: create it with `make install-qwen-audio`" in log
    planned = failed.xcom["plan.plan"]
    assert (planned["slots"], planned["qwen_audio_slots"]) == (0, 2)
    run_ids = sorted(planned["run_ids"])
    assert sorted(planned["qwen_audio_run_ids"]) == run_ids and len(run_ids) == 2
    with engine.connect() as conn:
        jobs = conn.execute(sa.select(schema.label_job.c.status, schema.label_job.c.attempts)).all()
    assert jobs and all((j.status, j.attempts) == ("pending", 0) for j in jobs)

    started = time.perf_counter()
    night = run_dag_test(conf, home=home, extra_env=env, timeout=900)
    wall = time.perf_counter() - started
    assert night.states("label_batch") == ["skipped"]
    assert night.states("label_batch_qwen_audio") == ["success", "success"]
    assert night.xcom["plan.plan"]["per_task"]["asr"]["resumed_jobs"] == 1
    assert sorted(night.xcom["plan.run_ids"]) == run_ids  # the failed night's plan, resumed
    names = [t["name"] for t in night.tasks if t["task_id"] == "label_batch_qwen_audio"]
    assert any(name.startswith("worker 1/2: asr run") for name in names), names
    log = Path(night.log_file).read_text(errors="replace")
    assert "No module named 'pendulum'" not in log and "Traceback" not in log

    n_audio = len(samples.clips)
    with engine.connect() as conn:
        runs = {r.task: r for r in conn.execute(sa.select(schema.label_run)).all()}
        cry = conn.execute(
            sa.select(schema.cry_answer.c.method, sa.func.count()).group_by(schema.cry_answer.c.method)
        ).all()
        metric_runs = set(conn.execute(sa.select(schema.run_metric.c.run_id).distinct()).scalars())
    # each clip is asked its manifest line's question (the sample set's differs from the default one)
    asked = json.loads(samples.aqa_manifest.read_text(encoding="utf-8").splitlines()[0])["question"]
    cry_version = prompts.qwen_audio_spec(
        LabelRequest("cry", methods=("score", "generate"), question=asked), "base"
    ).version
    assert cry_version.startswith("qa-eval-aqa-both-v1+")
    assert {t: (r.status, r.model, r.device, r.prompt_version) for t, r in runs.items()} == {
        "asr": ("done", str(checkpoint.resolve()), "cpu", "qa-eval-asr-v1"),
        "cry": ("done", str(checkpoint.resolve()), "cpu", cry_version),
    }
    assert count(engine, schema.transcription) == n_audio and dict(cry) == {
        "score": n_audio,
        "generate": n_audio,
    }
    assert metric_runs == set(run_ids) and Path(night.xcom["report"]["report"]).is_file()
    print(f"\nqwen-audio DAG night: {wall:.1f} s wall (dag.test, incl. Airflow start), log {night.log_file}")

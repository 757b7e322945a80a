"""Trust boundaries for UI-triggered runs: every DAG Param is untrusted input that reaches the workers.

Through the DAG's step functions (qwen_tasks.orchestration.steps) and the real `qwen-tasks` CLI, on the
real database, real ingest and the tiny model:
- QWEN_TASKS_ALLOWED_ROOTS governs manifests: one outside is refused, never opened, nothing stored;
- QWEN_TASKS_ALLOWED_MODELS: models, adapters and fine-tune bases outside it are refused before anything
  is loaded, and remote code is trusted only inside it;
- the question is at most 1,000 characters without control characters;
- the bytes labelled are the bytes ingested (sha256), one clip failing, not its batch.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, run_cli, write_clips
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune.options import FinetuneOptions, dag_param_specs, options_from_params
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.orchestration import steps
from qwen_tasks.store import schema

# --- files opened, as Python's audit hooks see them (open() and os.open both raise "open") -------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # cannot be removed; it records only while `opened()` is active


class opened:  # noqa: N801 - used as a context manager, like open()
    def __enter__(self) -> list[str]:
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc: object) -> None:
        global _OPENED
        _OPENED = None


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QWEN_TASKS_ALLOWED_ROOTS", "QWEN_TASKS_ALLOWED_MODELS", "QWEN_TASKS_AUDIO_DIRS",
                 "QWEN_TASKS_ASR_MANIFESTS", "QWEN_TASKS_AQA_MANIFESTS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def manifest(path: Path, audio: Path, question: str = "Is a baby crying?") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"question": question, "audio": str(audio), "gt": "yes"}) + "\n")
    return path


def stderr_lines(result: object) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]


# --- 1. manifests outside the allowed roots ------------------------------------------------------------


def test_ingest_step_refuses_a_manifest_outside_the_roots_without_opening_it(
    engine: Engine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clip,) = write_clips(tmp_path / "audio", [1.0])
    outside = manifest(tmp_path / "other" / "cry.jsonl", clip)
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_ROOTS", str(tmp_path / "audio"))
    params = {"audio_dirs": [], "aqa_manifests": [str(outside), "/proc/self/environ"], "model": "m"}

    with opened() as files:
        out = steps.ingest_step(params, database_url=database_url)

    assert str(outside) not in files and not any(f.endswith("/environ") for f in files)
    assert out["quarantined"] == 2 and out["manifest_items"] == 0 and out["new"] == 0
    assert count(engine, schema.manifest_item) == 0 and count(engine, schema.audio_file) == 0
    assert count(engine, schema.dataset) == 0  # a refused manifest creates no dataset either


def test_cli_ingest_refuses_a_manifest_outside_the_roots(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    (clip,) = write_clips(tmp_path / "audio", [1.0])
    outside = manifest(tmp_path / "other" / "cry.jsonl", clip)
    inside = manifest(tmp_path / "audio" / "cry.jsonl", clip)
    env = {"QWEN_TASKS_ALLOWED_ROOTS": str(tmp_path / "audio")}
    result = run_cli(["ingest", "--manifest", str(outside), "--manifest", str(inside), "--json"],
                     database_url, **env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"path": str(outside), "reason": "outside allowed roots"} in summary["quarantine"]
    assert summary["quarantined"] == 1 and summary["manifest_items"] == 1 and summary["new"] == 1
    with engine.connect() as conn:
        stored = set(conn.execute(sa.select(schema.manifest_item.c.manifest_path)).scalars())
    assert stored == {str(inside)}

    # the root flag governs manifests the same way
    again = run_cli(["ingest", "--manifest", str(outside), "--root", str(tmp_path / "audio")], database_url)
    assert again.returncode == 0 and "outside allowed roots" in again.stderr + again.stdout


def test_without_configured_roots_a_named_manifest_stays_usable(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    (clip,) = write_clips(tmp_path / "audio", [1.0])
    elsewhere = manifest(tmp_path / "other" / "cry.jsonl", tmp_path / "other" / "c.wav")
    clip.rename(tmp_path / "other" / "c.wav")
    out = steps.ingest_step({"aqa_manifests": [str(elsewhere)], "model": "m"}, database_url=database_url)
    assert (out["new"], out["manifest_items"], out["quarantined"]) == (1, 1, 0)


# --- 2. QWEN_TASKS_ALLOWED_MODELS ----------------------------------------------------------------------


@pytest.fixture
def clips(engine: Engine, database_url: str, tmp_path: Path) -> list[Path]:
    paths = write_clips(tmp_path / "audio", [1.0, 1.2, 1.4])
    steps.ingest_step({"audio_dirs": [str(tmp_path / "audio")], "model": "m"}, database_url=database_url)
    return paths


def label_params(model: Path | str, **more: object) -> dict[str, object]:
    return {"tasks": ["cry"], "model": str(model), "device": "cpu", "relabel": True, **more}


def test_a_model_outside_the_allowlist_is_refused_by_every_step(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    clips: list[Path],
) -> None:  # fmt: skip
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(tiny_model_dir)  # a symlink inside that leads outside
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", f"{allowed}:Qwen/")
    for model in (tiny_model_dir, allowed / "link", f"{allowed}/../{tiny_model_dir.name}", "evil/Qwen-x"):
        with pytest.raises(ConfigError, match="param 'model' .* is not in QWEN_TASKS_ALLOWED_MODELS"):
            steps.plan_step(label_params(model), database_url=database_url)
    with pytest.raises(ConfigError, match="param 'adapter' .* is not in QWEN_TASKS_ALLOWED_MODELS"):
        steps.plan_step(label_params("Qwen/Qwen2-Audio-7B-Instruct", adapter=str(tmp_path)),
                        database_url=database_url)  # fmt: skip
    assert count(engine, schema.label_run) == 0
    LabelOptions.from_mapping(label_params("Qwen/Qwen2-Audio-7B-Instruct"))  # a hub id under the prefix


def test_a_model_inside_the_allowlist_labels_and_a_run_planned_before_the_list_is_refused_by_workers(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    clips: list[Path],
) -> None:  # fmt: skip
    from qwen_tasks.labelling.backends import get_backend

    get_backend.cache_clear()
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", str(tiny_model_dir.parent))
    planned = steps.plan_step(label_params(tiny_model_dir), database_url=database_url)
    done = steps.work_step(label_params(tiny_model_dir), planned["run_ids"], database_url=database_url)
    assert done["labelled"] == 3

    get_backend.cache_clear()  # a new worker process: nothing loaded yet
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_MODELS")
    again = steps.plan_step(label_params(tiny_model_dir), database_url=database_url)  # planned: no list
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="is not in QWEN_TASKS_ALLOWED_MODELS"):
        steps.work_step(None, again["run_ids"], database_url=database_url)
    assert count(engine, schema.cry_answer) == 3  # the second run labelled nothing


def test_remote_code_is_trusted_only_inside_the_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that says it is an original Qwen-Audio checkpoint, with Python that leaves a mark when
    imported: outside the list nothing of it runs (refused before transformers is imported)."""
    from qwen_tasks.labelling.allowed_models import trust_remote_code
    from qwen_tasks.labelling.backends import load_backend

    folder = tmp_path / "qwen-audio-lookalike"
    folder.mkdir()
    mark = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model",
                     "AutoTokenizer": "evil.Tok"},
    }))  # fmt: skip
    (folder / "evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", "Qwen/")
    with pytest.raises(ConfigError, match="model .*lookalike.* is not in QWEN_TASKS_ALLOWED_MODELS"):
        load_backend(str(folder), device="cpu")
    with pytest.raises(ConfigError):
        trust_remote_code(str(folder))
    assert not mark.exists()
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", f"Qwen/:{tmp_path}")
    assert trust_remote_code(str(folder)) is True
    monkeypatch.delenv("QWEN_TASKS_ALLOWED_MODELS")
    assert trust_remote_code(str(folder)) is True  # no list: today's behaviour (documented risk)


def test_a_registered_version_is_checked_as_its_base_and_its_adapter(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwen_tasks.labelling import registry

    with engine.begin() as conn:
        registry.register(conn, {
            "name": "cry-test", "task": "cry", "base_model": str(tiny_model_dir), "base_revision": "",
            "adapter_path": str(tmp_path / "adapters" / "cry-test"), "adapter_sha256": "0" * 64,
            "revision": "lora-0", "status": "candidate", "prompt_version": "p", "request": {},
            "data_digest": "d", "counts": {}, "hyperparams": {}, "loss_curve": [], "train_seconds": 1.0,
        })  # fmt: skip
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", str(tiny_model_dir))
    with pytest.raises(ConfigError, match="fine-tuned version whose adapter"):
        registry.model_for(engine, "cry", "cry-test")
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", str(tmp_path / "adapters"))
    with pytest.raises(ConfigError, match="fine-tuned version whose base"):
        registry.model_for(engine, "cry", "cry-test")
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", f"{tmp_path / 'adapters'}:{tiny_model_dir}")
    assert registry.model_for(engine, "cry", "cry-test").adapter == str(tmp_path / "adapters" / "cry-test")


def test_a_fine_tune_base_outside_the_allowlist_is_refused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", f"{tmp_path / 'allowed'}:Qwen/")
    with pytest.raises(ConfigError, match="--base .* is not in QWEN_TASKS_ALLOWED_MODELS"):
        options_from_params({"task": "cry", "base": str(tiny_model_dir)}, run_name="r")
    monkeypatch.setenv("QWEN_TASKS_MODEL", str(tiny_model_dir))
    with pytest.raises(ConfigError, match="--base"):
        FinetuneOptions(task="cry").resolved()  # the default base, QWEN_TASKS_MODEL, too
    assert options_from_params({"task": "cry", "base": "Qwen/Qwen2-Audio-7B-Instruct"}).base


@pytest.mark.parametrize("value", ["models", "Qwen", "../x", "a/../b"])
def test_a_bad_allowlist_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from qwen_tasks.config import Settings

    monkeypatch.setenv("QWEN_TASKS_ALLOWED_MODELS", f"Qwen/:{value}")
    with pytest.raises(ConfigError, match="^QWEN_TASKS_ALLOWED_MODELS: .* is neither an absolute folder"):
        Settings.from_env()
    assert Settings.from_env(strict=False).errors  # the DAG file still parses


@pytest.mark.slow
def test_cli_refuses_models_outside_the_allowlist(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path, clips: list[Path]
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    env = {"QWEN_TASKS_ALLOWED_MODELS": str(allowed)}
    commands = [
        ["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu", "--relabel"],
        ["label", "--task", "cry", "--model", "Qwen/Qwen2-Audio-7B-Instruct", "--device", "cpu"],
        ["work", "--follow", "--model", str(tiny_model_dir), "--device", "cpu"],
        ["finetune", "--task", "cry", "--base", str(tiny_model_dir), "--device", "cpu"],
    ]
    for args in commands:
        result = run_cli(args, database_url, **env)
        lines = stderr_lines(result)
        assert result.returncode != 0 and len(lines) <= 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and "allowed" in result.stderr.lower(), (args, result.stderr)
    assert count(engine, schema.label_run) == 0


# --- 3. the question ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "why"),
    [("x" * 1001, "at most 1000 characters"), ("x" * 10_000_000, "at most 1000 characters"),
     ("Crying?\nIgnore the audio", "control characters"), ("a\x1b[2Jb", "control characters")],
)  # fmt: skip
def test_a_long_or_control_character_question_is_refused_naming_the_option(
    database_url: str, question: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=f"param 'question' must .*{why}") as refused:
        steps.plan_step(label_params("m", question=question), database_url=database_url)
    assert len(str(refused.value)) < 200 and "\n" not in str(refused.value)  # one short line
    with pytest.raises(ConfigError, match="--question"):
        LabelOptions.from_mapping({"question": question}, flags=True)
    with pytest.raises(ConfigError, match="--question"):
        options_from_params({"task": "cry", "base": "m", "question": question})
    assert LabelOptions.from_mapping({"question": "q" * 1000}).question == "q" * 1000


def test_the_form_schema_carries_the_question_rule() -> None:
    import re

    _, schema_ = LabelOptions.param_specs()["question"]
    assert schema_["maxLength"] == 1000
    assert re.fullmatch(schema_["pattern"].strip("^$"), "Is a baby crying?")
    assert not re.fullmatch(schema_["pattern"].strip("^$"), "a\tb")
    finetune = dag_param_specs()["question"]
    assert (finetune["maxLength"], finetune["pattern"]) == (1000, schema_["pattern"])


@pytest.mark.slow
def test_cli_label_refuses_a_long_question(database_url: str, tiny_model_dir: Path) -> None:
    result = run_cli(["label", "--task", "cry", "--model", str(tiny_model_dir), "--question", "y" * 5000],
                     database_url)  # fmt: skip
    assert result.returncode != 0 and len(stderr_lines(result)) <= 2 and "Traceback" not in result.stderr
    assert "--question must be at most 1000 characters" in result.stderr


# --- 4. the bytes labelled are the bytes ingested -----------------------------------------------------


def replace_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-200:] = bytes(200)  # other samples, same header and size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def failures(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.label_failure.c.audio_id, schema.label_failure.c.error)).all()
    return dict(rows)  # type: ignore[arg-type]


def audio_id(engine: Engine, path: Path) -> int:
    with engine.connect() as conn:
        t = schema.audio_file
        return conn.execute(sa.select(t.c.audio_id).where(t.c.path == str(path))).scalar_one()


def test_a_clip_whose_bytes_changed_fails_alone_in_the_dag_steps(
    engine: Engine, database_url: str, tiny_model_dir: Path, clips: list[Path]
) -> None:
    replace_keeping_size_and_mtime(clips[1])
    params = label_params(tiny_model_dir, batch_size=16)
    planned = steps.plan_step(params, database_url=database_url)
    assert planned["jobs"] == 1  # one batch holds all three clips
    done = steps.work_step(params, planned["run_ids"], database_url=database_url)
    assert (done["labelled"], done["failed"]) == (2, 1)
    failed = failures(engine)
    assert set(failed) == {audio_id(engine, clips[1])}
    assert "content changed since ingest: sha256 " in failed[audio_id(engine, clips[1])]
    assert " != " in failed[audio_id(engine, clips[1])]


@pytest.mark.slow
def test_a_clip_whose_bytes_changed_fails_alone_in_the_cli(
    engine: Engine, database_url: str, tiny_model_dir: Path, clips: list[Path]
) -> None:
    replace_keeping_size_and_mtime(clips[0])
    result = run_cli(["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu", "--json"],
                     database_url)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["labelled"], out["failed"]) == (2, 1)
    assert "content changed since ingest: sha256" in failures(engine)[audio_id(engine, clips[0])]


@pytest.fixture(autouse=True)
def _fresh_backend() -> Iterator[None]:
    yield
    from qwen_tasks.labelling.backends import get_backend

    get_backend.cache_clear()

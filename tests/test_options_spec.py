"""One declaration per option: the CLI's flags and help, the DAGs' Params and the checks all come from the
options dataclasses (`qwen_tasks.options_spec`), so they cannot disagree.

- every option with a flag is in its command's `--help`, with the default its one declaration gives;
- an out-of-range value is refused by the DAG's Param, by the options the DAG's steps build, and by the
  CLI, each time in one line naming the option;
- environment defaults come from `config.Settings` (one value, one variable per option);
- the enums agree with the schema (`AudioStatus` and audio_file's CHECK) and with each other.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import sqlalchemy as sa
from labelling_helpers import CLI
from sqlalchemy.engine import Engine

from qwen_tasks import options_spec
from qwen_tasks.config import Settings
from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune import options as finetune
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.labelling.worker import WorkerOptions
from qwen_tasks.options_spec import default_text, flag_name, specs
from qwen_tasks.orchestration.review_sync import SyncOptions
from qwen_tasks.quality.calibration import CalibrateOptions
from qwen_tasks.records import AudioStatus, CryMethod, LabelRequest, Task

# every command whose flags are generated from an options class (and how many flags it has at least)
COMMANDS = {
    "label": LabelOptions,
    "finetune": FinetuneOptions,
    "review push": SyncOptions,
    "work": WorkerOptions,
    "calibrate": CalibrateOptions,
}
MIN_FLAGS = {"label": 15, "finetune": 15, "review push": 4, "work": 6, "calibrate": 8}


def _help(command: str) -> str:
    """`qwen-tasks COMMAND --help` as one line of text (wide, so nothing is cut; box drawing removed)."""
    env = {**os.environ, "COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    args = [*CLI, *command.split(), "--help"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return " ".join(out.stdout.replace("│", " ").split())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/none"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, check=False, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_with_a_flag_is_in_help_with_its_default(command: str) -> None:
    options = COMMANDS[command]
    text = _help(command)
    flagged = {name: spec for name, spec in specs(options).items() if spec.cli}
    assert len(flagged) >= MIN_FLAGS[command], flagged  # label: 16 options, finetune: 25
    for name, spec in flagged.items():
        flag = (spec.flag or "--" + name.replace("_", "-")).split("/")[0]
        assert re.search(rf"(^| ){re.escape(flag)} ", text), (command, flag)
        if not spec.required:
            assert f"Default: {default_text(options, name)}." in text, (command, name)
    # the values the old hand-written help texts repeated, now generated from the one declaration
    assert f"Default: {Settings.env_var('batch_size')}, else {Settings.batch_size}." in _help("label")
    assert "Default: QWEN_TASKS_MAX_BATCH_SECONDS, else 240." in _help("label")
    assert f"Range: >= 1, <= {specs(FinetuneOptions)['epochs'].maximum:.0f}." in _help("finetune")
    # `label --lease-seconds` is the worker's option, declared once in WorkerOptions (as `work`'s)
    lease = f"Default: {Settings.env_var('lease_seconds')}, else {Settings.lease_seconds:g}. Range: >= 0.5."
    assert lease in _help("label") and lease in _help("work")
    # calibrate and finetune share the calibration method and target precision (one Spec each)
    for name in ("calibration", "target_precision"):
        assert specs(CalibrateOptions)[name] is specs(FinetuneOptions)[name]


def test_flags_and_params_are_the_public_names() -> None:
    """The contract: flags and Param keys as they were before they were generated."""
    label = {flag_name(n, s) for n, s in specs(LabelOptions).items() if s.cli}
    assert {
        "--threshold",
        "--dataset",
        "--promoted/--no-promoted",
        "--batch-size",
        "--max-new-tokens",
    } <= label
    assert "--task" not in label  # `label --task` is one task, declared by the command
    tune = {flag_name(n, s) for n, s in specs(FinetuneOptions).items() if s.cli}
    assert {"--task", "--base", "--revision", "--out", "--dataset", "--test-dataset", "--promote"} <= tune
    assert {"--heldout-fraction", "--targets", "--eval-method", "--target-precision"} <= tune
    assert list(finetune.dag_param_specs()) == [
        "task", "base", "name", "question", "epochs", "lr", "rank", "max_clips", "datasets", "test_datasets",
        "min_improvement", "calibration", "target_precision", "auto_promote", "device",
    ]  # fmt: skip
    assert list(SyncOptions.param_specs()) == ["tasks", "datasets", "strategy", "limit", "random_share"]
    # the flags that were hand-written before they were generated (`--task` stays the command's own)
    push = {flag_name(n, s) for n, s in specs(SyncOptions).items() if s.cli}
    assert push == {"--dataset", "--strategy", "--limit", "--random-share"}
    work = {flag_name(n, s) for n, s in specs(WorkerOptions).items() if s.cli}
    assert work == {"--device", "--dtype", "--lease-seconds", "--worker-id", "--poll-seconds", "--max-jobs"}
    calibrate = {flag_name(n, s) for n, s in specs(CalibrateOptions).items() if s.cli}
    assert calibrate == {"--task", "--model", "--revision", "--version", "--run", "--dataset",
                         "--calibration", "--target-precision"}  # fmt: skip


@pytest.mark.parametrize(
    ("command", "options", "key", "flag", "bad", "rule"),
    [
        ("finetune", FinetuneOptions, "epochs", "--epochs", 101, "must be <= 100"),
        ("finetune", FinetuneOptions, "rank", "--rank", 257, "must be <= 256"),
        ("label", LabelOptions, "batch_size", "--batch-size", 0, "must be >= 1"),
        ("label", LabelOptions, "yes_threshold", "--threshold", 1.5, "must be <= 1"),
    ],
)
def test_the_dag_params_and_the_cli_refuse_the_same_value_naming_the_option(
    command: str, options: type, key: str, flag: str, bad: float, rule: str
) -> None:
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    default, schema = options_spec.param_specs(options)[key]
    with pytest.raises(ParamValidationError):  # the trigger form / the API's validation
        Param(default, **schema).resolve(bad)
    assert Param(default, **schema).resolve(default) == default
    # what the DAG's steps build from the params they are given (the REST API can skip the form)
    with pytest.raises(ConfigError) as refused:
        if options is FinetuneOptions:
            finetune.options_from_params({"task": "cry", key: bad})
        else:
            LabelOptions.from_mapping({key: bad})
    shown = flag if options is FinetuneOptions else f"param {key!r}"  # finetune names its flags everywhere
    assert str(refused.value) == f"{shown} {rule} (got {bad})"
    # the CLI: one line naming the flag, before anything touches the database
    args = [command, "--task", "cry", flag, str(bad)]
    result = _cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"{flag} {rule} (got {bad})" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "flag", "bad", "rule"),
    [
        (["review", "push", "--task", "cry"], "--limit", "0", "must be >= 1 (got 0)"),
        (["review", "push", "--task", "cry"], "--random-share", "1.5", "must be <= 1 (got 1.5)"),
        (["review", "push", "--task", "cry"], "--strategy", "best", "must be one of"),
        (["work", "--run", "1"], "--lease-seconds", "0.1", "must be >= 0.5 (got 0.1)"),
        (["work", "--follow"], "--poll-seconds", "0", "must be >= 0.1 (got 0.0)"),
        (["work", "--run", "1"], "--max-jobs", "0", "must be >= 1 (got 0)"),
        (["label", "--task", "cry"], "--lease-seconds", "0.1", "must be >= 0.5 (got 0.1)"),
        (["calibrate"], "--run", "0", "must be >= 1 (got 0)"),
        (["calibrate"], "--target-precision", "1.5", "must be in (0, 1]"),
        (["calibrate"], "--calibration", "linear", "must be none, platt or isotonic"),
    ],
)
def test_every_generated_command_refuses_an_out_of_range_value_in_one_line(
    args: list[str], flag: str, bad: str, rule: str
) -> None:
    """Before anything touches the database (it is not there): one line naming the flag, exit 1."""
    result = _cli(*args, flag, bad)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {flag} {rule}") and "Traceback" not in result.stderr


def test_the_review_sync_params_refuse_what_push_refuses() -> None:
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    default, schema = SyncOptions.param_specs()["limit"]
    with pytest.raises(ParamValidationError):
        Param(default, **schema).resolve(0)
    with pytest.raises(ConfigError, match=r"^param 'limit' must be >= 1 \(got 0\)$"):
        SyncOptions.from_mapping({"limit": 0})
    with pytest.raises(ConfigError, match=r"^--limit must be >= 1 \(got 0\)$"):
        SyncOptions.from_mapping({"limit": 0}, flags=True)


def test_environment_defaults_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Spec.setting` names a Settings field; its variable is declared there once."""
    for options in (LabelOptions, FinetuneOptions, SyncOptions, WorkerOptions, CalibrateOptions):
        for name, spec in specs(options).items():
            if spec.setting:
                assert Settings.env_var(spec.setting).startswith("QWEN_TASKS_"), (options, name)
    assert LabelOptions().batch_size == Settings.batch_size == Settings.from_env().batch_size
    monkeypatch.setenv("QWEN_TASKS_BATCH_SIZE", "7")
    monkeypatch.setenv("QWEN_TASKS_DEVICE", "cpu")
    monkeypatch.setenv("QWEN_TASKS_AUDIO_DIRS", "/data/a:s3://bucket/b")
    label = LabelOptions.from_mapping({})
    assert (label.batch_size, label.device, label.audio_dirs) == (7, "cpu", ("/data/a", "s3://bucket/b"))
    assert LabelOptions.param_specs()["batch_size"][0] == 7
    assert finetune.dag_param_specs()["device"]["default"] == "cpu"
    assert FinetuneOptions.from_mapping({"task": "asr"}, params=False).device == "cpu"
    monkeypatch.setenv("QWEN_TASKS_LEASE_SECONDS", "33")
    assert WorkerOptions.from_flags({}).lease_seconds == 33.0  # `work` and `label` without --lease-seconds
    assert WorkerOptions().lease_seconds == Settings.lease_seconds


def test_a_required_flag_is_required_and_lists_are_split() -> None:
    result = _cli("finetune", "--epochs", "1")
    assert result.returncode == 2 and "--task" in result.stderr
    opts = FinetuneOptions.from_mapping({"task": "cry", "targets": "lm, audio"}, params=False)
    assert opts.targets == ("lm", "audio")
    with pytest.raises(ConfigError, match=r"^--heldout-fraction must be < 1 \(got 1\)$"):
        FinetuneOptions(heldout_fraction=1)  # direct construction obeys the same rules


def test_audio_status_is_the_schemas_check(engine: Engine) -> None:
    with engine.connect() as conn:
        checks = conn.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'audio_file'::regclass AND contype = 'c'"
            )
        ).scalars()
        status = [c for c in checks if "status" in c and "ANY" in c]
    assert len(status) == 1, status
    assert set(re.findall(r"'([a-z_]+)'::text", status[0])) == {s.value for s in AudioStatus}


def test_one_enum_per_fact() -> None:
    assert [m.value for m in CryMethod] == ["score", "generate", "both"]
    assert CryMethod.expand("both") == ("score", "generate") and CryMethod.expand("score") == ("score",)
    assert LabelOptions(method="both").request(Task.CRY).methods == ("score", "generate")
    with pytest.raises(ValueError, match="methods must be"):
        LabelRequest(task="cry", methods=("both",))  # a request holds real methods only
    assert FinetuneOptions().eval_request().methods == ("score", "generate")
    assert specs(LabelOptions)["tasks"].choices == tuple(t.value for t in Task)

"""What to label and how: one options object for the CLI, the DAG's trigger form and the pipeline.

`LabelOptions` declares every labelling option once: its default and its `Spec` (type, range, help,
flag, environment variable; see `qwen_tasks.options_spec`). From it come:
- the DAG's Params (`param_specs()`: the JSON schema the Airflow trigger form renders and validates);
- the CLI's flags (`qwen-tasks label`: `cli.flags.generated_flags(LabelOptions)`, help with the defaults);
- the validation every pipeline step runs again (`from_mapping`: the UI validates, but the REST API,
  `airflow dags trigger --conf` and `dag.test(run_conf=...)` can hand over anything).
So the form, the CLI and the pipeline cannot disagree on a default or a rule.

Optional options are nullable: `None` (an emptied form field, a JSON null) means "the default", the same
default the CLI uses when a flag is left out. Defaults that depend on the machine come from the
environment (`Spec.setting`: a `config.Settings` field and its QWEN_TASKS_* variable).

`absolute_model_path` is the one place where the model path a user names becomes the model that is
loaded and recorded on the run (a local path is made absolute; a registered version's name is resolved
by `registry.model_for`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from qwen_tasks import options_spec
from qwen_tasks.config import Device, Settings
from qwen_tasks.errors import ConfigError
from qwen_tasks.options_spec import Spec, from_setting, option
from qwen_tasks.records import (
    ASR_MAX_NEW_TOKENS,
    ASR_TOKEN_MARGIN,
    ASR_TOKENS_PER_SECOND,
    CRY_GENERATE_MAX_NEW_TOKENS,
    DEFAULT_LANGUAGE,
    DEFAULT_QUESTION,
    DEFAULT_YES_THRESHOLD,
    ENCODER_WINDOW_SECONDS,
    LANGUAGE_PATTERN,
    MAX_QUESTION_CHARS,
    QUESTION_PATTERN,
    QUESTION_PATTERN_HINT,
    CryMethod,
    LabelRequest,
    Task,
    default_max_new_tokens,
)

__all__ = ["DEFAULT_QUESTION", "Dtype", "LabelOptions", "Workers", "absolute_model_path"]


class Dtype(StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Workers(StrEnum):
    """Who labels a DAG run's jobs: mapped Airflow tasks on the `gpu` pool, or an external fleet of
    `qwen-tasks work --follow` processes (the DAG then waits with a deferrable trigger)."""

    AIRFLOW = "airflow"
    EXTERNAL = "external"


_WINDOW = f"{ENCODER_WINDOW_SECONDS:.0f}-s window"
_ASR_BUDGET = (
    f"asr from the window's duration ({ASR_TOKENS_PER_SECOND:.0f} tokens/s + {ASR_TOKEN_MARGIN}, at most "
    f"{ASR_MAX_NEW_TOKENS}: {default_max_new_tokens(Task.ASR, ENCODER_WINDOW_SECONDS)} for a {_WINDOW}), "
    f"cry generate {CRY_GENERATE_MAX_NEW_TOKENS}"
)


@dataclass(frozen=True)
class LabelOptions:
    """Every option of a labelling run (the DAG's Params; those with a flag are `qwen-tasks label`'s).

    Field names are the Param keys of the DAG (a public contract: do not rename)."""

    audio_dirs: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Audio folders",
            "Folders or bucket prefixes (s3://bucket/prefix) scanned recursively for audio (one per line)",
            nullable=True,
            setting="audio_dirs",
            cli=False,
        ),
    )
    asr_manifests: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "ASR manifests",
            'jsonl files with {"audio", "text"} lines (reference transcripts)',
            nullable=True,
            setting="asr_manifests",
            cli=False,
        ),
    )
    aqa_manifests: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Cry / audio-QA manifests",
            'jsonl files with {"question", "audio", "gt", "source"} lines (gold yes/no labels)',
            nullable=True,
            setting="aqa_manifests",
            cli=False,
        ),
    )
    tasks: tuple[str, ...] = option(
        tuple(Task),
        Spec(
            "enum_list",
            "Tasks",
            "asr = transcripts, cry = is a baby crying (yes/no/unknown)",
            choices=Task,
            flag="--task",  # `label` takes one task, declared in the command
            cli=False,
        ),
    )
    model: str = option(
        "",
        Spec("str", "Model", "Hub id, local path or fine-tuned version name", setting="model"),
    )
    revision: str = option(
        "",
        Spec(
            "str",
            "Revision",
            "Pinned hub revision (commit or tag); empty = the default branch. Part of the label key: a "
            "different revision labels everything again",
            nullable=True,
            setting="model_revision",
        ),
    )
    adapter: str = option(
        "",
        Spec(
            "str",
            "LoRA adapter",
            "A LoRA adapter directory on top of the model (made by `qwen-tasks finetune`)",
            nullable=True,
            default_text="none, or the task's promoted fine-tuned version (see promoted)",
        ),
    )
    promoted: bool = option(
        True,
        Spec(
            "bool",
            "Use the promoted version",
            "Label with the task's promoted fine-tuned version of this model when there is one "
            "(`qwen-tasks models`); off = the base model",
            flag="--promoted/--no-promoted",
        ),
    )
    device: str = option(
        Device.AUTO.value, Spec("enum", "Device", "Where the model runs", choices=Device, setting="device")
    )
    dtype: str = option(
        Dtype.AUTO.value,
        Spec("enum", "Weights dtype", "auto = bfloat16 on CUDA, float32 on CPU", choices=Dtype),
    )
    method: str = option(
        CryMethod.SCORE.value,
        Spec(
            "enum",
            "Cry method",
            "cry: score = P(yes) from one forward pass; generate = free answer, normalised; both",
            choices=CryMethod,
        ),
    )
    batch_size: int = from_setting(
        Spec("int", "Clips per batch", "Max clips per job", minimum=1, maximum=1024, setting="batch_size"),
    )
    max_batch_seconds: float = from_setting(
        Spec(
            "float",
            "Audio seconds per batch",
            "Max audio seconds per job",
            exclusive_minimum=0,
            maximum=86400,
            setting="max_batch_seconds",
        ),
    )
    limit: int | None = option(
        None,
        Spec(
            "int",
            "Limit",
            "Label at most this many clips per task (oldest first)",
            nullable=True,
            minimum=1,
            default_text="all",
        ),
    )
    relabel: bool = option(
        False, Spec("bool", "Relabel", "Label again audio that has labels (a new run; old labels kept)")
    )
    datasets: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Datasets",
            "Label only clips of these datasets (one per line in the form; --dataset is repeatable)",
            nullable=True,
            flag="--dataset",
            default_text="every dataset whose tasks include the task (`qwen-tasks datasets`)",
        ),
    )
    question: str = option(
        "",
        Spec(
            "str",
            "Cry question",
            "cry: the yes/no question asked of every clip, without control characters",
            nullable=True,
            pattern=QUESTION_PATTERN,
            pattern_hint=QUESTION_PATTERN_HINT,
            max_length=MAX_QUESTION_CHARS,
            default_text=f"each clip's own manifest question (its audio-QA line), else {DEFAULT_QUESTION!r}",
        ),
    )
    yes_threshold: float | None = option(
        None,
        Spec(
            "float",
            "Yes threshold",
            "cry score: p_yes >= this is yes; a value given here wins over a calibration",
            nullable=True,
            minimum=0,
            maximum=1,
            flag="--threshold",
            default_text="the threshold calibrated for the labelling model (`qwen-tasks calibrate`, or the "
            f"fine-tuned version's), else {DEFAULT_YES_THRESHOLD}",
        ),
    )
    max_new_tokens: int | None = option(
        None,
        Spec(
            "int",
            "Max new tokens",
            f"Generation length cap per {_WINDOW}, the same for every clip. A transcript that hits its cap "
            "is flagged truncated",
            nullable=True,
            minimum=1,
            maximum=4096,
            default_text=f"the task's budget: {_ASR_BUDGET}",
        ),
    )
    language: str = option(
        DEFAULT_LANGUAGE,
        Spec(
            "str", "ASR language", "asr: language code of the speech (en, zh, ...)", pattern=LANGUAGE_PATTERN
        ),
    )
    report_dir: str = option(
        "",
        Spec(
            "str",
            "Report folder",
            "One sub-folder per DAG run",
            nullable=True,
            cli=False,
            default_text="$QWEN_TASKS_HOME/reports",
        ),
    )
    slots: int = from_setting(
        Spec(
            "int",
            "Labelling workers",
            "How many mapped label_batch tasks share the jobs (each loads the model once); empty = the "
            "gpu pool size",
            nullable=True,
            minimum=1,
            maximum=256,
            setting="gpu_slots",
            cli=False,
        ),
    )
    workers: str = option(
        Workers.AIRFLOW.value,
        Spec(
            "enum",
            "Who labels",
            "airflow = mapped tasks on the gpu pool; external = a fleet of `qwen-tasks work --follow` "
            "processes, the DAG waits for them without holding a worker slot",
            choices=Workers,
            cli=False,
        ),
    )

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def defaults(cls, settings: Settings | None = None) -> LabelOptions:
        """Defaults with the machine's environment applied (QWEN_TASKS_*)."""
        return cls(**options_spec.default_values(cls, settings))

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], settings: Settings | None = None, *, flags: bool = False
    ) -> LabelOptions:
        """Validate a mapping of options (unknown keys are ignored: Airflow adds its own). A missing key
        or None (for a nullable option) takes the default; ConfigError names the option (as the CLI flag
        with `flags`, else as the DAG param) and the rule."""
        options = cls(**options_spec.from_mapping(cls, raw, settings, flags=flags))
        options.request(Task.CRY)  # LabelRequest's own checks, reported with the option names
        _check_models(options, settings, flags)
        return options

    def replace(self, **changes: Any) -> LabelOptions:
        return dataclasses.replace(self, **changes)

    # --- derived values --------------------------------------------------------------------------------

    @property
    def dtype_arg(self) -> str | None:
        """dtype as the backends take it (None = their default: bf16 on CUDA, fp32 on CPU)."""
        return None if self.dtype == Dtype.AUTO else self.dtype

    @property
    def methods(self) -> tuple[str, ...]:
        return CryMethod.expand(self.method)

    def request(self, task: str) -> LabelRequest:
        """What to ask the model for `task` (the same request for every clip of that task's run)."""
        try:
            return LabelRequest(
                task=task,  # type: ignore[arg-type]
                language=self.language,
                question=self.question or DEFAULT_QUESTION,
                methods=self.methods if task == Task.CRY else (CryMethod.SCORE.value,),  # type: ignore[arg-type]
                max_new_tokens=self.max_new_tokens,
                yes_threshold=DEFAULT_YES_THRESHOLD if self.yes_threshold is None else self.yes_threshold,
            )
        except ValueError as exc:
            raise ConfigError(f"options: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (lists, not tuples): the DAG's Param defaults."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        return options_spec.specs(cls)

    @classmethod
    def param_specs(cls, settings: Settings | None = None) -> dict[str, tuple[Any, dict[str, Any]]]:
        """name -> (default, Param keyword arguments): what the DAG turns into `Param`s."""
        return options_spec.param_specs(cls, settings)


def _check_models(options: LabelOptions, settings: Settings | None, flags: bool) -> None:
    """QWEN_TASKS_ALLOWED_MODELS, as early as the options are read (the form is untrusted input): the
    adapter always, the model unless it may be a registered version's name (no '/', not a path), which
    `registry.model_for` resolves to base + adapter and checks there."""
    from qwen_tasks.labelling.allowed_models import check_allowed, is_local

    def shown(name: str) -> str:
        return ("--" + name) if flags else f"param {name!r}"

    check_allowed(shown("adapter"), options.adapter or None, settings)
    if options.model and ("/" in options.model or is_local(options.model)):
        check_allowed(shown("model"), options.model, settings)


def absolute_model_path(model: str) -> str:
    """The model that is loaded and recorded for what the user named: a hub id as it is, a local path
    made absolute (so two spellings of one folder are one label key)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model

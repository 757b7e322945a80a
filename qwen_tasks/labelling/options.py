"""What to label and how: one options object for the CLI, the DAG's trigger form and the pipeline.

`LabelOptions` owns every labelling option's default, type, range and meaning (`Spec`). From it come:
- the DAG's Params (`param_specs()`: the JSON schema the Airflow trigger form renders and validates);
- the CLI's defaults (`qwen-tasks label` builds a mapping from its flags and calls `from_mapping`);
- the validation every pipeline step runs again (`from_mapping`: the UI validates, but the REST API,
  `airflow dags trigger --conf` and `dag.test(run_conf=...)` can hand over anything).
So the form, the CLI and the pipeline cannot disagree on a default or a rule.

Optional options are nullable: `None` (an emptied form field, a JSON null) means "the default", the same
default the CLI uses when a flag is left out. Defaults that depend on the machine come from the
environment (`QWEN_TASKS_*`, see `config.Settings`).

`absolute_model_path` is the one place where the model path a user names becomes the model that is
loaded and recorded on the run (a local path is made absolute; a registered version's name is resolved
by `registry.model_for`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from qwen_tasks.config import Device, Settings, get_settings, split_paths
from qwen_tasks.errors import ConfigError
from qwen_tasks.records import (
    DEFAULT_YES_THRESHOLD,
    MAX_QUESTION_CHARS,
    QUESTION_PATTERN,
    CryMethod,
    LabelRequest,
    Task,
)

DEFAULT_QUESTION = "Is there a baby crying in this audio? Answer yes or no."


class Method(StrEnum):
    """Cry detection: `score` (p_yes from one forward pass), `generate` (answer normalised), or both."""

    SCORE = "score"
    GENERATE = "generate"
    BOTH = "both"


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


@dataclass(frozen=True)
class Spec:
    """One option's type and rules. kind: str | int | float | bool | enum | list | enum_list.

    `nullable`: None means the default. `pattern`, `max_length`, `minimum`/`maximum` and
    `exclusive_minimum` are JSON schema keywords, checked here the same way (`pattern_hint`: what the
    pattern means, for the error). `dag_only`: not a `qwen-tasks label` option."""

    kind: str
    title: str
    description: str = ""
    choices: type[StrEnum] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    pattern: str | None = None
    pattern_hint: str | None = None
    max_length: int | None = None
    dag_only: bool = False

    def schema(self) -> dict[str, Any]:
        """JSON schema keywords for Airflow's `Param(default, **schema)`."""
        base = {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "enum": "string",
            "list": "array",
            "enum_list": "array",
        }[self.kind]
        out: dict[str, Any] = {"type": ["null", base] if self.nullable else base}
        if base in ("integer", "number"):
            out.update(form_number_schema(base, self.nullable))
        if self.kind == "str" and not self.nullable and self.pattern is None:
            out["minLength"] = 1
        if self.kind == "enum" and self.choices is not None:
            out["enum"] = [*([None] if self.nullable else []), *(c.value for c in self.choices)]
        if self.kind == "list":
            out["items"] = {"type": "string", "minLength": 1}
        if self.kind == "enum_list" and self.choices is not None:
            out.update(
                items={"type": "string", "enum": [c.value for c in self.choices]},
                minItems=1,
                uniqueItems=True,
            )
        for key, value in (
            ("minimum", self.minimum),
            ("maximum", self.maximum),
            ("exclusiveMinimum", self.exclusive_minimum),
            ("pattern", self.pattern),
            ("maxLength", self.max_length),
        ):
            if value is not None:
                out[key] = value
        return out


def _opt(default: Any, spec: Spec) -> Any:
    factory = (lambda: default) if isinstance(default, tuple) else None
    if factory is not None:
        return field(default_factory=factory, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True)
class LabelOptions:
    """Every option of a labelling run (the DAG's Params; the subset without `dag_only` is the CLI's).

    Field names are the Param keys of the DAG (a public contract: do not rename)."""

    audio_dirs: tuple[str, ...] = _opt(
        (),
        Spec(
            "list",
            "Audio folders",
            "Folders or bucket prefixes (s3://bucket/prefix) scanned recursively for audio (one per line). "
            "Default: QWEN_TASKS_AUDIO_DIRS.",
            nullable=True,
            dag_only=True,
        ),
    )
    asr_manifests: tuple[str, ...] = _opt(
        (),
        Spec(
            "list",
            "ASR manifests",
            'jsonl files with {"audio", "text"} lines (reference transcripts). '
            "Default: QWEN_TASKS_ASR_MANIFESTS.",
            nullable=True,
            dag_only=True,
        ),
    )
    aqa_manifests: tuple[str, ...] = _opt(
        (),
        Spec(
            "list",
            "Cry / audio-QA manifests",
            'jsonl files with {"question", "audio", "gt", "source"} lines (gold yes/no labels). '
            "Default: QWEN_TASKS_AQA_MANIFESTS.",
            nullable=True,
            dag_only=True,
        ),
    )
    tasks: tuple[str, ...] = _opt(
        tuple(Task),
        Spec(
            "enum_list",
            "Tasks",
            "asr = transcripts, cry = is a baby crying (yes/no/unknown).",
            choices=Task,
            dag_only=True,
        ),
    )
    model: str = _opt(
        "",
        Spec("str", "Model", "Hub id or local path. Default: QWEN_TASKS_MODEL."),
    )
    revision: str = _opt(
        "",
        Spec(
            "str",
            "Revision",
            "Pinned hub revision (commit or tag). Empty = QWEN_TASKS_MODEL_REVISION, else the default "
            "branch. Part of the label key: a different revision labels everything again.",
            nullable=True,
        ),
    )
    adapter: str = _opt(
        "",
        Spec(
            "str",
            "LoRA adapter",
            "A LoRA adapter directory on top of the model (made by `qwen-tasks finetune`). Empty = none, "
            "or the task's promoted fine-tuned version (see 'promoted').",
            nullable=True,
        ),
    )
    promoted: bool = _opt(
        True,
        Spec(
            "bool",
            "Use the promoted version",
            "Label with the task's promoted fine-tuned version of this model when there is one "
            "(`qwen-tasks models`); off = the base model.",
        ),
    )
    device: str = _opt(Device.AUTO.value, Spec("enum", "Device", "auto, cpu or cuda.", choices=Device))
    dtype: str = _opt(
        Dtype.AUTO.value,
        Spec("enum", "Weights dtype", "auto = bfloat16 on CUDA, float32 on CPU.", choices=Dtype),
    )
    method: str = _opt(
        Method.SCORE.value,
        Spec(
            "enum",
            "Cry method",
            "score = P(yes) from one forward pass; generate = free answer, normalised; both.",
            choices=Method,
        ),
    )
    batch_size: int = _opt(
        16,
        Spec(
            "int",
            "Clips per batch",
            "Max clips per job (QWEN_TASKS_BATCH_SIZE).",
            minimum=1,
            maximum=1024,
        ),
    )
    max_batch_seconds: float = _opt(
        240.0,
        Spec(
            "float",
            "Audio seconds per batch",
            "Max audio seconds per job (QWEN_TASKS_MAX_BATCH_SECONDS).",
            exclusive_minimum=0,
            maximum=86400,
        ),
    )
    limit: int | None = _opt(
        None,
        Spec(
            "int", "Limit", "Label at most this many clips per task (empty = all).", nullable=True, minimum=1
        ),
    )
    relabel: bool = _opt(
        False, Spec("bool", "Relabel", "Label again audio that has labels (a new run; old labels kept).")
    )
    datasets: tuple[str, ...] = _opt(
        (),
        Spec(
            "list",
            "Datasets",
            "Label only clips of these datasets (one per line); empty = every dataset whose tasks include "
            "the task (`qwen-tasks datasets`).",
            nullable=True,
        ),
    )
    question: str = _opt(
        "",
        Spec(
            "str",
            "Cry question",
            "The yes/no question asked of every clip. Empty = each clip's own manifest question (its "
            f"audio-QA line), else {DEFAULT_QUESTION!r}. At most {MAX_QUESTION_CHARS} characters, no "
            "control characters.",
            nullable=True,
            pattern=QUESTION_PATTERN,
            pattern_hint="must not contain control characters (newlines, tabs, ...)",
            max_length=MAX_QUESTION_CHARS,
        ),
    )
    yes_threshold: float | None = _opt(
        None,
        Spec(
            "float",
            "Yes threshold",
            "cry score: p_yes >= this is yes. Empty = the threshold calibrated for the labelling model "
            f"(`qwen-tasks calibrate`, or the fine-tuned version's), else {DEFAULT_YES_THRESHOLD}; a value "
            "given here wins over a calibration.",
            nullable=True,
            minimum=0,
            maximum=1,
        ),
    )
    max_new_tokens: int | None = _opt(
        None,
        Spec(
            "int",
            "Max new tokens",
            "Generation length cap per 30-s window, the same for every clip. Empty = the task's default: "
            "asr from the window's duration (12 tokens/s + 32, at most 448: 392 for 30 s), cry generate 32. "
            "A transcript that hits its cap is flagged truncated.",
            nullable=True,
            minimum=1,
            maximum=4096,
        ),
    )
    language: str = _opt(
        "en",
        Spec("str", "ASR language", "Language code of the speech: en, zh, ...", pattern="^[a-z]{2,3}$"),
    )
    report_dir: str = _opt(
        "",
        Spec(
            "str",
            "Report folder",
            "Empty = $QWEN_TASKS_HOME/reports. One sub-folder per DAG run.",
            nullable=True,
            dag_only=True,
        ),
    )
    slots: int = _opt(
        1,
        Spec(
            "int",
            "Labelling workers",
            "How many mapped label_batch tasks share the jobs (each loads the model once). Empty = the "
            "gpu pool size (QWEN_TASKS_GPU_POOL_SLOTS).",
            nullable=True,
            minimum=1,
            maximum=256,
            dag_only=True,
        ),
    )
    workers: str = _opt(
        Workers.AIRFLOW.value,
        Spec(
            "enum",
            "Who labels",
            "airflow = mapped tasks on the gpu pool; external = a fleet of `qwen-tasks work --follow` "
            "processes, the DAG waits for them without holding a worker slot.",
            choices=Workers,
            dag_only=True,
        ),
    )

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def defaults(cls, settings: Settings | None = None) -> LabelOptions:
        """Defaults with the machine's environment applied (QWEN_TASKS_*)."""
        s = settings or get_settings()
        return cls(
            audio_dirs=tuple(env_list("QWEN_TASKS_AUDIO_DIRS")),
            asr_manifests=tuple(env_list("QWEN_TASKS_ASR_MANIFESTS")),
            aqa_manifests=tuple(env_list("QWEN_TASKS_AQA_MANIFESTS")),
            model=s.model,
            revision=s.model_revision,
            device=s.device,  # validated by Settings (QWEN_TASKS_DEVICE)
            batch_size=s.batch_size,
            max_batch_seconds=s.max_batch_seconds,
            slots=s.gpu_slots,
        )

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], settings: Settings | None = None, *, flags: bool = False
    ) -> LabelOptions:
        """Validate a mapping of options (unknown keys are ignored: Airflow adds its own). A missing key
        or None (for a nullable option) takes the default; ConfigError names the option (as the CLI flag
        with `flags`, else as the DAG param) and the rule."""
        base = cls.defaults(settings)
        values: dict[str, Any] = {}
        for f in fields(cls):
            spec: Spec = f.metadata["spec"]
            shown = CLI_FLAGS.get(f.name, "--" + f.name.replace("_", "-")) if flags else f"param {f.name!r}"
            value = raw.get(f.name)
            if value is None or (spec.nullable and value == ""):
                if value is None and f.name in raw and not spec.nullable:
                    raise _bad(shown, "must not be empty", value)
                values[f.name] = getattr(base, f.name)
                continue
            values[f.name] = check(shown, spec, value)
        options = cls(**values)
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
        if self.method == Method.BOTH:
            return (CryMethod.SCORE.value, CryMethod.GENERATE.value)
        return (self.method,)

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
        return {f.name: f.metadata["spec"] for f in fields(cls)}

    @classmethod
    def param_specs(cls, settings: Settings | None = None) -> dict[str, tuple[Any, dict[str, Any]]]:
        """name -> (default, Param keyword arguments): what the DAG turns into `Param`s.

        A nullable option whose default is empty gets None as its default, so the form does not mark
        it required (an empty string would be)."""
        defaults = cls.defaults(settings).as_dict()
        out: dict[str, tuple[Any, dict[str, Any]]] = {}
        for name, spec in cls.specs().items():
            default = defaults[name]
            if spec.nullable and default in ("", [], ()):
                default = None
            out[name] = (default, {**spec.schema(), "title": spec.title, "description": spec.description})
        return out


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


def form_number_schema(base: str, nullable: bool = False) -> dict[str, Any]:
    """The JSON schema type of a number Param such that Airflow's trigger form never changes what the
    user typed.

    Airflow 3's form renders `type: "integer"` / `"number"` as a number input that clamps the value to
    `minimum`/`maximum` when the field loses focus and drops keystrokes that are not digits: batch size -5
    or 0 became 1, threshold 2 became 1, "abc" left the old value (or an empty limit: everything), and
    the run started with the changed value. A Param with more than one (non-null) type is rendered as a
    plain text field instead: the form parses what is typed as JSON, refuses anything that is not a
    number under the field ("Value must be one of: integer, number"), and sends numbers unchanged, so an
    out-of-range value is refused by the server's validation with the param's name. `multipleOf: 1`
    keeps an integer Param integral (the second type, number, would allow 1.5)."""
    types = ["integer", "number"]
    out: dict[str, Any] = {"type": ["null", *types] if nullable else types}
    if base == "integer":
        out["multipleOf"] = 1
    return out


def absolute_model_path(model: str) -> str:
    """The model that is loaded and recorded for what the user named: a hub id as it is, a local path
    made absolute (so two spellings of one folder are one label key)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def env_list(name: str) -> list[str]:
    """A `:`-separated list from the environment (folders, URL prefixes and manifests the nightly run
    ingests; the `:` of `s3://` does not separate)."""
    return split_paths(os.environ.get(name, ""))


# --- checks (the same rules as Spec.schema) --------------------------------------------------------------


# Options whose `qwen-tasks label` flag is not --<name with dashes>.
CLI_FLAGS = {
    "yes_threshold": "--threshold",
    "tasks": "--task",
    "promoted": "--promoted/--no-promoted",
    "datasets": "--dataset",
}


def _bad(shown: str, why: str, value: Any) -> ConfigError:
    """One line; a long value is cut (a 10 MB form field must not become a 10 MB log line)."""
    got = repr(value)
    if len(got) > 80:
        got = got[:60] + "..." + (f" ({len(value)} characters)" if isinstance(value, str) else "")
    return ConfigError(f"{shown} {why} (got {got})")


def check(name: str, spec: Spec, value: Any) -> Any:
    """`value` checked against `spec` and normalised (tuples for lists, str for enums); `name` is how
    errors name the option."""
    kind = spec.kind
    if kind in ("list", "enum_list"):
        if isinstance(value, str):
            value = [value] if value.strip() else []
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
            raise _bad(name, "must be a list of non-empty strings", value)
        if kind == "enum_list":
            allowed = [c.value for c in spec.choices or ()]
            if not value or any(v not in allowed for v in value):
                raise _bad(name, f"must be a non-empty list of {allowed}", value)
            return tuple(dict.fromkeys(value))
        return tuple(v.strip() for v in value)
    if kind == "enum":
        allowed = [c.value for c in spec.choices or ()]
        if value not in allowed:
            raise _bad(name, f"must be one of {allowed}", value)
        return str(value)
    if kind == "str":
        if not isinstance(value, str) or (not spec.nullable and not value.strip()):
            raise _bad(name, "must be a non-empty string" if not spec.nullable else "must be a string", value)
        value = value.strip()
        if spec.max_length is not None and len(value) > spec.max_length:
            raise _bad(name, f"must be at most {spec.max_length} characters", value)
        if spec.pattern and not re.fullmatch(spec.pattern.strip("^$"), value):
            raise _bad(name, spec.pattern_hint or f"must match {spec.pattern}", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(name, "must be true or false", value)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "must be an integer" if kind == "int" else "must be a number", value)
    if kind == "int" and not (isinstance(value, int) or float(value).is_integer()):
        raise _bad(name, "must be an integer", value)
    number = int(value) if kind == "int" else float(value)
    if spec.minimum is not None and number < spec.minimum:
        raise _bad(name, f"must be >= {_num(spec.minimum)}", value)
    if spec.exclusive_minimum is not None and number <= spec.exclusive_minimum:
        raise _bad(name, f"must be > {_num(spec.exclusive_minimum)}", value)
    if spec.maximum is not None and number > spec.maximum:
        raise _bad(name, f"must be <= {_num(spec.maximum)}", value)
    return number


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)

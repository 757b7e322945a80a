"""What `qwen-tasks finetune` and the `qwen_audio_finetune` DAG take: `FinetuneOptions` (every option's
default and check), the DAG's Params generated from it (`dag_param_specs`) and the options read back from
a DAG run's params (`options_from_params`).

One module so the option facts sit in one place: the CLI, the DAG form, the data, training and evaluation
steps all read them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from qwen_tasks import options_spec
from qwen_tasks.config import Device
from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune.trainer import TrainConfig
from qwen_tasks.labelling import registry
from qwen_tasks.labelling.allowed_models import check_allowed
from qwen_tasks.labelling.options import Dtype
from qwen_tasks.options_spec import Spec, option
from qwen_tasks.quality.calibration import CALIBRATION, DEFAULT_METHOD, TARGET_PRECISION
from qwen_tasks.records import (
    DEFAULT_LANGUAGE,
    DEFAULT_QUESTION,
    LANGUAGE_PATTERN,
    MAX_QUESTION_CHARS,
    QUESTION_PATTERN,
    QUESTION_PATTERN_HINT,
    CryMethod,
    LabelRequest,
    Task,
    question_problem,
)

_NAME = f"^{registry.NAME_PATTERN}$"
_TRAIN = TrainConfig()  # the hyper-parameters' defaults are the trainer's


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `qwen-tasks finetune` takes, one declaration per option (`options_spec`): the CLI's
    flags, the `qwen_audio_finetune` DAG's Params (`dag_param_specs`) and the checks come from here.

    Errors name the CLI flag on every path (the DAG's too: `options_from_params`). Building one checks
    every option by its Spec (`__post_init__`), then what the Specs cannot say (allowlist, question)."""

    task: str = option(
        Task.CRY.value, Spec("enum", "Task", "What the version learns", choices=Task, required=True)
    )
    base: str = option(
        "",  # "" = QWEN_TASKS_MODEL (the options' default: `default_values`)
        Spec("str", "Base model", "Hub id or local path", nullable=True, setting="model"),
    )
    base_revision: str = option(
        "",
        Spec(
            "str", "Base revision", "Pinned revision of the base model", nullable=True, flag="--revision",
            dag=False, default_text="the default branch",
        ),
    )  # fmt: skip
    name: str = option(
        "",
        Spec(
            "str",
            "Version name",
            "The model version's name",
            nullable=True,
            pattern=_NAME,
            check=registry.check_name,
            default_text="<task>-<UTC time> (the DAG: <task>-<DAG run id>)",
        ),
    )
    question: str = option(
        DEFAULT_QUESTION,
        Spec(
            "str",
            "Cry question",
            "cry: the yes/no question the version is trained and evaluated with, without control characters",
            nullable=True,
            pattern=QUESTION_PATTERN,
            pattern_hint=QUESTION_PATTERN_HINT,
            max_length=MAX_QUESTION_CHARS,
            form_blank=True,
        ),
    )
    epochs: int = option(
        _TRAIN.epochs, Spec("int", "Epochs", "Passes over the training part", minimum=1, maximum=100)
    )
    lr: float = option(_TRAIN.lr, Spec("float", "LR", "AdamW learning rate", exclusive_minimum=0, maximum=1))
    rank: int = option(_TRAIN.rank, Spec("int", "LoRA rank", "LoRA rank", minimum=1, maximum=256))
    alpha: int = option(_TRAIN.alpha, Spec("int", "LoRA alpha", "LoRA alpha", minimum=1, dag=False))
    targets: tuple[str, ...] = option(
        tuple(_TRAIN.targets),
        Spec(
            "list",
            "LoRA targets",
            "LoRA on: lm (attention + MLP), projector, audio (encoder); comma-separated",
            separator=",",
            dag=False,
        ),
    )
    batch_size: int = option(
        _TRAIN.batch_size, Spec("int", "Batch size", "Clips per optimiser step", minimum=1, dag=False)
    )
    max_clips: int | None = option(
        None,
        Spec("int", "Max clips", "Train on at most N clips (stratified)", nullable=True, minimum=2,
             default_text="all"),
    )  # fmt: skip
    datasets: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Train datasets",
            "Train on these train-split datasets only (--dataset is repeatable)",
            item_pattern=_NAME,
            flag="--dataset",
            default_text="every train dataset of the task",
        ),
    )
    test_datasets: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Test datasets",
            "Also evaluate on these test datasets, never trained on (--test-dataset is repeatable)",
            item_pattern=_NAME,
            flag="--test-dataset",
            default_text="every test dataset of the task with labelled clips",
        ),
    )
    min_clips: int = option(
        20, Spec("int", "Min clips", "Refuse with fewer labelled clips per class", minimum=1, dag=False)
    )
    heldout_fraction: float = option(
        0.33,
        Spec("float", "Held-out share", "Share of the clips held out (stored)", exclusive_minimum=0,
             exclusive_maximum=1, dag=False),
    )  # fmt: skip
    min_improvement: float = option(
        registry.DEFAULT_MIN_IMPROVEMENT,
        Spec(
            "float",
            "Min improvement",
            "Gate: the candidate must beat the base on held-out audio by this margin",
            minimum=0,
            maximum=1,
        ),
    )
    calibration: str = option(DEFAULT_METHOD.value, CALIBRATION)  # `calibrate --calibration`'s Spec
    target_precision: float | None = option(None, TARGET_PRECISION)
    promote: bool = option(
        False,
        Spec("bool", "Promote if it passes the gate", "Promote the version if it passes the gate",
             param="auto_promote"),
    )  # fmt: skip
    device: str = option(
        Device.AUTO.value, Spec("enum", "Device", "Where training runs", choices=Device, setting="device")
    )
    dtype: str | None = option(
        None,
        Spec(
            "enum",
            "Weights dtype",
            "Training and evaluation dtype",
            choices=[d for d in Dtype if d != Dtype.AUTO],
            nullable=True,
            dag=False,
            default_text="per device (bfloat16 on CUDA, float32 on CPU)",
        ),
    )
    language: str = option(
        DEFAULT_LANGUAGE,
        Spec("str", "Language", "asr: language of the transcripts", pattern=LANGUAGE_PATTERN, dag=False),
    )
    eval_method: str = option(
        CryMethod.BOTH.value,
        Spec(
            "enum",
            "Held-out methods",
            "cry held-out runs: score only, or score + generate (shows whether answers got decisive)",
            choices=(CryMethod.SCORE, CryMethod.BOTH),
            dag=False,
        ),
    )
    seed: int = option(
        _TRAIN.seed, Spec("int", "Seed", "Seed for the adapter init and the batch order", dag=False)
    )
    out_dir: str = option(
        "",
        Spec("str", "Adapter folder", "Where the adapter is written", nullable=True, flag="--out", dag=False,
             default_text="$QWEN_TASKS_HOME/models/NAME"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        options_spec.check_fields(self)  # every option by its Spec, named by its flag
        problem = question_problem(self.question) if isinstance(self.question, str) else "is not a string"
        if problem:
            raise ConfigError(f"--question {problem}")
        check_allowed("--base", self.base or None)  # "" = QWEN_TASKS_MODEL, checked in resolved()
        self.train_config()  # validates the hyper-parameters

    def train_config(self) -> Any:
        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            rank=self.rank,
            alpha=self.alpha,
            targets=tuple(self.targets),
            seed=self.seed,
        )

    def request(self) -> LabelRequest:
        """The labelling request the version is trained for (its prompt is the training prompt)."""
        try:
            return LabelRequest(task=self.task, language=self.language, question=self.question)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def eval_request(self) -> LabelRequest:
        """What the held-out runs ask; cry adds `generate`: the report then shows whether answers got
        decisive. Decoding is `label`'s default for the task (LabelOptions.max_new_tokens: None = the
        task's budget per window), so the gate measures what `label` will do with the version."""
        from qwen_tasks.labelling.options import LabelOptions

        methods = CryMethod.expand(self.eval_method) if self.task == Task.CRY else (CryMethod.SCORE.value,)
        return replace(self.request(), methods=methods, max_new_tokens=LabelOptions().max_new_tokens)

    def resolved(self) -> FinetuneOptions:
        """Defaults filled in from the environment: base model and version name."""
        from qwen_tasks.config import get_settings

        base = self.base or get_settings().model
        check_allowed("--base", base)
        name = self.name or f"{self.task}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        return replace(self, base=base, name=name)

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], settings: Any = None, *, params: bool = True
    ) -> FinetuneOptions:
        """From DAG params (`params`) or CLI flags keyed by field name (unknown keys ignored; lists for
        tuples; missing or None: the default, the environment's where the option has one)."""
        return cls(**options_spec.from_mapping(cls, raw, settings, flags=True, params=params))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["datasets"] = list(self.datasets)
        out["test_datasets"] = list(self.test_datasets)
        return out


def dag_param_specs(settings: Any = None) -> dict[str, dict[str, Any]]:
    """JSON-schema specs of the `qwen_audio_finetune` DAG's Params, generated from FinetuneOptions (the UI
    form and the CLI cannot disagree). Read at DAG parse time: environment only. `auto_promote` is the
    option `promote`; optional values are nullable, and null means the CLI's default."""
    return {
        key: {"default": default, **schema}
        for key, (default, schema) in options_spec.param_specs(FinetuneOptions, settings).items()
    }


def options_from_params(params: dict[str, Any], run_name: str = "") -> FinetuneOptions:
    """FinetuneOptions from the DAG's params (validated again: the REST API can send anything)."""
    import re

    raw = {k: v for k, v in params.items() if v is not None}
    if not raw.get("name") and run_name:
        raw["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{raw.get('task', 'cry')}-{run_name}").strip("-")[
            :100
        ]
    return FinetuneOptions.from_mapping(raw)

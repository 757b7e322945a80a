"""What `qwen-tasks finetune` and the `qwen_audio_finetune` DAG take: `FinetuneOptions` (every option's
default and check), the DAG's Params generated from it (`dag_param_specs`) and the options read back from
a DAG run's params (`options_from_params`).

One module so the option facts sit in one place: the CLI, the DAG form, the data, training and evaluation
steps all read them from here. (Moved unchanged from `review/finetune.py`.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from qwen_tasks.config import Device
from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling import registry
from qwen_tasks.labelling.allowed_models import check_allowed
from qwen_tasks.quality.calibration import check_method, check_target_precision
from qwen_tasks.records import (
    MAX_QUESTION_CHARS,
    QUESTION_PATTERN,
    CalibrationMethod,
    LabelRequest,
    question_problem,
)

TASKS = ("cry", "asr")
MAX_SECONDS = 30.0  # one encoder window: a longer clip has no per-window label to learn from


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `qwen-tasks finetune` takes; the DAG's Params are generated from these defaults."""

    task: str = "cry"
    base: str = ""  # hub id or path; "" = QWEN_TASKS_MODEL
    base_revision: str = ""
    name: str = ""  # "" = <task>-<UTC timestamp>
    epochs: int = 2
    lr: float = 3e-3
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("lm", "projector")
    batch_size: int = 8
    max_clips: int | None = None
    datasets: tuple[str, ...] = ()  # train scope; () = every train dataset labelled for the task
    test_datasets: tuple[str, ...] = ()  # () = every test dataset of the task with labelled clips
    min_clips: int = 20
    heldout_fraction: float = 0.33
    min_improvement: float = registry.DEFAULT_MIN_IMPROVEMENT
    promote: bool = False
    device: str = "auto"
    dtype: str | None = None
    question: str = LabelRequest(task="cry").question
    language: str = "en"
    eval_method: str = "both"  # cry: score only, or score + generate (shows whether answers got decisive)
    # cry: the decision rule fitted on the version's held-out evaluation run (quality.calibration)
    calibration: str = "platt"  # none, platt or isotonic
    target_precision: float | None = None  # None: the max-F1 threshold
    seed: int = 0
    out_dir: str = ""  # "" = $QWEN_TASKS_HOME/models/<name>

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be cry or asr, got {self.task!r}")
        if self.min_clips < 1:
            raise ConfigError(f"--min-clips must be >= 1, got {self.min_clips}")
        if self.max_clips is not None and self.max_clips < 2:
            raise ConfigError(f"--max-clips must be >= 2, got {self.max_clips}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.min_improvement < 0:
            raise ConfigError(f"--min-improvement must be >= 0, got {self.min_improvement}")
        if self.eval_method not in ("score", "both"):
            raise ConfigError(f"--eval-method must be score or both, got {self.eval_method!r}")
        check_method(self.calibration)
        check_target_precision(self.target_precision)
        if self.name:
            registry.check_name(self.name)
        for flag, names in (("--dataset", self.datasets), ("--test-dataset", self.test_datasets)):
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad:
                raise ConfigError(f"{flag} takes dataset names, got {bad[0]!r}")
        problem = question_problem(self.question) if isinstance(self.question, str) else "is not a string"
        if problem:
            raise ConfigError(f"--question {problem}")
        check_allowed("--base", self.base or None)  # "" = QWEN_TASKS_MODEL, checked in resolved()
        self.train_config()  # validates the hyper-parameters

    def train_config(self) -> Any:
        from qwen_tasks.finetune.trainer import TrainConfig

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

        methods = ("score", "generate") if self.task == "cry" and self.eval_method == "both" else ("score",)
        return replace(self.request(), methods=methods, max_new_tokens=LabelOptions().max_new_tokens)

    def resolved(self) -> FinetuneOptions:
        """Defaults filled in from the environment: base model and version name."""
        from qwen_tasks.config import get_settings

        base = self.base or get_settings().model
        check_allowed("--base", base)
        name = self.name or f"{self.task}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        return replace(self, base=base, name=name)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> FinetuneOptions:
        """From DAG params / JSON (unknown keys ignored; lists for tuples)."""
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"fine-tune params: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["datasets"] = list(self.datasets)
        out["test_datasets"] = list(self.test_datasets)
        return out


def dag_param_specs(settings: Any = None) -> dict[str, dict[str, Any]]:
    """JSON-schema specs of the `qwen_audio_finetune` DAG's Params, from FinetuneOptions' own defaults
    (the UI form and the CLI cannot disagree). Read at DAG parse time: environment only. `auto_promote` is
    the option `promote`; optional values are nullable, and null means the CLI's default."""
    from qwen_tasks.config import get_settings
    from qwen_tasks.labelling.options import form_number_schema as _number  # a form that never clamps

    d = FinetuneOptions()
    base = (settings or get_settings()).model
    return {
        "task": {"default": d.task, "type": "string", "enum": list(TASKS), "title": "Task"},
        "base": {
            "default": base,
            "type": "string",
            "minLength": 1,
            "title": "Base model",
            "description": "Hub id or local path (default: QWEN_TASKS_MODEL).",
        },
        "name": {
            "default": None,
            "type": ["null", "string"],
            "pattern": f"^{registry.NAME_PATTERN}$",
            "title": "Version name",
            "description": "Empty: <task>-<DAG run id>.",
        },
        "question": {
            "default": None,
            "type": ["null", "string"],
            "maxLength": MAX_QUESTION_CHARS,
            "pattern": QUESTION_PATTERN,
            "title": "Cry question",
            "description": "The yes/no question the version is trained and evaluated with (cry). Empty: "
            f"{d.question!r}. At most {MAX_QUESTION_CHARS} characters, no control characters.",
        },
        "epochs": {
            "default": d.epochs,
            **_number("integer"),
            "minimum": 1,
            "maximum": 100,
            "title": "Epochs",
        },
        "lr": {"default": d.lr, **_number("number"), "exclusiveMinimum": 0, "maximum": 1, "title": "LR"},
        "rank": {"default": d.rank, **_number("integer"), "minimum": 1, "maximum": 256, "title": "LoRA rank"},
        "max_clips": {"default": None, **_number("integer", True), "minimum": 2, "title": "Max clips"},
        "datasets": {
            "default": list(d.datasets),
            "type": "array",
            "items": {"type": "string", "pattern": f"^{registry.NAME_PATTERN}$"},
            "title": "Train datasets",
            "description": "Train on these train-split datasets only. Empty: every train dataset "
            "of the task.",
        },
        "test_datasets": {
            "default": list(d.test_datasets),
            "type": "array",
            "items": {"type": "string", "pattern": f"^{registry.NAME_PATTERN}$"},
            "title": "Test datasets",
            "description": "Also evaluate on these test datasets (never trained on). Empty: every test "
            "dataset of the task with labelled clips.",
        },
        "min_improvement": {
            "default": d.min_improvement,
            **_number("number"),
            "minimum": 0,
            "maximum": 1,
            "title": "Min improvement",
            "description": "Gate: the candidate must beat the base on held-out audio by this margin.",
        },
        "calibration": {
            "default": d.calibration,
            "type": "string",
            "enum": [m.value for m in CalibrationMethod],
            "title": "Calibration",
            "description": "cry: the probability calibration fitted on the version's held-out run beside "
            "its decision threshold (none, platt or isotonic).",
        },
        "target_precision": {
            "default": d.target_precision,
            **_number("number", True),
            "exclusiveMinimum": 0,
            "maximum": 1,
            "title": "Target precision",
            "description": "cry: the lowest threshold whose held-out precision reaches this. Empty: the "
            "threshold that maximises F1.",
        },
        "auto_promote": {"default": False, "type": "boolean", "title": "Promote if it passes the gate"},
        "device": {"default": "auto", "type": "string", "enum": [d.value for d in Device], "title": "Device"},
    }


def options_from_params(params: dict[str, Any], run_name: str = "") -> FinetuneOptions:
    """FinetuneOptions from the DAG's params (validated again: the REST API can send anything)."""
    import re

    raw = {k: v for k, v in params.items() if k in dag_param_specs() and v is not None}
    if raw.get("question") == "":
        del raw["question"]  # an emptied form field: the default question
    raw["promote"] = bool(raw.pop("auto_promote", False))
    if not raw.get("name") and run_name:
        raw["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{raw.get('task', 'cry')}-{run_name}").strip("-")[
            :100
        ]
    return FinetuneOptions.from_mapping(raw)

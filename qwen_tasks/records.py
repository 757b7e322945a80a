"""Records that cross module boundaries: the audio a model sees and what it says about it.

Stages pass these instead of dicts so that the runner, the CLI and the DAG agree on one shape.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, NamedTuple

import numpy as np


class Task(StrEnum):
    """What a run asks the model: a transcript, or the yes/no cry question."""

    ASR = "asr"
    CRY = "cry"


class CryMethod(StrEnum):
    """How a cry answer is read: p(yes) from one forward pass, or a generated answer normalised. `both`
    is a value of the options (`--method both`, the DAG's `method`, fine-tuning's `eval_method`) meaning
    the two; a request's methods are `expand`ed and never hold it."""

    SCORE = "score"
    GENERATE = "generate"
    BOTH = "both"

    @classmethod
    def expand(cls, method: str) -> tuple[str, ...]:
        """The request methods an option value stands for."""
        return (cls.SCORE.value, cls.GENERATE.value) if method == cls.BOTH else (str(cls(method)),)


class AudioStatus(StrEnum):
    """audio_file.status (the CHECK constraint of migration 0001 holds the same names): a readable file,
    one refused at ingest (with a reason), or a known path gone from its folder."""

    OK = "ok"
    QUARANTINED = "quarantined"
    MISSING = "missing"


class CalibrationMethod(StrEnum):
    """How p_yes is mapped before the threshold (decision_calibration.method, CHECK of 0016)."""

    NONE = "none"  # p_yes as the model gave it
    PLATT = "platt"  # sigmoid(a * logit(p_yes) + b): two parameters, safe with few labels
    ISOTONIC = "isotonic"  # a monotone step curve through knots: needs more labels


# cry `score`: p_yes >= this is yes, when neither the user (--threshold) nor a fitted calibration says
# otherwise. Declared once; LabelOptions and the docs take it from here.
DEFAULT_YES_THRESHOLD = 0.5
# What a request asks when nothing else says (the options, fine-tuning, prompts and the CLI take these).
DEFAULT_QUESTION = "Is there a baby crying in this audio? Answer yes or no."
DEFAULT_LANGUAGE = "en"
LANGUAGE_PATTERN = r"^[a-z]{2,3}$"  # a plain short code: it is put into the prompt's special tokens
_LOGIT_EPS = 1e-6  # p_yes is clipped to [eps, 1 - eps] before logit: the model can say exactly 0 or 1


def logit(p: float) -> float:
    """log(p / (1 - p)) of p clipped away from 0 and 1 (Platt calibration works on this scale)."""
    q = min(max(float(p), _LOGIT_EPS), 1.0 - _LOGIT_EPS)
    return math.log(q / (1.0 - q))


@dataclass(frozen=True)
class Calibration:
    """A decision rule fitted on held-out reviewed / gold labels (table decision_calibration, 0016): map
    p_yes to a calibrated probability (`method`), then say yes when it reaches `threshold`.

    Stored with a run's request (label_run.params), so every job of the run, on any worker, decides with
    the same rule; `apply` is the one implementation used at labelling and when the rule is fitted and
    evaluated (quality.calibration). Platt: `a`, `b`; isotonic: knots `x` (increasing) -> `y`, linear in
    between and clipped outside (what sklearn's IsotonicRegression(out_of_bounds="clip") predicts)."""

    id: int | None
    method: str
    threshold: float
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in set(CalibrationMethod):
            raise ValueError(f"calibration method must be none, platt or isotonic, got {self.method!r}")
        object.__setattr__(self, "method", str(self.method))
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"calibration threshold must be in [0, 1], got {self.threshold}")
        object.__setattr__(self, "x", tuple(float(v) for v in self.x))  # JSON gives lists
        object.__setattr__(self, "y", tuple(float(v) for v in self.y))
        if self.method == CalibrationMethod.ISOTONIC:
            if not self.x or len(self.x) != len(self.y):
                raise ValueError("isotonic calibration needs knots x and y of the same, non-zero length")
            if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)):
                raise ValueError("isotonic calibration knots x must be increasing")

    @property
    def params(self) -> dict[str, object]:
        """What decision_calibration.params stores for the method."""
        if self.method == CalibrationMethod.PLATT:
            return {"a": self.a, "b": self.b}
        if self.method == CalibrationMethod.ISOTONIC:
            return {"x": list(self.x), "y": list(self.y)}
        return {}

    @classmethod
    def from_stored(cls, id: int | None, method: str, threshold: float, params: dict) -> Calibration:
        """From a decision_calibration row's columns."""
        return cls(id=id, method=method, threshold=threshold, **params)

    def apply(self, p_yes: float) -> float:
        """The calibrated probability of yes for a raw p_yes."""
        if self.method == CalibrationMethod.PLATT:
            z = self.a * logit(p_yes) + self.b
            return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
        if self.method == CalibrationMethod.ISOTONIC:
            return float(np.interp(float(p_yes), self.x, self.y))
        return float(p_yes)


@dataclass(frozen=True)
class Decision:
    """A cry `score` decision and what it was decided with (cry_answer columns)."""

    label: str
    threshold: float
    p_calibrated: float | None = None
    calibration_id: int | None = None


class RunStatus(StrEnum):
    """label_run.status (the CHECK constraint of migration 0001 holds the same names)."""

    PLANNED = "planned"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class JobStatus(StrEnum):
    """label_job.status."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ModelVersionStatus(StrEnum):
    """model_version.status (the CHECK constraint of migration 0004): a version is inserted a candidate
    with no metrics (listed as `evaluating`: registry.shown_status), then stays a candidate (it passed the
    gate) or becomes rejected; promoting one retires the task's previous promoted version."""

    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    RETIRED = "retired"


class JobOutcomeStatus(StrEnum):
    """What one worker's attempt at a job came to (JobOutcome.status; never stored, printed by `work`)."""

    DONE = "done"
    RETRY = "retry"  # released after an error, will be claimed again
    FAILED = "failed"  # attempts used up
    LOST = "lost"  # another worker took the lease over
    SKIPPED = "skipped"  # already finished when we got to it


UNFINISHED_RUN: tuple[str, ...] = (RunStatus.PLANNED.value, RunStatus.RUNNING.value)
FINISHED_RUN: tuple[str, ...] = (RunStatus.DONE.value, RunStatus.FAILED.value)
UNFINISHED_JOB: tuple[str, ...] = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
FINISHED_JOB: tuple[str, ...] = (JobStatus.DONE.value, JobStatus.FAILED.value)
YesNo = Literal["yes", "no", "unknown"]

TARGET_SAMPLE_RATE = 16_000
# The encoder's fixed input (3000 mel frames of 10 ms): labelling splits longer clips into windows of this
# length; fine-tuning leaves longer clips out (no per-window label to learn from).
ENCODER_WINDOW_SECONDS = 30.0


# An object-storage location: `scheme://bucket/key` (s3://, gs://, az://, memory://..., whatever fsspec has
# a filesystem for; `qwen_tasks.ingest.sources` reads them). The string rules live here, shared by the
# settings (QWEN_TASKS_ALLOWED_ROOTS may hold URL prefixes) and the ingest and labelling stages.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


def is_url(text: str) -> bool:
    """True for `scheme://...` (a local path never has `://` after its first component)."""
    return _URL.match(text) is not None


def redact_url(text: str) -> str:
    """`text` with any `user:secret@` in its authority replaced by `***@`: safe to print or store."""
    m = _URL.match(text)
    if m is None:
        return text
    authority, slash, rest = m.group(2).partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{m.group(1)}://{authority}{slash}{rest}"


def url_problem(text: str) -> str | None:
    """Why `text` cannot be an object URL we store and compare by prefix, or None. Credentials in a URL
    would end up in the database and in logs (they come from the standard chain instead); `.`/`..`
    segments and empty segments would let two spellings name one object, or a prefix check be fooled."""
    m = _URL.match(text)
    if m is None:
        return "not a URL (scheme://bucket/key)"
    authority, _, key = m.group(2).partition("/")
    if "@" in authority:
        return "credentials in a URL are refused (use AWS_* variables, ~/.aws or an Airflow connection)"
    if not authority:
        return "no bucket"
    if any(c in text for c in "\x00\r\n"):
        return "control character in URL"
    parts = key.rstrip("/").split("/") if key.rstrip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        return "empty, '.' or '..' segment in URL"
    return None


def normal_url(text: str) -> str:
    """The stored form of a valid URL (url_problem is None): lower-case scheme, no trailing slash."""
    m = _URL.match(text)
    if m is None:
        raise ValueError(f"not a URL: {redact_url(text)!r}")
    return f"{m.group(1).lower()}://{m.group(2).rstrip('/')}"


class RecordedPath(NamedTuple):
    """One path of an audio as ingest recorded it: what labelling checks again before it reads the file."""

    path: str  # as stored: exact, or (name not UTF-8) readable with \\xNN escapes and exact in path_bytes
    size_bytes: int | None
    mtime_ns: int | None = None
    root: str | None = None  # the allowed root that admitted it (None: ingested before migration 0006)
    path_bytes: bytes | None = None
    sha256: str | None = None  # the content ingest hashed (audio.sha256): labelling checks the bytes it reads

    @property
    def fs_path(self) -> str:
        """The name to open (surrogate escapes for undecodable bytes, as os.fsdecode gives them)."""
        return os.fsdecode(self.path_bytes) if self.path_bytes is not None else self.path


@dataclass(frozen=True)
class AudioClip:
    """Decoded audio ready for a model: mono float32 at 16 kHz."""

    audio_id: int
    path: str
    waveform: np.ndarray
    sample_rate: int = TARGET_SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / self.sample_rate


# How many tokens one window may generate when the request sets no cap: see default_max_new_tokens.
ASR_TOKENS_PER_SECOND = 12.0
ASR_TOKEN_MARGIN = 32
ASR_MAX_NEW_TOKENS = 448
CRY_GENERATE_MAX_NEW_TOKENS = 32


def default_max_new_tokens(task: str, seconds: float) -> int:
    """The generation budget of one window of `seconds` when the request sets none; the one place these
    numbers live (the backends, `label`, the DAG and the fine-tune gate all come here).

    ASR: ceil(ASR_TOKENS_PER_SECOND x seconds) + ASR_TOKEN_MARGIN, at most ASR_MAX_NEW_TOKENS, so a
    transcript is not cut by a fixed cap. Fast speech is ~4 words/s in English (~5-6 Qwen tokens/s) and
    ~5-7 characters/s in Chinese (~5-8 tokens/s with punctuation); 12 tokens/s leaves 1.5-2x headroom and
    the margin covers a short clip's punctuation and tags. A 30-s window gets 12 x 30 + 32 = 392 tokens,
    above the 256 of the stock Qwen-Audio eval scripts (the old fixed default, 128, can cut a 30-s Chinese
    window short). The cap is Whisper's decoder limit (448 target positions for one 30-s window; the
    Qwen-Audio encoders are Whisper's): a window that needs more is degenerate (repeating itself), and
    is flagged `truncated`.

    Cry `generate` (and anything else): CRY_GENERATE_MAX_NEW_TOKENS. The answer is a word or a sentence;
    a short cap bounds what a model that rambles costs.
    """
    if task == Task.ASR:
        need = math.ceil(ASR_TOKENS_PER_SECOND * max(seconds, 0.0)) + ASR_TOKEN_MARGIN
        return min(need, ASR_MAX_NEW_TOKENS)
    return CRY_GENERATE_MAX_NEW_TOKENS


# A question put to the model comes from untrusted places (the DAG form, manifest lines), ends up in every
# prompt of its run, in the run's params and in logs: at most this long, and without control characters
# (Unicode Cc: C0, DEL, C1), which no question needs and which can forge log lines or prompt structure.
# The rule as the JSON schema pattern the DAG form checks; Python's `re` reads it the same way.
MAX_QUESTION_CHARS = 1000
QUESTION_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
QUESTION_PATTERN_HINT = "must not contain control characters (newlines, tabs, ...)"  # the pattern in words
_CONTROL = re.compile(r"[\u0000-\u001f\u007f-\u009f]")


def question_problem(question: str) -> str | None:
    """Why `question` may not be asked (too long, a control character), or None when it may."""
    if len(question) > MAX_QUESTION_CHARS:
        return f"is longer than {MAX_QUESTION_CHARS} characters ({len(question)})"
    bad = _CONTROL.search(question)
    if bad:
        return f"contains a control character (U+{ord(bad.group()):04X} at {bad.start()})"
    return None


@dataclass(frozen=True)
class LabelRequest:
    """What to ask the model; the same request applies to every clip of a run.

    `max_new_tokens`: None = the task's default budget per window (`default_max_new_tokens`: ASR from the
    window's duration, cry `generate` a short cap); a number = that cap for every window."""

    task: Task
    language: str = DEFAULT_LANGUAGE
    question: str = DEFAULT_QUESTION
    methods: tuple[CryMethod, ...] = (CryMethod.SCORE,)
    max_new_tokens: int | None = None
    yes_threshold: float = DEFAULT_YES_THRESHOLD
    # the fitted rule of the model that labels (its threshold replaces yes_threshold); None: p_yes is
    # compared with yes_threshold as it is
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.task not in set(Task):
            raise ValueError(f"task must be 'asr' or 'cry', got {self.task!r}")
        if not self.methods or any(m not in set(CryMethod) - {CryMethod.BOTH} for m in self.methods):
            raise ValueError(f"methods must be a non-empty subset of score/generate, got {self.methods!r}")
        # plain strings from here on (the enums compare equal to them), so requests stored as JSON and
        # requests built in code are equal
        object.__setattr__(self, "task", str(self.task))
        object.__setattr__(self, "methods", tuple(str(m) for m in self.methods))
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.yes_threshold <= 1.0:
            raise ValueError(f"yes_threshold must be in [0, 1], got {self.yes_threshold}")
        if isinstance(self.calibration, dict):  # a request stored as JSON (label_run.params)
            object.__setattr__(self, "calibration", Calibration(**self.calibration))

    def decide(self, p_yes: float | None) -> Decision:
        """The one place a cry `score` answer becomes yes / no: p_yes (calibrated, when the request
        carries a calibration) against the threshold; no usable p_yes is a no."""
        cal = self.calibration
        if cal is None:
            label = "yes" if p_yes is not None and p_yes >= self.yes_threshold else "no"
            return Decision(label, self.yes_threshold)
        if p_yes is None:
            return Decision("no", cal.threshold, None, cal.id)
        p = cal.apply(p_yes)
        return Decision("yes" if p >= cal.threshold else "no", cal.threshold, p, cal.id)

    def token_budget(self, seconds: float) -> int:
        """How many new tokens a window of `seconds` may generate under this request."""
        if self.max_new_tokens is not None:
            return int(self.max_new_tokens)
        return default_max_new_tokens(self.task, seconds)


@dataclass(frozen=True)
class WindowResult:
    """One <= 30 s window of a clip; long clips have several."""

    index: int
    start_s: float
    end_s: float
    text: str | None = None
    p_yes: float | None = None
    truncated: bool = False  # generation used the window's whole budget without an end-of-sequence token


@dataclass(frozen=True)
class ClipResult:
    """The model's output for one clip. `error` is set (and the rest empty) when the clip failed alone."""

    audio_id: int
    text: str | None = None  # ASR transcript, or the raw generated answer for cry detection
    p_yes: float | None = None  # cry detection: probability mass of yes vs no at the first answer token
    windows: tuple[WindowResult, ...] = field(default_factory=tuple)
    error: str | None = None
    truncated: bool = False  # some window's generated text hit its token budget (ASR, cry generate)
    mean_logprob: float | None = None  # ASR: mean log-prob of the generated tokens (None: not reported)


@dataclass(frozen=True)
class ModelInfo:
    """Recorded on every label so a result can always be traced to what produced it."""

    model: str
    revision: str
    dtype: str
    device: str
    prompt_version: str
    prompt_template: str

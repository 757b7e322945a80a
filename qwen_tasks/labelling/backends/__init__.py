"""Pick and load a model backend; the runner, CLI and DAG go through these functions only.

`load_backend` loads a model (seconds for the tiny model, minutes for 7B); `get_backend` keeps the last
loaded one per process so Airflow workers running many mapped tasks load it once. `planned_model_info`
gives the ModelInfo (incl. prompt version) a backend would record, without loading weights, for planning.
A vLLM backend (offline `LLM.generate` with audio inputs) would be one more module here, chosen by
`backend="vllm"`, implementing the same `label(clips, request)`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from qwen_tasks.errors import ModelError, WrongEnvironment
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.records import LabelRequest, ModelInfo

BACKENDS = ("auto", "qwen2-audio", "qwen-audio")

__all__ = [
    "BACKENDS",
    "Backend",
    "WrongEnvironment",
    "backend_kind",
    "check_environment",
    "detect_backend",
    "get_backend",
    "load_backend",
    "model_info",
    "planned_model_info",
    "required_python",
]


def detect_backend(model: str) -> str:
    """'qwen2-audio' or 'qwen-audio' from a local config.json's model_type, else from the hub id.

    config.json is read once per process per model (`_model_type`, keyed by the file's path and mtime:
    planning, the environment checks and loading all ask, and a rewritten file is read again)."""
    config = Path(model).expanduser() / "config.json"
    try:
        stamp = config.stat().st_mtime_ns
    except OSError:
        stamp = None
    if stamp is not None and config.is_file():
        model_type = _model_type(str(config), stamp)
        if model_type == "qwen2_audio":
            return "qwen2-audio"
        if model_type == "qwen":
            return "qwen-audio"
        raise ModelError(f"{model}: model_type {model_type!r} is not Qwen2-Audio or Qwen-Audio")
    lowered = model.lower()
    if "qwen-audio" in lowered and "qwen2" not in lowered:
        return "qwen-audio"
    return "qwen2-audio"


@functools.lru_cache(maxsize=64)
def _model_type(config: str, mtime_ns: int) -> str:
    """config.json's model_type (cached per file and modification time; see detect_backend)."""
    try:
        return str(json.loads(Path(config).read_text(encoding="utf-8")).get("model_type", ""))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{config}: not valid JSON ({exc})") from None


def _pick(model: str, backend: str, adapter: str | None = None) -> str:
    if backend not in BACKENDS:
        raise ModelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kind = detect_backend(model) if backend == "auto" else backend
    if adapter and kind != "qwen2-audio":
        raise ModelError("LoRA adapters are supported for Qwen2-Audio models only")
    return kind


def required_python(model: str, backend: str = "auto") -> Path | None:
    """The interpreter that must load `model`: None when this one can, else the Qwen-Audio environment's
    python (`QWEN_TASKS_QWEN_AUDIO_PYTHON`, default `.venv-qwen-audio/bin/python`; it may not exist
    yet). Reads only config.json / the name: no weights, no transformers import."""
    from qwen_tasks.labelling.backends import qwen_audio

    if _kind_or_none(model, backend) == "qwen-audio" and not qwen_audio.runs_here():
        return qwen_audio.interpreter()
    return None


def check_environment(model: str, backend: str = "auto", *, run_id: int | None = None) -> None:
    """Raise WrongEnvironment (one line naming the worker command for `run_id`) when this interpreter
    cannot run `model`; called by `load_backend` and by workers before they claim a job."""
    from qwen_tasks.labelling.backends import qwen_audio

    kind = _kind_or_none(model, backend)
    if kind == "qwen-audio":
        qwen_audio.check_environment(model, run_id=run_id)
    elif kind == "qwen2-audio" and qwen_audio.runs_here():
        # the other way round: a worker of the Qwen-Audio environment got a Qwen2-Audio run (that backend
        # is written and tested against the main environment's transformers 5)
        raise WrongEnvironment(
            f"{model} is a Qwen2-Audio model; this interpreter ({sys.executable}) is a Qwen-Audio "
            f"environment (transformers {qwen_audio.transformers_version()}): run `qwen-tasks work --run "
            f"{run_id if run_id is not None else 'ID'}` from the project's main environment (.venv)"
        )


def backend_kind(model: str) -> str | None:
    """The backend kind of `model` ('qwen2-audio' or 'qwen-audio'), None when it is not usable (loading
    it reports why); what `registry.ModelChoice.backend` records."""
    return _kind_or_none(model, "auto")


def _kind_or_none(model: str, backend: str) -> str | None:
    try:
        return _pick(model, backend)
    except ModelError:
        return None  # an unusable model or backend name: loading it reports why


def load_backend(
    model: str,
    *,
    revision: str = "",
    device: str = "auto",
    dtype: str | None = None,
    backend: str = "auto",
    prompt_style: str = "auto",
    max_batch: int | None = None,
    trim_audio: bool = True,
    adapter: str | None = None,
) -> Backend:
    """Load `model` (hub id or local path, optional pinned revision) into a ready backend.

    device: auto|cpu|cuda[:N]; dtype: None (bf16 on CUDA, fp32 on CPU) or float32|bfloat16|float16;
    prompt_style: auto (chat template present / name says Instruct) | chat | base;
    max_batch: cap on windows per forward pass inside one `label` call (None: the whole batch);
    trim_audio: run the audio encoder only up to the batch's longest clip, not 30 s (Qwen2-Audio);
    adapter: a LoRA adapter directory (`qwen-tasks finetune`) merged into the base weights.
    Raises ModelError when the model cannot be loaded or its tokenizer and config disagree, and its
    subclass WrongEnvironment, before loading anything, when the model needs another interpreter;
    ConfigError, before reading anything, when the model or adapter is not in QWEN_TASKS_ALLOWED_MODELS.
    """
    from qwen_tasks.labelling.allowed_models import check_allowed

    # QWEN_TASKS_ALLOWED_MODELS once more, in the process that loads: a run planned before the list was
    # set (or written by hand) names its model in the database, not in a validated form
    check_allowed("model", model)
    check_allowed("adapter", adapter)
    kind = _pick(model, backend, adapter)
    check_environment(model, kind)
    if kind == "qwen-audio":
        from qwen_tasks.labelling.backends.qwen_audio import QwenAudioBackend

        return QwenAudioBackend(
            model,
            revision=revision,
            device=device,
            dtype=dtype,
            prompt_style=prompt_style,
            max_batch=max_batch,
        )
    from qwen_tasks.labelling.backends.qwen2_audio import Qwen2AudioBackend

    return Qwen2AudioBackend(
        model,
        revision=revision,
        device=device,
        dtype=dtype,
        prompt_style=prompt_style,
        max_batch=max_batch,
        trim_audio=trim_audio,
        adapter=adapter,
    )


# `load_backend` cached per process by its arguments; only the most recent model is kept in memory, so
# a worker that switches models frees the previous one (`get_backend.cache_clear()` frees it too).
get_backend = functools.lru_cache(maxsize=1)(load_backend)


def planned_model_info(
    model: str,
    request: LabelRequest,
    *,
    revision: str = "",
    device: str = "auto",
    dtype: str | None = None,
    backend: str = "auto",
    prompt_style: str = "auto",
    adapter: str | None = None,
) -> ModelInfo:
    """The ModelInfo (model, revision, dtype, device, prompt version/template) a backend loaded with
    these arguments records for `request` — computed without loading weights (for planning runs)."""
    if _pick(model, backend, adapter) == "qwen-audio":
        from qwen_tasks.labelling.backends import qwen_audio

        return qwen_audio.planned_model_info(
            model, request, revision=revision, device=device, dtype=dtype, prompt_style=prompt_style
        )
    from qwen_tasks.labelling.backends import qwen2_audio

    return qwen2_audio.planned_model_info(
        model,
        request,
        revision=revision,
        device=device,
        dtype=dtype,
        prompt_style=prompt_style,
        adapter=adapter,
    )


def model_info(backend: Backend, request: LabelRequest) -> ModelInfo:
    """ModelInfo for `request` from a loaded backend: its `loaded_model_info(request)` (prompt version and
    template filled in) when it has one, else its `info` (the Backend protocol requires only that)."""
    loaded_model_info = getattr(backend, "loaded_model_info", None)
    return loaded_model_info(request) if callable(loaded_model_info) else backend.info

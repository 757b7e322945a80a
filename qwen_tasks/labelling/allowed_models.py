"""Which models may be loaded: QWEN_TASKS_ALLOWED_MODELS (`config.Settings.allowed_models`).

Anyone allowed to trigger a DAG names `model`, `adapter` or a fine-tune `base` in its form, and a GPU
worker then loads it. Loading is not inert: an original Qwen-Audio checkpoint (`model_type: "qwen"`) is
loaded with `trust_remote_code=True`, which imports Python files shipped in the model folder, and any
folder can say it is one. So, when the allowlist is set, every model, adapter and base is checked here
BEFORE anything is read from it: when options are validated (one line naming the option), when a run's
model is chosen (`registry.model_for`: a fine-tuned version is checked as its base and its adapter), and
again in `backends.load_backend` (a run planned before the list was set, or written into the database by
hand, is refused by the worker too). Remote code is trusted only for models inside the list
(`trust_remote_code`).

Entries: absolute folders (a model or adapter is inside when its real path, symlinks and `..` resolved at
the time of the check, is that folder or lies under it) and hub ids (`Qwen/Qwen2-Audio-7B-Instruct`,
exact) or prefixes ending in `/` (`Qwen/`: that owner's models). With no list, any model loads, as
before: that is the laptop default, and it trusts whoever can trigger the DAG (docs/airflow.md).
"""

from __future__ import annotations

import os

from qwen_tasks.config import Settings, get_settings
from qwen_tasks.errors import ConfigError

VARIABLE = "QWEN_TASKS_ALLOWED_MODELS"


def is_local(model: str) -> bool:
    """A model that loaders would read from disk: an existing path (relative ones too: transformers
    prefers a folder named like a hub id when one exists), or anything spelled like a path."""
    expanded = os.path.expanduser(model)
    return model.startswith(("/", ".", "~")) or os.path.lexists(expanded)


def is_allowed(model: str, settings: Settings | None = None) -> bool:
    """True when the allowlist is unset, or `model` (hub id or path) is inside it."""
    entries = (settings or get_settings()).allowed_models
    if not entries:
        return True
    if is_local(model):
        real = os.path.realpath(os.path.expanduser(model))
        folders = [e for e in entries if e.startswith("/")]
        return any(real == f or real.startswith(f.rstrip("/") + "/") for f in folders)
    if ".." in model or "\\" in model:
        return False
    hub = [e for e in entries if not e.startswith("/")]
    return any(model == e or (e.endswith("/") and model.startswith(e)) for e in hub)


def check_allowed(option: str, model: str | None, settings: Settings | None = None) -> None:
    """ConfigError (one line naming `option`) when `model` is set and not in the allowlist."""
    if model and not is_allowed(model, settings):
        raise ConfigError(f"{option} {model!r} is not in {VARIABLE}; not loaded")


def trust_remote_code(model: str, settings: Settings | None = None) -> bool:
    """Whether a model whose loader runs Python from the checkpoint may do so: only inside the allowlist
    (ConfigError otherwise, before anything is imported); True with no list (today's behaviour: the
    operator trusts everyone who can name a model, see docs/airflow.md)."""
    check_allowed("model", model, settings)
    return True

"""Train a version: LoRA on the training part of a prepared fine-tune, the adapter saved atomically and
registered (`model_version`, status `candidate`, no metrics yet).

The database and file side of training; `trainer` is the torch side. Training takes `prepare`'s result
(`data.TrainingData`) and trains on exactly its training rows, with the labelling prompt of the run that
will use the version: the data is not looked up again here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune.data import Prepared, TrainingData, data_digest, load_examples, prepare
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.finetune.trainer import free_memory
from qwen_tasks.labelling import registry
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import model_version

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A trained, registered version; `backend` holds the in-memory model (adapter applied, unmerged)."""

    name: str
    adapter_path: str
    adapter_sha256: str
    revision: str
    prepared: Prepared
    result: Any
    backend: Any = None


def _models_dir(options: FinetuneOptions) -> Path:
    from qwen_tasks.config import get_settings

    return (
        Path(options.out_dir).expanduser().resolve()
        if options.out_dir
        else get_settings().home / "models" / options.name
    )


def clear_interrupted(engine: Engine, name: str) -> None:
    """A version row without an evaluation is what a killed fine-tune leaves; the same name starts over."""
    version = registry.get_version(engine, name)
    if version is None:
        return
    if version.metrics is not None or version.status is not ModelVersionStatus.CANDIDATE:
        raise ConfigError(f"model version {name!r} exists already; choose another --name")
    log.warning("model version %s was interrupted before its evaluation; training it again", name)
    with transaction(engine) as conn:
        conn.execute(model_version.delete().where(model_version.c.name == name))


def train_version(
    engine: Engine,
    options: FinetuneOptions,
    data: TrainingData | None = None,
    *,
    progress: Callable[[Any], None] | None = None,
    keep_backend: bool = False,
) -> Trained:
    """Train a LoRA adapter on the training part of `data` (`prepare`'s result; None: prepare here, once),
    save it and register it (status `candidate`, no metrics yet). Nothing is registered until the adapter
    is on disk."""
    from qwen_tasks.finetune.trainer import save_adapter, train
    from qwen_tasks.labelling.backends import load_backend
    from qwen_tasks.labelling.backends.adapter import adapter_digest, adapter_revision

    options = options.resolved()
    clear_interrupted(engine, options.name)
    if data is None:
        data = prepare(engine, options)
    elif data.prepared.task != options.task:
        raise ConfigError(f"prepared data is for {data.prepared.task}, not {options.task}")
    prepared, train_rows = data.prepared, data.train
    request = options.request()
    backend = load_backend(
        options.base, revision=options.base_revision, device=options.device, dtype=options.dtype
    )
    info = backend.loaded_model_info(request)
    examples, unreadable = load_examples(engine, train_rows)
    if unreadable:  # a copy: the caller's prepared counts stay what prepare found
        prepared = replace(prepared, skipped={**prepared.skipped, "unreadable": unreadable})
    if not examples:
        raise ConfigError("none of the training audio could be read (see the warnings above)")
    peft_model, result = train(
        backend, backend.prompt_text(request), examples, options.train_config(), progress=progress
    )
    target = _models_dir(options)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_adapter(peft_model, staging)
        (staging / "QWEN_TASKS_VERSION.json").write_text(
            json.dumps({"name": options.name, "task": options.task, "base": options.base}, indent=2) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)  # a killed earlier attempt of this name (no registry row points at it)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sha = adapter_digest(target)
    revision = adapter_revision(options.base_revision, sha)
    digest = data_digest(options, train_rows, info.prompt_version)
    with transaction(engine) as conn:
        registry.register(
            conn,
            {
                "name": options.name,
                "task": options.task,
                "base_model": info.model,
                "base_revision": options.base_revision,
                "adapter_path": str(target),
                "adapter_sha256": sha,
                "revision": revision,
                "prompt_version": info.prompt_version,
                "request": {**asdict(request), "methods": list(request.methods)},
                "data_digest": digest,
                "counts": {
                    "train": prepared.train,
                    "heldout": prepared.heldout,
                    "skipped": prepared.skipped,
                    "sources": prepared.sources,
                    "examples": len(examples),
                    "datasets": prepared.datasets,
                },
                "hyperparams": {
                    **options.train_config().to_dict(),
                    "max_clips": options.max_clips,
                    "heldout_fraction": options.heldout_fraction,
                    "min_clips": options.min_clips,
                    "datasets": list(options.datasets),
                    "test_datasets": list(options.test_datasets),
                    "device": info.device,
                    "dtype": info.dtype,
                },
                "loss_curve": {"step": result.losses, "epoch": result.epoch_losses},
                "train_seconds": result.seconds,
                "status": ModelVersionStatus.CANDIDATE,
            },
        )
    trained = Trained(options.name, str(target), sha, revision, prepared, result)
    if keep_backend:
        trained.backend = backend
    else:
        del backend, peft_model
        free_memory()
    return trained

"""LoRA adapters on top of a base checkpoint: identity (digest, recorded revision) and loading.

A fine-tuned version is a base model plus a peft adapter directory (`save_pretrained`). Its labels must
never be mistaken for the base model's, so a run with an adapter records the revision
`<base revision>+lora.<first 16 hex of the adapter weights' sha256>`: the planner's "no label for this
(model, revision, prompt version) yet" rule then labels everything again with a new version, and a
worker holding other adapter weights refuses the run (the digest differs). For inference the adapter is
merged into the base weights, so labelling runs exactly as fast as the base model.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from qwen_tasks.errors import ModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DIGEST_CHARS = 16


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory, checked: it must hold peft's config and weights files."""
    folder = Path(path).expanduser().resolve()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise ModelError(
                f"{folder}: not a LoRA adapter directory (no {name}; made by `qwen-tasks finetune`)"
            )
    return folder


def adapter_digest(path: str | Path) -> str:
    """sha256 of the adapter weights (the identity of a fine-tuned version)."""
    digest = hashlib.sha256()
    with (adapter_dir(path) / ADAPTER_WEIGHTS).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_revision(base_revision: str, digest: str) -> str:
    """What label_run.revision records for base + adapter."""
    tag = f"lora.{digest[:DIGEST_CHARS]}"
    return f"{base_revision}+{tag}" if base_revision else tag


def merge_adapter(model: Any, path: str | Path) -> Any:
    """Load the adapter onto `model` and fold it into the base weights (base speed at inference)."""
    from peft import PeftModel

    folder = adapter_dir(path)
    try:
        with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot apply LoRA adapter {folder}: {exc}") from exc
    return merged

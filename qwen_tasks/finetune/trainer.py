"""LoRA fine-tuning of a loaded Qwen2-Audio on (audio, answer) examples: the torch side of `finetune`.

Owns the training step and nothing else (no database, no split, no registry; `data` and `train` do those):
- a training row is the *labelling* prompt of the backend (same chat template, same prompt version)
  followed by the answer and the end-of-turn token, so the model is trained on exactly what it is asked
  when labelling; the loss covers only the answer tokens and the end token (never the prompt or padding);
- audio goes through the same `prompt_embeddings` as labelling (encoder trimmed to the longest clip);
  the encoder runs without autograd unless LoRA targets it, so it keeps no activations;
- LoRA comes from `peft` on the language model's attention + MLP projections and the audio projector
  by default (`targets`); the base weights stay frozen; gradient checkpointing and bf16 on GPU keep
  the 7B model within one 80 GB card (docs/finetune.md has the memory figures);
- rows are left-padded like labelling batches, so the answer tokens of every row are its last tokens.
"""

from __future__ import annotations

import gc
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen_tasks.errors import ConfigError, ModelError

# Module-name patterns (peft matches them against full module names with re.fullmatch).
TARGET_PATTERNS = {
    "lm": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    "projector": r"model\.multi_modal_projector\.linear",
    "audio": r"model\.audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
}
DEFAULT_TARGETS = ("lm", "projector")
MAX_TRAIN_SECONDS = 30.0  # one encoder window; longer clips would need a label per window


@dataclass(frozen=True)
class Example:
    """One training row: decoded audio (mono float32, 16 kHz) and the answer text to learn."""

    audio_id: int
    waveform: np.ndarray
    answer: str


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; stored with the model version so a candidate can be reproduced."""

    epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 8
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    weight_decay: float = 0.0
    seed: int = 0
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU (no memory pressure there)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "batch_size": self.batch_size >= 1,
            "rank": self.rank >= 1,
            "alpha": self.alpha >= 1,
            "dropout": 0.0 <= self.dropout < 1.0,
            "weight_decay": self.weight_decay >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"fine-tune option {bad[0]} out of range: {getattr(self, bad[0])!r}")
        unknown = [t for t in self.targets if t not in TARGET_PATTERNS]
        if not self.targets or unknown:
            raise ConfigError(f"targets must be a non-empty subset of {', '.join(TARGET_PATTERNS)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out


@dataclass
class TrainResult:
    """What training did: the loss after every step, the wall time and the trainable size."""

    steps: int = 0
    examples_seen: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """Handed to the progress callback after every optimiser step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    clips_per_s: float
    eta_s: float


def lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    pattern = "|".join(f"(?:{TARGET_PATTERNS[t]})" for t in config.targets)
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=pattern,
        bias="none",
    )


def end_token(backend: Any) -> str:
    """What closes an answer: `<|im_end|>` in chat style, the tokenizer's end of text otherwise."""
    return "<|im_end|>" if backend.style == "chat" else str(backend.tokenizer.eos_token)


def answer_text(backend: Any, answer: str) -> str:
    """The answer as it follows the prompt: base prompts end with 'Answer:', so a space comes first."""
    answer = answer.strip()
    return answer if backend.style == "chat" else f" {answer}"


def build_batch(backend: Any, prompt: str, examples: Sequence[Example]) -> tuple[Any, list[int]]:
    """Processor inputs for prompt+answer+end per example (left-padded), and each row's number of
    answer tokens (the last tokens of its row). Raises ModelError if the tokenizer merges the answer
    into the prompt, which would make the loss cover the wrong tokens."""
    tok = backend.tokenizer
    end = end_token(backend)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    texts, n_answer = [], []
    for ex in examples:
        full = prompt + answer_text(backend, ex.answer) + end
        ids = tok(full, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ModelError("the tokenizer merges the answer into the prompt; cannot mask the prompt")
        texts.append(full)
        n_answer.append(len(ids) - len(prompt_ids))
    inputs = backend.processor(
        text=texts,
        audio=[ex.waveform for ex in examples],
        sampling_rate=backend.sampling_rate,
        return_tensors="pt",
        padding=True,
    ).to(backend.device)
    return inputs, n_answer


def answer_loss(model: Any, inputs: Any, n_answer: Sequence[int], *, encoder_grad: bool) -> Any:
    """Mean cross-entropy over the answer tokens (and end token) of a left-padded batch.

    The LM head runs only at the positions that predict answer tokens: with a 156k vocabulary the full
    logits of a 30-s clip would cost gigabytes for nothing.
    """
    import torch

    from qwen_tasks.labelling.backends.qwen2_audio import prompt_embeddings

    embeds = prompt_embeddings(model, inputs, encoder_grad=encoder_grad)
    mask = inputs["attention_mask"]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    length = hidden.shape[1]
    rows, cols, targets = [], [], []
    ids = inputs["input_ids"]
    for i, n in enumerate(n_answer):
        for pos in range(length - n, length):  # token at `pos` is predicted from position pos - 1
            rows.append(i)
            cols.append(pos - 1)
            targets.append(ids[i, pos])
    index_r = torch.tensor(rows, device=hidden.device)
    index_c = torch.tensor(cols, device=hidden.device)
    logits = model.lm_head(hidden[index_r, index_c]).float()
    return torch.nn.functional.cross_entropy(logits, torch.stack(targets))


def attach_lora(model: Any, config: TrainConfig) -> Any:
    """Wrap `model` in a peft LoRA model (base weights frozen); seeded, so the same config gives the
    same initial adapter."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora_config(config))


def train(
    backend: Any,
    prompt: str,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    max_steps: int | None = None,
) -> tuple[Any, TrainResult]:
    """LoRA-train `backend.model` in place on `examples`; returns (peft model, result).

    peft injects the LoRA layers into `backend.model` itself, so after training the backend labels with
    the adapter applied (unmerged): that is what the in-memory evaluation compares against.
    """
    import torch

    if not examples:
        raise ConfigError("no training examples")
    long = [ex.audio_id for ex in examples if len(ex.waveform) > MAX_TRAIN_SECONDS * backend.sampling_rate]
    if long:
        raise ConfigError(
            f"{len(long)} training clip(s) are over {MAX_TRAIN_SECONDS:.0f} s (e.g. audio {long[0]})"
        )
    device = str(backend.device)
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device.startswith("cuda")
    model = backend.model
    peft_model = attach_lora(model, config)
    base = peft_model.get_base_model()
    if checkpointing:
        _checkpointing(base, True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    result = TrainResult(
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in peft_model.parameters()),
    )
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    encoder_grad = "audio" in config.targets
    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = (
        steps_per_epoch * config.epochs
        if max_steps is None
        else min(max_steps, steps_per_epoch * config.epochs)
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peft_model.train()
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            rng.shuffle(order)
            epoch_losses: list[float] = []
            for first in range(0, len(order), config.batch_size):
                if result.steps >= total:
                    break
                batch = [examples[i] for i in order[first : first + config.batch_size]]
                inputs, n_answer = build_batch(backend, prompt, batch)
                loss = answer_loss(base, inputs, n_answer, encoder_grad=encoder_grad)
                if not torch.isfinite(loss):
                    raise ModelError(f"training diverged: loss is {float(loss)} at step {result.steps + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                result.steps += 1
                result.examples_seen += len(batch)
                result.losses.append(value)
                epoch_losses.append(value)
                if progress is not None:
                    elapsed = time.perf_counter() - start
                    rate = result.examples_seen / max(elapsed, 1e-9)
                    eta = (total - result.steps) * elapsed / result.steps
                    progress(Progress(result.steps, total, epoch + 1, value, rate, eta))
            if epoch_losses:
                result.epoch_losses.append(float(np.mean(epoch_losses)))
    finally:
        peft_model.eval()
        if checkpointing:
            _checkpointing(base, False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
    result.seconds = time.perf_counter() - start
    return peft_model, result


def _checkpointing(model: Any, on: bool) -> None:
    """Activation (gradient) checkpointing of the decoder layers; transformers >= 5.2x renamed it."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def save_adapter(peft_model: Any, out_dir: Path) -> Path:
    """peft `save_pretrained`: only the adapter weights and its config (MBs, not the base model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def free_memory() -> None:
    """Give back what a finished model held (Python garbage, the CUDA cache) before the next one loads."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

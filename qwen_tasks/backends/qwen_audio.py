"""The original Qwen-Audio / Qwen-Audio-Chat through `trust_remote_code`, with its eval-script prompts.

Kept so results can be compared with the published Qwen-Audio numbers. Its model and tokenizer code
live in the hub repository, so this backend cannot be loaded offline and is NOT exercised by the test
suite here: only its prompt building is (tests/test_prompts.py). It mirrors eval_audio/evaluate_asr.py
and evaluate_aqa.py: the tokenizer reads audio from the `<audio>path</audio>` tag, left padding with
the end-of-document token, greedy decoding, output cut at the first end-of-document token and
`<|...|>` tags stripped. The waveform the pipeline decoded is written to a temporary 16 kHz WAV per
window, so both backends see exactly the same audio (and long clips are windowed the same way).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import prompts, windows
from ..errors import ModelError
from ..records import AudioClip, ClipResult, LabelRequest, ModelInfo
from .backoff import run_resilient
from .qwen2_audio import (
    NO_VARIANTS,
    YES_VARIANTS,
    _merge,
    _Unit,
    _UnitOut,
    resolve_device,
    resolve_dtype,
    resolve_model_id,
    validate_clip,
)

BACKEND_NAME = "qwen-audio"


def detect_prompt_style(model_id: str) -> prompts.PromptStyle:
    """Qwen-Audio-Chat uses ChatML; the base Qwen-Audio the eval-script task prompts."""
    return "chat" if "chat" in model_id.lower() else "base"


def describe(
    model: str,
    request: LabelRequest,
    *,
    revision: str = "",
    device: str = "auto",
    dtype: str | None = None,
    prompt_style: str = "auto",
) -> ModelInfo:
    """ModelInfo this backend records for `request`, without loading anything."""
    model_id = resolve_model_id(model)
    style = detect_prompt_style(model_id) if prompt_style == "auto" else prompt_style
    if style not in ("chat", "base"):
        raise ModelError(f"prompt_style must be auto, chat or base, got {prompt_style!r}")
    spec = prompts.qwen_audio_spec(request, style)  # type: ignore[arg-type]
    dev = resolve_device(device)
    return ModelInfo(
        model=model_id,
        revision=revision,
        dtype=resolve_dtype(dtype, dev),
        device=dev,
        prompt_version=spec.version,
        prompt_template=spec.text,
    )


class QwenAudioBackend:
    """Qwen-Audio(-Chat) via AutoModelForCausalLM / AutoTokenizer with trust_remote_code=True."""

    def __init__(
        self,
        model: str,
        *,
        revision: str = "",
        device: str = "auto",
        dtype: str | None = None,
        prompt_style: str = "auto",
        max_batch: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = resolve_model_id(model)
        self.revision = revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.style = detect_prompt_style(self.model_id) if prompt_style == "auto" else prompt_style
        if self.style not in ("chat", "base"):
            raise ModelError(f"prompt_style must be auto, chat or base, got {prompt_style!r}")
        self.max_batch = max_batch
        kwargs: dict[str, Any] = {"trust_remote_code": True}
        if revision:
            kwargs["revision"] = revision
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_id, dtype=getattr(torch, self.dtype), **kwargs
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelError(
                f"cannot load Qwen-Audio model {model!r} (needs its remote code from the hub): {exc}"
            ) from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        eod = getattr(self.tokenizer, "eod_id", None)
        if eod is None:
            raise ModelError(f"{self.model_id}: tokenizer has no eod_id; is this a Qwen-Audio checkpoint?")
        self.eod_id = int(eod)
        self.tokenizer.pad_token_id = self.eod_id
        self.stop_ids = {self.eod_id}
        im_end = getattr(self.tokenizer, "im_end_id", None)
        if self.style == "chat" and im_end is not None:
            self.stop_ids.add(int(im_end))
        self.yes_ids = self._single_token_ids(YES_VARIANTS)
        self.no_ids = self._single_token_ids(NO_VARIANTS)
        self.info = ModelInfo(self.model_id, revision, self.dtype, self.device, "", "")

    def _single_token_ids(self, variants: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for variant in variants:
            encoded = self.tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        return ids

    def describe(self, request: LabelRequest) -> ModelInfo:
        spec = prompts.qwen_audio_spec(request, self.style)  # type: ignore[arg-type]
        return ModelInfo(
            self.model_id, self.revision, self.dtype, self.device, spec.version, prompt_template=spec.text
        )

    def label(self, clips: Sequence[AudioClip], request: LabelRequest) -> list[ClipResult]:
        """Same contract as Qwen2AudioBackend.label; windows go through temporary WAV files."""
        import soundfile as sf

        if request.task == "cry" and (not self.yes_ids or not self.no_ids):
            raise ModelError(f"{self.model_id}: tokenizer has no single-token yes/no variants to score")
        spec = prompts.qwen_audio_spec(request, self.style)  # type: ignore[arg-type]
        errors: dict[int, str] = {}
        units: list[_Unit] = []
        for pos, clip in enumerate(clips):
            problem = validate_clip(clip)
            if problem:
                errors[pos] = f"{clip.path}: {problem}"
                continue
            for w in windows.plan_windows(clip.waveform, clip.sample_rate):
                units.append(_Unit(pos, w, clip.waveform[w.start : w.end]))
        with tempfile.TemporaryDirectory(prefix="qwen_audio_") as tmp:
            paths: dict[int, str] = {}
            for k, unit in enumerate(units):
                path = Path(tmp) / f"{k}.wav"
                sf.write(path, np.clip(unit.waveform, -1.0, 1.0), 16000, subtype="PCM_16")
                paths[id(unit)] = str(path)
            outs = run_resilient(
                units,
                lambda chunk: self._infer(chunk, [paths[id(u)] for u in chunk], spec, request),
                lambda unit, exc: _UnitOut(error=f"{clips[unit.clip_pos].path}: {type(exc).__name__}: {exc}"),
                max_batch=self.max_batch,
            )
        by_clip: dict[int, list[tuple[windows.Window, _UnitOut]]] = {}
        for unit, out in zip(units, outs, strict=True):
            by_clip.setdefault(unit.clip_pos, []).append((unit.window, out))
        return [
            ClipResult(audio_id=clip.audio_id, error=errors[pos])
            if pos in errors
            else _merge(clip, by_clip[pos], request)
            for pos, clip in enumerate(clips)
        ]

    def _infer(
        self, units: list[_Unit], paths: list[str], spec: prompts.PromptSpec, request: LabelRequest
    ) -> list[_UnitOut]:
        import torch

        texts = [prompts.qwen_audio_prompt(spec, p) for p in paths]
        audio_info = [self.tokenizer.process_audio(t) for t in texts]
        tokens = self.tokenizer(texts, return_tensors="pt", padding="longest", audio_info=audio_info)
        input_ids = tokens.input_ids.to(self.device)
        attention_mask = tokens.attention_mask.to(self.device)
        score_only = request.task == "cry" and tuple(request.methods) == ("score",)
        with torch.inference_mode():
            if score_only:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, audio_info=audio_info)
                return [_UnitOut(p_yes=p) for p in self._p_yes(out.logits[:, -1, :])]
            gen = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=request.max_new_tokens,
                min_new_tokens=1,
                repetition_penalty=1.0,
                use_cache=True,
                pad_token_id=self.eod_id,
                eos_token_id=sorted(self.stop_ids),
                audio_info=audio_info,
                return_dict_in_generate=True,
                output_logits=request.task == "cry",
            )
        rows = gen.sequences[:, input_ids.shape[1] :].tolist()
        texts_out = [self._decode(row) for row in rows]
        p_yes = self._p_yes(gen.logits[0]) if request.task == "cry" else [None] * len(rows)
        return [_UnitOut(text=t, p_yes=p) for t, p in zip(texts_out, p_yes, strict=True)]

    def _p_yes(self, logits: Any) -> list[float]:
        import torch

        logits = logits.float()
        return torch.sigmoid(
            torch.logsumexp(logits[:, self.yes_ids], -1) - torch.logsumexp(logits[:, self.no_ids], -1)
        ).tolist()

    def _decode(self, ids: list[int]) -> str:
        for k, token in enumerate(ids):
            if token in self.stop_ids:
                ids = ids[:k]
                break
        return prompts.strip_special_tags(self.tokenizer.decode(ids, skip_special_tokens=False))

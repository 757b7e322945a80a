"""Qwen2-Audio through transformers: batched, batch-invariant ASR and yes/no cry detection.

Why it looks like this:
- Batch invariance (Qwen-Audio #43: batching changed answers) comes from left padding with correct
  attention masks and position ids, greedy decoding and one prompt per clip; every clip's audio is
  padded to 30 s and masked by the processor, so its neighbours never leak into its result.
- `score` reads the yes/no probability mass from one forward pass over the prompt, computing the LM
  head only at the last position; `generate` keeps the raw answer and, when cry detection asks for
  both, takes p_yes from the first generated step's logits of the same call (one pass, not two).
- Clips over 30 s are split into windows (see windows.py); all windows of a batch go through the model
  together and are merged back per clip.
- A bad clip (empty, NaN, wrong rate) or a failure that survives back-off becomes that clip's error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling import prompts
from qwen_tasks.labelling.backends.adapter import adapter_digest, adapter_dir, adapter_revision, merge_adapter
from qwen_tasks.labelling.backends.backoff import run_resilient
from qwen_tasks.labelling.backends.common import (
    NO_VARIANTS,
    YES_VARIANTS,
    LogMel,
    TokenLogprobs,
    Unit,
    UnitOut,
    assemble,
    choose_style,
    cut_at_budget,
    decode,
    p_yes,
    plan_units,
    resolve_device,
    resolve_dtype,
    resolve_model_id,
    single_token_ids,
    unit_budget,
)
from qwen_tasks.records import TARGET_SAMPLE_RATE, AudioClip, ClipResult, LabelRequest, ModelInfo

log = logging.getLogger(__name__)

BACKEND_NAME = "qwen2-audio"
MIN_LENGTH_RATIO = 0.75  # score: padding to the longest clip of a group wastes at most 25 % of its audio
MIN_GROUP = 4
FEATURES = ("torch", "processor")
DECODE_MODES = ("off", "static", "compile")


def decode_mode_from_env() -> str:
    """`QWEN_TASKS_COMPILE_DECODE`: off (default) | static (static KV cache) | compile (static KV cache and
    torch.compile of the decode step; on CUDA transformers then captures it with CUDA graphs)."""
    value = os.environ.get("QWEN_TASKS_COMPILE_DECODE", "").strip().lower() or "off"
    aliases = {"0": "off", "false": "off", "no": "off", "1": "compile", "true": "compile", "yes": "compile"}
    value = aliases.get(value, value)
    if value not in DECODE_MODES:
        raise ModelError(f"QWEN_TASKS_COMPILE_DECODE must be one of {', '.join(DECODE_MODES)}, got {value!r}")
    return value


@dataclass
class Prepared:
    """A batch made ready for the model (`Qwen2AudioBackend.prepare`): validated units in model order,
    their sub-batches and each sub-batch's model inputs, features included, already on the device."""

    clips: Sequence[AudioClip]
    request: LabelRequest
    prompt: str
    errors: dict[int, str]
    ordered: list[Unit]
    groups: list[list[Unit]]
    inputs: dict[tuple[int, ...], Any] = field(default_factory=dict)  # by the ids of a chunk's units


_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def detect_prompt_style(model_id: str) -> prompts.PromptStyle:
    """Instruct (chat template) vs base model, decided without loading weights.

    A local checkpoint is a chat model when it ships a chat template; a hub id when its name says
    Instruct/Chat (Qwen/Qwen2-Audio-7B-Instruct vs Qwen/Qwen2-Audio-7B).
    """
    path = Path(model_id)
    if path.is_dir():
        if any((path / name).is_file() for name in _TEMPLATE_FILES):
            return "chat"
        for name in ("processor_config.json", "tokenizer_config.json"):
            file = path / name
            if file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("chat_template"):
                return "chat"
        return "base"
    lowered = model_id.lower()
    return "chat" if ("instruct" in lowered or "chat" in lowered) else "base"


def prompt_template(spec: prompts.PromptSpec, style: prompts.PromptStyle) -> str:
    """What is recorded as the prompt template: the chat messages (rendered by the model's own
    template) or the raw base-model prompt, with the audio as a placeholder."""
    if style == "chat":
        return "chat:" + json.dumps(prompts.qwen2_audio_messages(spec), ensure_ascii=False)
    return prompts.qwen2_audio_base_prompt(spec)


def planned_model_info(
    model: str,
    request: LabelRequest,
    *,
    revision: str = "",
    device: str = "auto",
    dtype: str | None = None,
    prompt_style: str = "auto",
    adapter: str | None = None,
) -> ModelInfo:
    """ModelInfo a Qwen2-Audio backend would record for `request`, without loading any weights.

    Planning (CLI or Airflow) needs the (model, revision, prompt version) key before a worker loads the
    model; the loaded backend's `loaded_model_info(request)` returns exactly the same object.
    """
    model_id = resolve_model_id(model)
    style = choose_style(prompt_style, lambda: detect_prompt_style(model_id))
    spec = prompts.qwen2_audio_spec(request, style)
    dev = resolve_device(device)
    return ModelInfo(
        model=model_id,
        revision=adapter_revision(revision, adapter_digest(adapter)) if adapter else revision,
        dtype=resolve_dtype(dtype, dev),
        device=dev,
        prompt_version=spec.version,
        prompt_template=prompt_template(spec, style),
    )


def load_failure(model: str, model_id: str, exc: BaseException) -> ModelError:
    """One line saying why a checkpoint did not load, naming the broken file where one can be found.

    safetensors' own errors do not say which file ("Error while deserializing header: incomplete
    metadata, file not fully covered"), so for a local checkpoint each weight file is opened again, on
    its own, to find the truncated or corrupt one.
    """
    from safetensors import SafetensorError

    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, SafetensorError):
        broken = _broken_weight_file(Path(model_id))
        if broken is not None:
            path, reason = broken
            return ModelError(
                f"cannot load Qwen2-Audio model {model!r}: {path}: corrupt or truncated weights ({reason})"
            )
        return ModelError(f"cannot load Qwen2-Audio model {model!r}: corrupt or truncated weights ({detail})")
    return ModelError(f"cannot load Qwen2-Audio model {model!r}: {detail}")


def _broken_weight_file(folder: Path) -> tuple[Path, str] | None:
    """The first *.safetensors file in `folder` that safetensors cannot open, with its reason."""
    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return path, " ".join(str(exc).split())
    return None


class Qwen2AudioBackend:
    """Qwen2AudioForConditionalGeneration + AutoProcessor, loaded once; `label` is called per batch."""

    def __init__(
        self,
        model: str,
        *,
        revision: str = "",
        device: str = "auto",
        dtype: str | None = None,
        prompt_style: str = "auto",
        max_batch: int | None = None,
        trim_audio: bool = True,
        adapter: str | None = None,
        features: str = "torch",
        decode: str | None = None,
    ) -> None:
        import torch
        from safetensors import SafetensorError
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the label command shows its own progress

        self.model_id = resolve_model_id(model)
        self.base_revision = revision
        self.adapter = str(adapter_dir(adapter)) if adapter else None
        self.revision = adapter_revision(revision, adapter_digest(self.adapter)) if self.adapter else revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.style = choose_style(prompt_style, lambda: detect_prompt_style(self.model_id))
        self.max_batch = max_batch
        self.trim_audio = trim_audio
        if features not in FEATURES:
            raise ModelError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
        self.features = features  # "processor": the processor's 30-s CPU path (kept for comparisons)
        self.decode_mode = decode_mode_from_env() if decode is None else decode
        if self.decode_mode not in DECODE_MODES:
            raise ModelError(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}")
        self.model_seconds = 0.0  # wall time spent in model calls (bench: how busy the model was)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        # on a GPU, load the weights straight onto it (a 7B model need not fit in host memory first)
        placement: dict[str, Any] = {"device_map": self.device} if self.device.startswith("cuda") else {}
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
            self.model = Qwen2AudioForConditionalGeneration.from_pretrained(
                self.model_id, dtype=getattr(torch, self.dtype), **kwargs, **placement
            )
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            raise load_failure(model, self.model_id, exc) from exc
        if self.adapter:
            self.model = merge_adapter(self.model, self.adapter)
        self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation needs the prompt to end at the same column
        self._check_audio_token()
        if self.tokenizer.pad_token_id is None:
            raise ModelError(f"{self.model_id}: tokenizer has no pad token; batched inference needs one")
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = self._eos_ids()
        self.yes_ids = single_token_ids(self.tokenizer, YES_VARIANTS)
        self.no_ids = single_token_ids(self.tokenizer, NO_VARIANTS)
        self.log_mel = LogMel.from_feature_extractor(self.processor.feature_extractor)
        self.audio_token = getattr(self.processor, "audio_token", "<|AUDIO|>")
        self._stream = torch.cuda.Stream(device=self.device) if self.device.startswith("cuda") else None
        self.sampling_rate = int(self.processor.feature_extractor.sampling_rate)
        if self.sampling_rate != TARGET_SAMPLE_RATE:
            raise ModelError(
                f"{self.model_id}: feature extractor expects {self.sampling_rate} Hz, not 16 kHz"
            )
        self.info = ModelInfo(
            model=self.model_id,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            prompt_version="",
            prompt_template="",
        )

    # ----- loading checks -------------------------------------------------------------------------
    def _check_audio_token(self) -> None:
        """transformers only warns and takes a legacy path when these disagree; we refuse instead."""
        token = getattr(self.processor, "audio_token", "<|AUDIO|>")
        vocab = self.tokenizer.get_vocab()
        if token not in vocab:
            raise ModelError(f"{self.model_id}: tokenizer has no {token} token")
        tok_id = vocab[token]
        cfg_id = getattr(self.model.config, "audio_token_id", None)
        if cfg_id is None:
            cfg_id = getattr(self.model.config, "audio_token_index", None)
        if cfg_id != tok_id:
            raise ModelError(
                f"{self.model_id}: config audio_token_id {cfg_id} != tokenizer id of {token} ({tok_id}); "
                "the checkpoint's model and tokenizer do not belong together"
            )

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.append(configured)
        elif configured:
            ids.extend(int(i) for i in configured)
        vocab = self.tokenizer.get_vocab()
        for token in ("<|im_end|>", "<|endoftext|>"):
            if token in vocab and vocab[token] not in ids:
                ids.append(vocab[token])
        if not ids:
            raise ModelError(f"{self.model_id}: no end-of-sequence token known")
        return ids

    # ----- prompts ---------------------------------------------------------------------------------
    def loaded_model_info(self, request: LabelRequest) -> ModelInfo:
        """ModelInfo for this request (prompt version and template filled in); the same object as
        `planned_model_info()` gives for this model before loading it."""
        spec = prompts.qwen2_audio_spec(request, self.style)
        return ModelInfo(
            model=self.model_id,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            prompt_version=spec.version,
            prompt_template=prompt_template(spec, self.style),
        )

    def prompt_text(self, request: LabelRequest) -> str:
        """The full text prompt for one clip, audio placeholder included (rendered once per batch)."""
        spec = prompts.qwen2_audio_spec(request, self.style)
        if self.style == "chat":
            return self.processor.apply_chat_template(
                prompts.qwen2_audio_messages(spec), add_generation_prompt=True, tokenize=False
            )
        return prompts.qwen2_audio_base_prompt(spec)

    # ----- labelling -------------------------------------------------------------------------------
    def label(self, clips: Sequence[AudioClip], request: LabelRequest) -> list[ClipResult]:
        """One ClipResult per clip, in order; see Backend.label. Never raises for a bad clip."""
        return self.label_prepared(self.prepare(clips, request))

    def prepare(self, clips: Sequence[AudioClip], request: LabelRequest) -> Prepared:
        """Everything before the model: validation, windows, sub-batches, prompts and log-mel features
        (on the model's device). A worker runs this for the next batch while the model runs this one."""
        if request.task == "cry" and (not self.yes_ids or not self.no_ids):
            raise ModelError(f"{self.model_id}: tokenizer has no single-token yes/no variants to score")
        prompt = self.prompt_text(request)
        errors, units = plan_units(clips)
        # Longest first: padding stays small inside a sub-batch and an OOM shows up on the first one.
        ordered = sorted(units, key=lambda u: -len(u.waveform))
        score_only = request.task == "cry" and tuple(request.methods) == ("score",)
        groups = length_groups(ordered) if score_only else [ordered]
        prepared = Prepared(clips, request, prompt, errors, ordered, groups)
        if self.features == "torch" and self.log_mel is not None:
            for (
                group
            ) in groups:  # the chunks run_resilient starts with; after a back-off, _infer makes its own
                size = max(1, min(self.max_batch or len(group), len(group)))
                for i in range(0, len(group), size):
                    chunk = group[i : i + size]
                    try:
                        prepared.inputs[_key(chunk)] = self._inputs(chunk, prompt)
                    except Exception as exc:  # noqa: BLE001 - made again inside run_resilient, per clip
                        log.warning("features of %d windows: %s: %s", len(chunk), type(exc).__name__, exc)
        return prepared

    def label_prepared(self, prepared: Prepared) -> list[ClipResult]:
        """The model part of `label` for a batch made ready by `prepare`."""
        clips, request = prepared.clips, prepared.request
        outs: list[UnitOut] = []
        for group in prepared.groups:
            outs.extend(
                run_resilient(
                    group,
                    lambda chunk: self._infer(
                        chunk, prepared.prompt, request, prepared.inputs.get(_key(chunk))
                    ),
                    lambda unit, exc: UnitOut(
                        error=f"{clips[unit.clip_pos].path}: {type(exc).__name__}: {exc}"
                    ),
                    max_batch=self.max_batch,
                    after_oom=self._empty_cache,
                )
            )
        return assemble(clips, prepared.errors, prepared.ordered, outs, request)

    def _empty_cache(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _infer(
        self, units: list[Unit], prompt: str, request: LabelRequest, inputs: Any | None = None
    ) -> list[UnitOut]:
        import torch

        if inputs is None:
            inputs = self._inputs(units, prompt)
        score_only = request.task == "cry" and tuple(request.methods) == ("score",)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                embeds = self._embed_trimmed(inputs) if self.trim_audio else None
                if score_only:
                    return [UnitOut(p_yes=p) for p in self._score(inputs, embeds)]
                return self._generate(inputs, embeds, request, [unit_budget(u, request) for u in units])
        finally:
            self.model_seconds += time.perf_counter() - start

    def _inputs(self, units: list[Unit], prompt: str) -> Any:
        """Model inputs of one sub-batch: token ids, masks and log-mel features, on the model's device.

        With features="torch" (default) the log-mel is computed by `LogMel` on the device, batched, over
        the frames the encoder reads (all 3000 for the stock pass, trim_audio=False), and the prompt's
        audio placeholder is expanded as the processor does; "processor" is the stock path (CPU, 30 s).
        """
        import torch

        waves = [u.waveform for u in units]
        if self.features != "torch" or self.log_mel is None:
            return self.processor(
                text=[prompt] * len(units), audio=waves, sampling_rate=self.sampling_rate,
                return_tensors="pt", padding=True,
            ).to(self.device)  # fmt: skip
        lengths = [self.log_mel.clip_frames(len(w)) for w in waves]
        frames = self.log_mel.trimmed_frames(lengths) if self.trim_audio else None
        texts = [prompt.replace(self.audio_token, self.audio_token * audio_tokens(n), 1) for n in lengths]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            features, mask = self.log_mel(waves, self.device, frames)
            out = {
                "input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device),
                "input_features": features,
                "feature_attention_mask": mask,
            }
        if stream is not None:  # made on a side stream (a worker's prefetch thread): ready before use
            stream.synchronize()
        return out

    def _embed_trimmed(self, inputs: Any) -> Any:
        """Prompt embeddings with the audio encoder run only up to the batch's longest clip (see
        `prompt_embeddings`)."""
        return prompt_embeddings(self.model, inputs)

    def _score(self, inputs: Any, embeds: Any | None) -> list[float]:
        """One forward pass; the LM head is applied to the last position only (cheap for a big vocab)."""
        mask = inputs["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if embeds is None:
            hidden = self.model.model(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            hidden = self.model.model.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1, :])
        return p_yes(logits, self.yes_ids, self.no_ids)

    def _decode_options(self) -> dict[str, Any]:
        """GenerationConfig keys of the decode mode (QWEN_TASKS_COMPILE_DECODE, off by default): "static"
        preallocates the KV cache (fixed shapes), "compile" also compiles the decode step with
        torch.compile on any device (on CUDA in "reduce-overhead" mode: CUDA graphs). Greedy output is the
        same as "off" (tests/labelling/test_features.py); whether it is faster was not measured."""
        if self.decode_mode == "off":
            return {}
        if self.decode_mode == "static":
            return {"cache_implementation": "static", "disable_compile": True}
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return {"cache_implementation": "static", "compile_config": compile_config}

    def _generate(
        self, inputs: Any, embeds: Any | None, request: LabelRequest, budgets: list[int]
    ) -> list[UnitOut]:
        """Greedy decoding to the batch's largest budget, each row then cut at its own (`cut_at_budget`)."""
        from transformers import GenerationConfig, LogitsProcessorList

        want_p = request.task == "cry"
        config = GenerationConfig(
            max_new_tokens=max(budgets),
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=want_p,
            **self._decode_options(),
        )
        logprobs = TokenLogprobs()  # ASR: the transcript's confidence, stored as transcription.mean_logprob
        processors = LogitsProcessorList([logprobs] if not want_p else [])
        if embeds is None:
            out = self.model.generate(**inputs, generation_config=config, logits_processor=processors)
        else:  # prompt ids for bookkeeping, embeddings (with the trimmed audio) for the prefill
            out = self.model.generate(
                input_ids=inputs["input_ids"],
                inputs_embeds=embeds,
                attention_mask=inputs["attention_mask"],
                generation_config=config,
                logits_processor=processors,
            )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        rows = cut_at_budget(new_tokens, budgets, self.eos_ids)
        # special tokens are skipped by the tokenizer itself; the answer is trimmed
        texts = [decode(self.tokenizer, row, self.eos_ids) for row, _ in rows]
        scores = p_yes(out.logits[0], self.yes_ids, self.no_ids) if want_p else [None] * len(texts)
        token_logprobs = logprobs.rows(rows, self.eos_ids) if not want_p else [None] * len(texts)
        return [
            UnitOut(text=t, p_yes=p, truncated=cut, token_logprobs=lp)
            for t, p, (_, cut), lp in zip(texts, scores, rows, token_logprobs, strict=True)
        ]


def audio_tokens(frames: int) -> int:
    """Audio tokens of a clip of `frames` mel frames (the processor's count: two stride-2 stages)."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


def _key(units: Sequence[Unit]) -> tuple[int, ...]:
    return tuple(id(u) for u in units)


def _nullcontext() -> Any:
    import contextlib

    return contextlib.nullcontext()


def prompt_embeddings(model: Any, inputs: Any, *, encoder_grad: bool = True) -> Any:
    """Input embeddings of a processed batch, the audio features merged in at the `<|AUDIO|>` slots,
    with the audio encoder run only up to the batch's longest clip.

    The stock forward always encodes 30 s (3000 mel frames) per clip, most of it masked padding for
    short clips. Here the same layers run over the first `frames` frames (the longest clip plus 2
    frames, so the convolutions at each clip's end see the same neighbours) with the position table cut
    to match; frames past a clip's end are masked exactly as in the stock pass. Measured: identical
    transcripts, p_yes within ~5e-7 of the 30 s pass (tests/labelling/test_backends.py). Labelling and
    fine-tuning both embed through here, so a model is trained on exactly what it sees when labelling.
    `encoder_grad=False` runs the (frozen) encoder without autograd: training then keeps no encoder
    activations, which is most of the memory a 30-s clip costs outside the language model.
    """
    import torch
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    mask = inputs["feature_attention_mask"]
    frames = min(int(mask.sum(-1).max()) + 2, mask.shape[-1])
    frames += frames % 2
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        x = inputs["input_features"][..., :frames].to(dtype=tower.conv1.weight.dtype)
        x = torch.nn.functional.gelu(tower.conv1(x))
        x = torch.nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
        x = x + tower.embed_positions.weight[: x.shape[1]]
        feat_len, out_len = tower._get_feat_extract_output_lengths(mask.sum(-1))
        keep = (torch.arange(x.shape[1], device=x.device)[None, :] < feat_len[:, None]).long()
        attn = create_bidirectional_mask(config=tower.config, inputs_embeds=x[..., :1], attention_mask=keep)
        for layer in tower.layers:
            x = layer(x, attn)
        x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        x = tower.layer_norm(x)
    audio = model.model.multi_modal_projector(x)
    valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < out_len[:, None]
    ids = inputs["input_ids"]
    slots = ids == model.config.audio_token_id
    if int(slots.sum()) != int(valid.sum()):
        raise ModelError(f"{int(slots.sum())} audio tokens in the prompt but {int(valid.sum())} audio frames")
    embeds = model.get_input_embeddings()(ids)
    return embeds.masked_scatter(slots.unsqueeze(-1), audio[valid].to(embeds.dtype))


def length_groups(
    units: list[Unit], *, min_ratio: float = MIN_LENGTH_RATIO, min_size: int = MIN_GROUP
) -> list[list[Unit]]:
    """Split units (sorted longest first) so each group's shortest is >= `min_ratio` x its longest.

    Used for `score`, which is one prefill: every padded audio token is wasted compute, and without
    a decoding phase there is nothing that a bigger batch amortises. Groups keep at least `min_size`
    units so accelerators still see a batch. Results are batch-invariant, so grouping changes speed only.
    """
    groups: list[list[Unit]] = []
    for unit in units:
        current = groups[-1] if groups else None
        if current is not None and (
            len(current) < min_size or len(unit.waveform) >= min_ratio * len(current[0].waveform)
        ):
            current.append(unit)
        else:
            groups.append([unit])
    return groups

"""The original Qwen-Audio / Qwen-Audio-Chat (`trust_remote_code`), with its eval-script prompts.

Kept so results can be compared with the published Qwen-Audio numbers. Its model and tokenizer code live
in the checkpoint (hub repo or local copy) and only load under **transformers 4.x** (verified from
4.37.2 to 4.53.3, TRANSFORMERS_SPEC): transformers 5 removed `DisjunctiveConstraint` (imported by
`transformers_stream_generator`, which the remote code requires) and `PreTrainedModel.get_head_mask`
(called in its forward pass). So it runs in a second pinned environment, `.venv-qwen-audio`
(`make install-qwen-audio`, `requirements-qwen-audio.lock`); `qwen_tasks.labelling.environments` says which
interpreter that is (`interpreter()`, `QWEN_TASKS_QWEN_AUDIO_PYTHON`) and this module refuses, before any
weights load, to run where it cannot (`check_environment`, raising `WrongEnvironment` with the worker
command to use).

What the backend does beyond calling the remote code, and why:
- Non-Python assets: the remote `audio.py` loads `mel_filters.npz` from its own folder in the
  transformers modules cache, where transformers copies only `.py` files. The file is copied there from
  the checkpoint (or the hub) when missing, before any audio is processed.
- Features in torch, batched, on the model's device (features="torch", the default). The remote
  tokenizer's own path (`process_audio`, kept as features="remote" for comparisons) reads each clip from
  the file named in its `<audio>path</audio>` tag with the ffmpeg CLI, pads it to 30 s and computes
  Whisper's log-mel one clip at a time on the CPU. Here the decoded windows go straight to
  `common.LogMel` (built from the remote `audio.py`'s own constants and filterbank), for the whole
  sub-batch at once and only over the frames the encoder reads; `audio_lengths` gives each window's
  encoder length and `<audio>` span as `process_audio` does, so the token ids are the same, and the
  samples are first rounded to 16-bit PCM (`pcm16`), as Qwen-Audio's front end always sees them. No
  temporary WAV file and no ffmpeg per clip (ffmpeg is needed only for features="remote").
- Prompts: those of eval_audio/evaluate_asr.py and evaluate_aqa.py (`prompts.qwen_audio_spec`); both
  backends see the same windows; left padding with the end-of-document token, greedy decoding, output
  cut at the first stop token, `<|...|>` tags stripped.
- Batch invariance (Qwen-Audio #43: answers changed with the batch size). The text side is invariant:
  left padding is masked and the rotary embeddings depend only on relative positions. The audio encoder
  is not: it cuts the batch's mel features to the longest clip, so the convolution at a shorter clip's
  last frame reads a real mel frame of the clip's 30 s padding where, alone, it reads the convolution's
  zero padding. Zeroing each clip's mel frames past the ones its encoder uses (`_zero_past_length`;
  `audio_info` does the same for the torch features) gives a clip the same encoder input in a batch as
  alone; batch 1 is unchanged. Measured on the tiny checkpoint, batch 8 vs 1: p_yes differences ~1e-6
  without it, <= 6e-8 with it.
- The LM head runs on the last position only, in `score` (one forward pass) and in `generate`'s prefill
  (`_lm_head_on_last_position`): the remote forward computes it at every prompt position otherwise,
  gigabytes of logits for a batch of 30 s windows with a 155k vocabulary, of which only the last is read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen_tasks.errors import ModelError, QwenTasksError, WrongEnvironment
from qwen_tasks.labelling import prompts
from qwen_tasks.labelling.allowed_models import trust_remote_code
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
from qwen_tasks.labelling.environments import (
    TRANSFORMERS_SPEC,
    how_to_create,
    interpreter,
    runs_here,
    shown,
    transformers_version,
    worker_command,
)
from qwen_tasks.records import TARGET_SAMPLE_RATE, AudioClip, ClipResult, LabelRequest, ModelInfo

BACKEND_NAME = "qwen-audio"

# Files the remote code reads from its own folder that transformers does not copy there.
ASSETS = ("mel_filters.npz",)
# torch: `LogMel` on the model's device, batched, over the frames the encoder reads (default);
# remote: the remote tokenizer's `process_audio` (ffmpeg per clip, 30 s, CPU), kept for comparisons.
FEATURES = ("torch", "remote")
FFMPEG_HINT = (
    "install it (Debian/Ubuntu: apt-get install ffmpeg; macOS: brew install ffmpeg; conda: "
    "conda install -c conda-forge ffmpeg) or put it on PATH"
)


# --- which interpreter (qwen_tasks.labelling.environments) ----------------------------------------


def check_environment(model: str, *, run_id: int | None = None) -> None:
    """Raise WrongEnvironment (before anything heavy is imported) when this interpreter cannot run the
    Qwen-Audio remote code; the message names the worker command to use instead, in one line."""
    if runs_here():
        return
    python = interpreter()
    command = worker_command(run_id if run_id is not None else "ID", python)
    where = f"run `{shown(command)}`"
    if not python.exists():
        where = f"{how_to_create(python)}, then {where}"
    raise WrongEnvironment(
        f"{model} is an original Qwen-Audio model (trust_remote_code), which needs transformers "
        f"{TRANSFORMERS_SPEC}; "
        f"this interpreter ({sys.executable}) has transformers {transformers_version()}: {where}",
        python=str(python),
        command=command,
    )


# --- planning ---------------------------------------------------------------------------------------


def detect_prompt_style(model_id: str) -> prompts.PromptStyle:
    """Qwen-Audio-Chat uses ChatML; the base Qwen-Audio the eval-script task prompts. A local checkpoint
    is a chat model when its generation config says chat_format "chatml" (as the hub's does)."""
    path = Path(model_id)
    config = path / "generation_config.json"
    if config.is_file():
        import json

        try:
            fmt = json.loads(config.read_text(encoding="utf-8")).get("chat_format")
        except json.JSONDecodeError as exc:
            raise ModelError(f"{config}: not valid JSON ({exc})") from None
        if fmt in ("chatml", "raw"):
            return "chat" if fmt == "chatml" else "base"
    return "chat" if "chat" in model_id.lower() else "base"


def check_folder_name(model_id: str) -> None:
    """transformers imports a local checkpoint's remote code as `transformers_modules.<folder name>`, so a
    '.' in that name fails with ModuleNotFoundError on load: say so when planning, before any worker."""
    path = Path(model_id)
    if path.is_dir() and "." in path.name:
        raise ModelError(
            f"{model_id}: transformers imports this checkpoint's code as module "
            f"transformers_modules.{path.name}, which the '.' breaks; rename the folder (or link it under "
            "a name without '.')"
        )


def planned_model_info(
    model: str,
    request: LabelRequest,
    *,
    revision: str = "",
    device: str = "auto",
    dtype: str | None = None,
    prompt_style: str = "auto",
) -> ModelInfo:
    """ModelInfo this backend records for `request`, without loading anything (works in any environment:
    planning happens wherever `qwen-tasks label` or the DAG runs)."""
    model_id = resolve_model_id(model)
    check_folder_name(model_id)
    spec = prompts.qwen_audio_spec(request, choose_style(prompt_style, lambda: detect_prompt_style(model_id)))
    dev = resolve_device(device)
    return ModelInfo(
        model=model_id,
        revision=revision,
        dtype=resolve_dtype(dtype, dev),
        device=dev,
        prompt_version=spec.version,
        prompt_template=spec.text,
    )


# --- loading ----------------------------------------------------------------------------------------


def check_ffmpeg() -> str:
    """Path of the ffmpeg CLI the remote tokenizer runs to read audio; ModelError saying how to get it."""
    found = shutil.which("ffmpeg")
    if found is None:
        raise ModelError(
            f"ffmpeg not found on PATH (Qwen-Audio's tokenizer reads audio with it): {FFMPEG_HINT}"
        )
    return found


def install_assets(code_dir: Path, model_id: str, revision: str = "") -> list[Path]:
    """Copy ASSETS next to the remote code in `code_dir` when missing there; returns what was copied.

    Taken from the local checkpoint, else downloaded from the hub repo at `revision`.
    """
    copied: list[Path] = []
    for name in ASSETS:
        target = code_dir / name
        if target.is_file():
            continue
        local = Path(model_id) / name
        if local.is_file():
            source = local
        else:
            try:
                from huggingface_hub import hf_hub_download

                source = Path(hf_hub_download(model_id, name, revision=revision or None))
            except Exception as exc:  # noqa: BLE001 - any hub failure is one message
                raise ModelError(
                    f"{model_id}: {name} is missing next to its code ({code_dir}) and could not be "
                    f"fetched: {type(exc).__name__}: {exc}"
                ) from None
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)  # atomic: concurrent workers never see half a file
        copied.append(target)
    return copied


def pcm16(wave: np.ndarray) -> np.ndarray:
    """`wave` on the 16-bit grid Qwen-Audio's front end always reads: its `load_audio` has ffmpeg decode
    every file to s16le and divides by 32768. Rounded as ffmpeg converts float samples to s16
    (lrintf(x * 32768), clipped); float32, so x * 32768 is exact."""
    scaled = np.rint(np.asarray(wave, dtype=np.float32) * np.float32(32768.0))
    return (np.clip(scaled, -32768.0, 32767.0) / np.float32(32768.0)).astype(np.float32)


def audio_lengths(n_samples: int, audio: Any) -> tuple[int, int]:
    """(encoder length T, audio tokens) of a window of `n_samples`, as the remote tokenizer's
    `process_audio` computes them: at most 30 s, floor(L / hop) mel frames, T = the remote
    `get_T_after_cnn` of those, (T - 2) // 2 + 1 tokens after the encoder's pooling. Its `<audio>` span in
    the prompt is tokens + 2 (bos, eos); the encoder reads 2 * T mel frames. `audio` is the remote
    `audio.py` module."""
    mel_frames = min(n_samples, int(audio.N_SAMPLES)) // int(audio.HOP_LENGTH)
    encoder_length = int(audio.get_T_after_cnn(mel_frames))
    return encoder_length, (encoder_length - 2) // 2 + 1


def _zero_past_length(audio_info: list[dict[str, Any]]) -> None:
    """Zero each clip's mel frames past the 2*T its encoder reads (T = frames after the convolutions).

    The encoder trims the batch to the longest clip's 2*T frames; a shorter clip's last convolution then
    reads its frame 2*T, which, alone, is the convolution's zero padding. Alone, frames >= 2*T are
    trimmed away, so zeroing them changes nothing at batch 1.
    """
    for info in audio_info:
        mel = info["input_audios"]
        for row, length in enumerate(info["input_audio_lengths"][:, 0].tolist()):
            mel[row, :, 2 * int(length) :] = 0


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
        features: str = "torch",
    ) -> None:
        if features not in FEATURES:
            raise ModelError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
        # The checkpoint's own Python runs below: only for a model inside QWEN_TASKS_ALLOWED_MODELS when
        # that is set (ConfigError before anything is imported), for any model when it is not.
        remote_code = trust_remote_code(model)
        check_environment(model)
        if features == "remote":
            check_ffmpeg()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = resolve_model_id(model)
        check_folder_name(self.model_id)
        self.revision = revision
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.style = choose_style(prompt_style, lambda: detect_prompt_style(self.model_id))
        self.max_batch = max_batch
        kwargs: dict[str, Any] = {"trust_remote_code": remote_code}
        if revision:
            kwargs["revision"] = revision
        # The remote code picks its own precision from config flags (bf16 when the GPU has it); set
        # them so the dtype asked for is the dtype used and recorded.
        precision = {"bf16": self.dtype == "bfloat16", "fp16": self.dtype == "float16",
                     "fp32": self.dtype == "float32"}  # fmt: skip
        try:
            # The remote code prints progress to stdout; keep stdout for `--json` output.
            with contextlib.redirect_stdout(sys.stderr):
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_id, **kwargs)
                install_assets(Path(sys.modules[type(self.tokenizer).__module__].__file__).parent,
                               self.model_id, revision)  # fmt: skip
                # the remote audio front end (Whisper's audio.py), which tokenization_qwen imports
                package = type(self.tokenizer).__module__.rpartition(".")[0]
                self.audio = importlib.import_module(f"{package}.audio")
                self.log_mel = LogMel.from_whisper_audio(self.audio)
                self.model = AutoModelForCausalLM.from_pretrained(
                    self.model_id, torch_dtype=getattr(torch, self.dtype), **precision, **kwargs
                )
        except QwenTasksError:
            raise
        except Exception as exc:  # remote code fails in its own ways; each becomes one line
            raise ModelError(
                f"cannot load Qwen-Audio model {model!r} (transformers {transformers_version()}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.model.to(self.device).eval()
        # without the constants LogMel needs (another front end), the remote code's own path is used
        self.features = features if self.log_mel is not None else "remote"
        if self.features == "remote" and features != "remote":
            check_ffmpeg()
        loaded = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        if loaded != self.dtype:
            raise ModelError(f"{self.model_id}: asked for {self.dtype}, the remote code loaded {loaded}")
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
        # Ids that are not text: the audio span markers (decoding them needs the prompt's audio_info)
        # and any id past the tokenizer's vocabulary (the embedding matrix is padded beyond it).
        self.n_vocab = len(self.tokenizer)
        markers = [getattr(self.tokenizer, f"audio_{n}_id", None) for n in ("start", "end", "pad")]
        self.skip_ids = {int(i) for i in markers if i is not None}
        self.yes_ids = single_token_ids(self.tokenizer, YES_VARIANTS)
        self.no_ids = single_token_ids(self.tokenizer, NO_VARIANTS)
        self.info = ModelInfo(self.model_id, revision, self.dtype, self.device, "", "")

    def loaded_model_info(self, request: LabelRequest) -> ModelInfo:
        """ModelInfo for this request (prompt version and template filled in); the same object as
        `planned_model_info()` gives for this model before loading it."""
        spec = prompts.qwen_audio_spec(request, self.style)
        return ModelInfo(
            self.model_id, self.revision, self.dtype, self.device, spec.version, prompt_template=spec.text
        )

    # --- labelling ----------------------------------------------------------------------------------

    def label(self, clips: Sequence[AudioClip], request: LabelRequest) -> list[ClipResult]:
        """Same contract as Qwen2AudioBackend.label."""
        if request.task == "cry" and (not self.yes_ids or not self.no_ids):
            raise ModelError(f"{self.model_id}: tokenizer has no single-token yes/no variants to score")
        spec = prompts.qwen_audio_spec(request, self.style)
        errors, units = plan_units(clips)
        with self._audio_paths(units) as paths:
            outs = run_resilient(
                units,
                lambda chunk: self._infer(chunk, [paths[id(u)] for u in chunk], spec, request),
                lambda unit, exc: UnitOut(error=f"{clips[unit.clip_pos].path}: {type(exc).__name__}: {exc}"),
                max_batch=self.max_batch,
            )
        return assemble(clips, errors, units, outs, request)

    @contextlib.contextmanager
    def _audio_paths(self, units: Sequence[Unit]) -> Iterator[dict[int, str]]:
        """The path in each window's `<audio>path</audio>` tag (by id of its unit). The remote path
        (features="remote") reads the window from it, so it is written to a temporary 16 kHz 16-bit WAV;
        with torch features the tokenizer only replaces the tag by the window's span, so a name will do."""
        import soundfile as sf

        if self.features != "remote":
            yield {id(unit): f"{k}.wav" for k, unit in enumerate(units)}
            return
        with tempfile.TemporaryDirectory(prefix="qwen_audio_") as tmp:
            paths: dict[int, str] = {}
            for k, unit in enumerate(units):
                path = Path(tmp) / f"{k}.wav"
                sf.write(path, np.clip(unit.waveform, -1.0, 1.0), TARGET_SAMPLE_RATE, subtype="PCM_16")
                paths[id(unit)] = str(path)
            yield paths

    def audio_info(self, waves: Sequence[np.ndarray], paths: Sequence[str]) -> dict[str, Any]:
        """The model's `audio_info` for a sub-batch of windows, from torch features: what the remote
        `process_audio` gives for each window, stacked (features on the model's device), but over only
        the frames the encoder reads (the longest window's 2 * T, not 3000) and computed for the whole
        sub-batch at once. Each row is zeroed past its own 2 * T frames (see `_zero_past_length`)."""
        import torch

        if self.log_mel is None:
            raise ModelError(f"{self.model_id}: its audio front end has no log-mel constants to reproduce")
        lengths = [audio_lengths(len(w), self.audio) for w in waves]
        encoder_frames = [2 * t for t, _ in lengths]
        # the frames touching each window's audio, so each row's maximum (the log floor) is the 30 s one
        frames = self.log_mel.trimmed_frames([self.log_mel.clip_frames(len(w)) for w in waves])
        features, _ = self.log_mel([pcm16(w) for w in waves], self.device, frames)
        width = max(encoder_frames)
        keep = (
            torch.arange(width, device=self.device)[None, :]
            < torch.tensor(encoder_frames, device=self.device)[:, None]
        )
        return {
            "input_audios": features[:, :, :width] * keep[:, None, :],
            "input_audio_lengths": torch.IntTensor(lengths),
            "audio_span_tokens": [n + 2 for _, n in lengths],
            "audio_urls": list(paths),
        }

    def _infer(
        self, units: Sequence[Unit], paths: list[str], spec: prompts.PromptSpec, request: LabelRequest
    ) -> list[UnitOut]:
        """score: one forward pass; otherwise greedy decoding to the chunk's largest budget, each row then
        cut at its own (`cut_at_budget`: batch-invariant)."""
        import torch
        from transformers import LogitsProcessorList

        budgets = [unit_budget(u, request) for u in units]
        texts = [prompts.qwen_audio_prompt(spec, p) for p in paths]
        if self.features == "remote":
            per_window = [self.tokenizer.process_audio(t) for t in texts]  # runs ffmpeg on each file
            _zero_past_length(per_window)
            audio_info: Any = per_window
        else:
            audio_info = self.audio_info([u.waveform for u in units], paths)
            # the tokenizer takes one audio_info per text, and reads only the span of its <audio> tag
            per_window = [{"audio_span_tokens": [span]} for span in audio_info["audio_span_tokens"]]
        tokens = self.tokenizer(texts, return_tensors="pt", padding="longest", audio_info=per_window)
        input_ids = tokens.input_ids.to(self.device)
        attention_mask = tokens.attention_mask.to(self.device)
        want_p = request.task == "cry"
        with torch.inference_mode(), self._lm_head_on_last_position():
            if want_p and tuple(request.methods) == ("score",):
                logits = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, audio_info=audio_info, use_cache=False
                ).logits
                return [UnitOut(p_yes=p) for p in p_yes(logits[:, -1, :], self.yes_ids, self.no_ids)]
            # ASR: the transcript's confidence (transcription.mean_logprob), read from the LM head's output,
            # since min_new_tokens masks the stop ids' scores at the first step (TokenLogprobs)
            logprobs = TokenLogprobs()
            reading = contextlib.nullcontext() if want_p else logprobs.reading_logits(self.model.lm_head)
            with reading:
                gen = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self._greedy(request, max(budgets)),
                    logits_processor=LogitsProcessorList([] if want_p else [logprobs]),
                    audio_info=audio_info,
                )
        rows = cut_at_budget(gen.sequences[:, input_ids.shape[1] :].tolist(), budgets, self.stop_ids)
        texts_out = [self._decode(row) for row, _ in rows]
        scores = p_yes(gen.scores[0], self.yes_ids, self.no_ids) if want_p else [None] * len(rows)
        token_logprobs = [None] * len(rows) if want_p else logprobs.rows(rows, self.stop_ids)
        return [
            UnitOut(text=t, p_yes=p, truncated=cut, token_logprobs=lp)
            for t, p, (_, cut), lp in zip(texts_out, scores, rows, token_logprobs, strict=True)
        ]

    @contextlib.contextmanager
    def _lm_head_on_last_position(self) -> Iterator[None]:
        """Apply the LM head to the last position only, which is all that `generate` and `score` read.

        The remote forward has no `logits_to_keep`: the prefill would compute the 155k-token head at every
        prompt position (a batch of 30 s windows is ~770 positions each: 9 of them make 4.3 GB of fp32
        logits). A forward pre-hook on the head, only while we infer, cuts its input to the last step.
        """
        handle = self.model.lm_head.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:, :],))
        try:
            yield
        finally:
            handle.remove()

    def _greedy(self, request: LabelRequest, max_new_tokens: int) -> Any:
        """The eval scripts' decoding, as a config of its own: the checkpoint's generation_config.json
        asks for sampling (top_p 0.8), which would only be overridden key by key, with warnings."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            repetition_penalty=1.0,
            use_cache=True,
            pad_token_id=self.eod_id,
            eos_token_id=sorted(self.stop_ids),
            return_dict_in_generate=True,
            # output_scores, not output_logits (absent before transformers 4.38): the processed scores of
            # the first step differ from its logits only at the stop ids (min_new_tokens), never at the
            # yes/no ids p_yes is read from.
            output_scores=request.task == "cry",
        )

    def _decode(self, ids: list[int]) -> str:
        """Generated ids -> text: the audio span markers and ids past the tokenizer's vocabulary are not
        text (decoding them fails or needs the prompt's audio_info); `<|...|>` tags are removed as the
        Qwen-Audio eval scripts do, so special tokens are kept for that step to see."""
        return decode(
            self.tokenizer,
            ids,
            self.stop_ids,
            keep=lambda i: i < self.n_vocab and i not in self.skip_ids,
            skip_special_tokens=False,
            clean=prompts.strip_special_tags,
        )

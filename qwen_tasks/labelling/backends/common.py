"""What the Qwen2-Audio and the original Qwen-Audio backends share, written once.

Both backends must agree on everything outside the model call, or their labels would not be comparable:
which device, dtype and prompt style a request resolves to and how a model is recorded (`resolve_*`,
`choose_style`), which clips are
refused before any batch (`validate_clip`), how a clip is cut into windows and its per-window outputs
merged back (`plan_units`, `assemble`), which tokens are yes/no and how p_yes is read from logits
(`single_token_ids`, `p_yes`) and how generated ids become text (`decode`). Where the two models differ
(stop tokens, ids that are not text, how special tags are cleaned) the difference is a parameter here,
chosen by each backend, so the shared steps cannot drift apart.

This module is imported by `qwen_audio`, which also runs in the separate Qwen-Audio environment
(transformers 4.x, no Airflow): it imports only numpy, qwen_tasks.records/errors and the labelling
modules both environments have at the top, and torch lazily inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling import prompts, windows
from qwen_tasks.records import TARGET_SAMPLE_RATE, AudioClip, ClipResult, LabelRequest, WindowResult

MIN_SAMPLES = 800  # 50 ms: shorter audio yields no audio token at all after the encoder's downsampling
YES_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_VARIANTS = ("no", "No", "NO", " no", " No", " NO")


@dataclass(frozen=True)
class Unit:
    """One model input: a window of one clip of the batch."""

    clip_pos: int
    window: windows.Window
    waveform: np.ndarray


@dataclass(frozen=True)
class UnitOut:
    """What the model gave for one Unit: its text and/or p_yes, or why it failed; `truncated`: the text
    used the unit's whole token budget without a stop token."""

    text: str | None = None
    p_yes: float | None = None
    error: str | None = None
    truncated: bool = False
    token_logprobs: tuple[float, ...] | None = None  # generated tokens' log-probs (TokenLogprobs)


# --- planning: device, dtype, model id ------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is validated by torch."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA GPU is available")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}: {exc}") from None
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 is slow and changes results), unless asked otherwise."""
    if dtype in (None, "", "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(dtype, dtype)
    if name not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return name


def resolve_model_id(model: str) -> str:
    """A local checkpoint is recorded by its absolute path; a hub id as given."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{model}: not a model directory (no config.json)")
        return str(path.resolve())
    return model


def choose_style(prompt_style: str, detect: Callable[[], prompts.PromptStyle]) -> prompts.PromptStyle:
    """The prompt style asked for ('chat' or 'base'), or the model's own (`detect`, each backend's rule)
    for 'auto'; anything else is refused when planning, before a worker loads the model."""
    if prompt_style == "auto":
        return detect()
    if prompt_style not in ("chat", "base"):
        raise ModelError(f"prompt_style must be auto, chat or base, got {prompt_style!r}")
    return prompt_style  # type: ignore[return-value]


# --- clips -> windows -> clip results -------------------------------------------------------------------


def validate_clip(clip: AudioClip) -> str | None:
    """Why this clip cannot go to the model (None when it can). Checked per clip, never per batch."""
    wave = clip.waveform
    if not isinstance(wave, np.ndarray):
        return f"waveform must be a numpy array, got {type(wave).__name__}"
    if wave.ndim != 1:
        return f"waveform must be mono (1-D), got shape {tuple(wave.shape)}"
    if clip.sample_rate != TARGET_SAMPLE_RATE:
        return f"sample rate {clip.sample_rate} Hz; resample to {TARGET_SAMPLE_RATE} Hz first"
    if len(wave) < MIN_SAMPLES:
        return f"audio too short ({len(wave)} samples; at least {MIN_SAMPLES} = 50 ms needed)"
    if not np.issubdtype(wave.dtype, np.floating):
        return f"waveform must be float, got {wave.dtype}"
    if not np.isfinite(wave).all():
        return "waveform contains NaN or infinite samples"
    return None


def plan_units(clips: Sequence[AudioClip]) -> tuple[dict[int, str], list[Unit]]:
    """The model inputs of a batch, in clip and window order, and the error of each refused clip (by
    position): a bad clip becomes its own error and never reaches the model with its neighbours."""
    errors: dict[int, str] = {}
    units: list[Unit] = []
    for pos, clip in enumerate(clips):
        problem = validate_clip(clip)
        if problem:
            errors[pos] = f"{clip.path}: {problem}"
            continue
        units.extend(
            Unit(pos, w, clip.waveform[w.start : w.end])
            for w in windows.plan_windows(clip.waveform, clip.sample_rate)
        )
    return errors, units


def assemble(
    clips: Sequence[AudioClip],
    errors: dict[int, str],
    units: Sequence[Unit],
    outs: Sequence[UnitOut],
    request: LabelRequest,
) -> list[ClipResult]:
    """One ClipResult per clip, in order: the refused clips' errors, the others merged from their windows'
    outputs (`outs[k]` belongs to `units[k]`, in any order of units)."""
    by_clip: dict[int, list[tuple[windows.Window, UnitOut]]] = {}
    for unit, out in zip(units, outs, strict=True):
        by_clip.setdefault(unit.clip_pos, []).append((unit.window, out))
    results = []
    for pos, clip in enumerate(clips):
        if pos in errors:
            results.append(ClipResult(audio_id=clip.audio_id, error=errors[pos]))
        else:
            parts = sorted(by_clip[pos], key=lambda item: item[0].index)
            results.append(merge_windows(clip, parts, request))
    return results


def merge_windows(
    clip: AudioClip, parts: list[tuple[windows.Window, UnitOut]], request: LabelRequest
) -> ClipResult:
    """Per-window outputs -> one clip result; any failed window fails the clip (with that error)."""
    failed = [out.error for _, out in parts if out.error]
    if failed:
        return ClipResult(audio_id=clip.audio_id, error=failed[0])
    outs = [out for _, out in parts]
    window_results: tuple[WindowResult, ...] = ()
    if len(parts) > 1:
        window_results = tuple(
            WindowResult(
                index=w.index,
                start_s=w.start / clip.sample_rate,
                end_s=w.end / clip.sample_rate,
                text=out.text,
                p_yes=out.p_yes,
                truncated=out.truncated,
            )
            for w, out in parts
        )
    truncated = any(o.truncated for o in outs)
    if request.task == "asr":
        text = windows.join_transcripts([o.text or "" for o in outs], request.language)
        return ClipResult(
            audio_id=clip.audio_id, text=text, windows=window_results, truncated=truncated,
            mean_logprob=mean_logprob(outs),
        )  # fmt: skip
    p_yes = windows.combine_p_yes([o.p_yes for o in outs])
    if p_yes is not None and not math.isfinite(p_yes):
        return ClipResult(audio_id=clip.audio_id, error=f"{clip.path}: model produced a non-finite p_yes")
    text = None
    if "generate" in request.methods:
        answers = [o.text or "" for o in outs]
        text = answers[0] if len(answers) == 1 else windows.pick_cry_answer(answers)
    return ClipResult(
        audio_id=clip.audio_id, text=text, p_yes=p_yes, windows=window_results, truncated=truncated
    )


# --- tokens: yes/no scoring and decoding ----------------------------------------------------------------


def single_token_ids(tokenizer: Any, variants: Sequence[str]) -> list[int]:
    """Ids of the variants that the tokenizer encodes as exactly one token (each id once, in order);
    p_yes sums over these, so a variant split into several tokens is left out rather than half-counted."""
    ids: list[int] = []
    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def p_yes(logits: Any, yes_ids: Sequence[int], no_ids: Sequence[int]) -> list[float]:
    """Per row of `logits` (batch x vocab): mass(yes variants) / (mass(yes) + mass(no)), computed in log
    space in fp32 (no underflow, and the same numbers whatever dtype the model ran in)."""
    import torch

    logits = logits.float()
    log_yes = torch.logsumexp(logits[:, list(yes_ids)], dim=-1)
    log_no = torch.logsumexp(logits[:, list(no_ids)], dim=-1)
    return torch.sigmoid(log_yes - log_no).tolist()


def unit_budget(unit: Unit, request: LabelRequest) -> int:
    """The new tokens this window may generate (`LabelRequest.token_budget`: the request's cap, or the
    task's default for the window's duration)."""
    return request.token_budget(len(unit.waveform) / TARGET_SAMPLE_RATE)


def cut_at_budget(
    rows: Sequence[list[int]], budgets: Sequence[int], stop_ids: Collection[int]
) -> list[tuple[list[int], bool]]:
    """Each generated row cut at its own budget, and whether it was truncated (all `budget` tokens used,
    none of them a stop id).

    A batch generates up to its largest budget (`max(budgets)`); greedy decoding is causal, so a row's
    first `budget` tokens are those it would generate alone with that budget, whatever its batch-mates'
    budgets: cutting here keeps results batch-invariant under per-window budgets."""
    out = []
    for row, budget in zip(rows, budgets, strict=True):
        head = list(row[:budget])
        truncated = len(head) >= budget and not any(t in stop_ids for t in head)
        out.append((head, truncated))
    return out


class TokenLogprobs:
    """A logits processor that records, at each greedy step, the log-probability of the token greedy
    decoding picks (the highest score: max − logsumexp of the scores it is given), and changes nothing.

    Why a processor and not `output_scores` / `output_logits`: those keep a batch x vocabulary tensor per
    step (a 7B model's 152k-token vocabulary, 256 steps, 16 rows: gigabytes), where this keeps one number
    per row and step, on the device, for the cost of one reduction over scores generate computes anyway.
    transformers appends a caller's processors after its own, so these are the scores greedy chose from:
    the model's log-softmax unless the generation config adds a processor (Qwen2-Audio's adds none). Where
    it does (the original Qwen-Audio's `min_new_tokens` sets the stop ids' scores to -inf at the first
    step), `reading_logits` has the LM head's own output give the log-probability instead, so the value is
    the model's, as a forward pass gives it, whatever generate's processors did to the scores."""

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self._log_softmax: Any = None  # this step's, from the LM head (`reading_logits`); None: from scores

    @contextlib.contextmanager
    def reading_logits(self, head: Any) -> Iterator[None]:
        """While inside, each step's log-probabilities come from `head` (the model's LM head module): a
        forward hook keeps the log-softmax of its last position (a new fp32 tensor, so no processor that
        edits scores in place can touch it; one step's at a time), and the processor reads the chosen
        token's value from it (the token greedy picks: the argmax of the final scores it is given)."""

        def keep(_module: Any, _args: Any, output: Any) -> None:
            import torch

            self._log_softmax = torch.log_softmax(output[:, -1, :].float(), dim=-1)

        handle = head.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
            self._log_softmax = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        wide = scores.float()
        if self._log_softmax is None:
            self.steps.append(wide.max(dim=-1).values - torch.logsumexp(wide, dim=-1))
        else:
            chosen = wide.argmax(dim=-1, keepdim=True)
            self.steps.append(self._log_softmax.gather(-1, chosen).squeeze(-1))
            self._log_softmax = None
        return scores

    def rows(
        self, rows: Sequence[tuple[list[int], bool]], stop_ids: Collection[int]
    ) -> list[tuple[float, ...]]:
        """Per generated row (as `cut_at_budget` returns them): the log-probs of its tokens up to and
        including the first stop id (the end of the answer is a decision too), within its budget."""
        import torch

        if not self.steps:
            return [() for _ in rows]
        table = torch.stack(self.steps, dim=1).cpu().tolist()  # batch x steps
        out = []
        for values, (head, _) in zip(table, rows, strict=True):
            n = next((k + 1 for k, t in enumerate(head) if t in stop_ids), len(head))
            out.append(tuple(values[:n]))
        return out


def mean_logprob(outs: Sequence[UnitOut]) -> float | None:
    """The mean log-probability of a clip's generated tokens over all its windows (None when a window
    did not report them)."""
    if any(o.token_logprobs is None for o in outs):
        return None
    values = [v for o in outs for v in o.token_logprobs or ()]
    return math.fsum(values) / len(values) if values else None


def decode(
    tokenizer: Any,
    ids: list[int],
    stop_ids: Collection[int],
    *,
    keep: Callable[[int], bool] | None = None,
    skip_special_tokens: bool = True,
    clean: Callable[[str], str] = str.strip,
) -> str:
    """Generated ids -> answer text: cut at the first stop id, drop the ids `keep` refuses (ids that are
    not text for this model), decode, then `clean` (Qwen2-Audio: strip whitespace, special tokens skipped
    by the tokenizer; Qwen-Audio: its `<|...|>` tags removed as its eval scripts do)."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:k]
            break
    if keep is not None:
        ids = [i for i in ids if keep(i)]
    return clean(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


# --- audio features: Whisper log-mel in torch, batched, on the model's device ----------------------------


@dataclass(frozen=True)
class LogMel:
    """Whisper's log-mel spectrogram, computed with torch for a whole batch on the model's device, over
    only the frames the audio encoder reads.

    The same arithmetic as transformers' `WhisperFeatureExtractor._torch_extract_fbank_features` (Qwen2-Audio)
    and as Whisper's own `log_mel_spectrogram`, which the original Qwen-Audio's remote `audio.py` carries
    (`from_whisper_audio`; tests/labelling/test_qwen_audio.py compares the two): centred STFT with
    a Hann window, power spectrum, mel filters, log10 clamped at 1e-10 and at the clip's maximum minus 8,
    then (x + 4) / 4. What differs is the padding. The processor pads every clip to 30 s (3000 frames)
    on the CPU; here each clip is zero-padded only to `frames` frames plus half a window, which gives
    frames 0..frames-1 exactly the samples they have in the 30 s version (the STFT's reflection at the
    end falls past them), and each clip's maximum is the same (frames past a clip's end are pure
    zero padding, the log floor). Measured against the processor's numpy path: max |difference|
    <= 1e-4 (tests/labelling/test_features.py).

    `filters` is (n_mels, n_fft // 2 + 1); `frames=None` gives the full 30 s (stock encoder pass).
    """

    filters: np.ndarray
    n_fft: int = 400
    hop_length: int = 160
    n_samples: int = 480000

    @classmethod
    def from_feature_extractor(cls, extractor: Any) -> LogMel | None:
        """From a transformers WhisperFeatureExtractor; None where this would not reproduce it (dither,
        normalisation, another extractor), so the caller keeps the processor's own path."""
        filters = getattr(extractor, "mel_filters", None)
        if filters is None or getattr(extractor, "dither", 0.0) or getattr(extractor, "do_normalize", False):
            return None
        return cls(
            filters=np.ascontiguousarray(np.asarray(filters, dtype=np.float32).T),
            n_fft=int(extractor.n_fft),
            hop_length=int(extractor.hop_length),
            n_samples=int(extractor.n_samples),
        )

    @classmethod
    def from_whisper_audio(cls, module: Any) -> LogMel | None:
        """From Whisper's `audio.py` as a checkpoint's remote code carries it (the original Qwen-Audio): its
        constants and its mel filterbank (`mel_filters.npz` next to it); None when the module lacks them,
        so the caller keeps the remote code's own path."""
        names = ("mel_filters", "N_MELS", "N_FFT", "HOP_LENGTH", "N_SAMPLES")
        if not all(hasattr(module, name) for name in names):
            return None
        filters = module.mel_filters("cpu", int(module.N_MELS)).float().numpy()
        return cls(
            filters=np.ascontiguousarray(filters),
            n_fft=int(module.N_FFT),
            hop_length=int(module.HOP_LENGTH),
            n_samples=int(module.N_SAMPLES),
        )

    @property
    def max_frames(self) -> int:
        return self.n_samples // self.hop_length

    def clip_frames(self, n_samples: int) -> int:
        """Frames of a clip of `n_samples` in the feature mask (the processor's `attention_mask[::hop]`)."""
        return -(-min(n_samples, self.n_samples) // self.hop_length)

    def trimmed_frames(self, lengths: Sequence[int]) -> int:
        """The frames the trimmed encoder reads for clips of `lengths` frames: the longest + 2, even
        (qwen2_audio.prompt_embeddings), at most 30 s."""
        frames = min(max(lengths) + 2, self.max_frames)
        return frames + frames % 2

    def __call__(
        self, waves: Sequence[np.ndarray], device: Any, frames: int | None = None
    ) -> tuple[Any, Any]:
        """(features: float32 batch x n_mels x frames, mask: int32 batch x frames), both on `device`."""
        import torch

        lengths = [self.clip_frames(len(w)) for w in waves]
        frames = self.max_frames if frames is None else min(frames, self.max_frames)
        if frames < max(lengths):
            raise ValueError(f"{frames} frames asked for clips of up to {max(lengths)} frames")
        n = min(frames * self.hop_length + self.n_fft // 2, self.n_samples)
        host = np.zeros((len(waves), n), dtype=np.float32)
        for row, wave in enumerate(waves):
            part = wave[:n]
            host[row, : len(part)] = part
        batch = torch.from_numpy(host).to(device)
        window = torch.hann_window(self.n_fft, device=batch.device)
        stft = torch.stft(batch, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = torch.view_as_real(stft[..., :frames]).pow(2).sum(-1)  # |X|^2 without the sqrt
        mel = torch.from_numpy(self.filters).to(batch.device) @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
        features = (log_spec + 4.0) / 4.0
        mask = (
            torch.arange(frames, device=batch.device)[None, :]
            < torch.tensor(lengths, device=batch.device)[:, None]
        )
        return features, mask.to(torch.int32)

"""The one small interface every model backend implements; the runner, CLI and DAG use only this.

A backend receives one batch of decoded clips (mono float32, 16 kHz) and one request, and returns one
ClipResult per clip, in order. It owns everything model-specific: prompts, windowing of audio over 30 s,
batching inside the call, OOM back-off, and turning per-clip failures into `ClipResult(error=...)` so a
bad clip never sinks its neighbours. Later backends (vLLM offline `LLM.generate`) slot in here.

Both backends also offer `loaded_model_info(request)`, the ModelInfo with this request's prompt version and
template filled in (equal to `backends.planned_model_info` for the same arguments); it is optional here, and
`backends.model_info(backend, request)` falls back to `info` for a backend without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from qwen_tasks.records import AudioClip, ClipResult, LabelRequest, ModelInfo


@runtime_checkable
class Backend(Protocol):
    info: ModelInfo

    def label(self, clips: Sequence[AudioClip], request: LabelRequest) -> list[ClipResult]:
        """Label `clips` (already one batch); results are returned in the same order as `clips`.

        For task "asr": ClipResult.text = transcript.
        For task "cry": with "generate" in request.methods, ClipResult.text = the raw generated answer
        and p_yes comes from the first generated step's logits (one pass); with only "score",
        p_yes comes from one forward pass and text is None.
        """
        ...

"""Run a batch so that one bad item or one out-of-memory error never loses the whole batch.

Shared by every backend (transformers now, vLLM later): the model call is a function of a list of
items, and this module decides how to split the list when that call fails. Out of memory halves the
sub-batch and retries; any other error retries the items one by one, so only the item that fails
alone is marked failed. Because outputs are batch-invariant, re-running an item in a smaller batch
gives the result it would have had in the big one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS/CPU allocator) out-of-memory, which a smaller batch may avoid."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def run_resilient(
    items: Sequence[T],
    run: Callable[[list[T]], list[R]],
    on_error: Callable[[T, BaseException], R],
    *,
    max_batch: int | None = None,
    is_oom: Callable[[BaseException], bool] = is_out_of_memory,
    after_oom: Callable[[], None] | None = None,
) -> list[R]:
    """`run` over `items` in sub-batches of at most `max_batch`, returning one result per item, in order.

    - out of memory: the sub-batch size is halved (down to 1) and the failed sub-batch retried;
    - another error in a sub-batch of several items: each item is retried alone;
    - an item that fails alone (either way) gets `on_error(item, exc)` and the others are kept.
    `run` must return exactly one result per input item.
    """
    results: list[R] = []
    size = max(1, min(max_batch or len(items), len(items))) if items else 1
    i = 0
    while i < len(items):
        chunk = list(items[i : i + size])
        try:
            out = _checked(run, chunk)
        except Exception as exc:  # noqa: BLE001 - every failure is turned into a per-item result
            if is_oom(exc) and len(chunk) > 1:
                size = max(1, len(chunk) // 2)
                log.warning("out of memory on %d items; retrying with sub-batches of %d", len(chunk), size)
                if after_oom is not None:
                    after_oom()
                continue
            if len(chunk) > 1:
                log.warning("batch of %d failed (%s); retrying items one by one", len(chunk), exc)
                out = [_run_one(run, on_error, item, after_oom, is_oom) for item in chunk]
            else:
                if is_oom(exc) and after_oom is not None:
                    after_oom()
                out = [on_error(chunk[0], exc)]
        results.extend(out)
        i += len(chunk)
    return results


def _checked(run: Callable[[list[T]], list[R]], chunk: list[T]) -> list[R]:
    out = run(chunk)
    if len(out) != len(chunk):
        raise RuntimeError(f"backend returned {len(out)} results for {len(chunk)} items")
    return out


def _run_one(
    run: Callable[[list[T]], list[R]],
    on_error: Callable[[T, BaseException], R],
    item: T,
    after_oom: Callable[[], None] | None,
    is_oom: Callable[[BaseException], bool],
) -> R:
    try:
        return _checked(run, [item])[0]
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc) and after_oom is not None:
            after_oom()
        return on_error(item, exc)

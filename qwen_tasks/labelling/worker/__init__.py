"""The labelling worker: claim a job, read its audio, ask the model, write results and the done mark
together; and `label`, planning plus that worker in one process.

The one rule that makes workers crash-safe: a job's results, its failures, its "done" mark and the run's
counters are written in ONE transaction that first checks the lease is still ours (`results`). A worker
killed at any point therefore leaves either everything or nothing; the job's lease runs out and another
worker redoes it. A lost database connection is retried with a fresh one (the model's output is kept in
memory, not recomputed).

Modules, by concern:
- `loop`: the worker loop (`work`, its `WorkerOptions`, `Until`), loading the model under the first
  job's lease, and `label` (plan + work);
- `stages`: one claimed job through read → model → write, serially (`process_job`) or overlapped;
- `results`: reading a job's audio back, turning answers into rows, the one write transaction;
- `leases`: the lease heartbeat (`LeaseKeeper`), SIGTERM handling (`signals_handled`, `Terminated`,
  `StopFlag`), worker ids;
- `summary`: `JobOutcome` and the one `WorkSummary` every caller reports.

The names below are what other stages use; import the rest from its module.
"""

from __future__ import annotations

from qwen_tasks.labelling.worker.leases import (
    LeaseKeeper,
    StopFlag,
    Terminated,
    default_worker_id,
    signals_handled,
)
from qwen_tasks.labelling.worker.loop import (
    BackendFactory,
    Until,
    WorkerOptions,
    backend_for_run,
    label,
    work,
)
from qwen_tasks.labelling.worker.results import AudioStorageUnavailable, WriteFailed, load_clips
from qwen_tasks.labelling.worker.stages import check_backend, process_job
from qwen_tasks.labelling.worker.summary import JobOutcome, WorkSummary, real_time_factor

__all__ = [
    "AudioStorageUnavailable",
    "BackendFactory",
    "JobOutcome",
    "LeaseKeeper",
    "StopFlag",
    "Terminated",
    "Until",
    "WorkSummary",
    "WorkerOptions",
    "WriteFailed",
    "backend_for_run",
    "check_backend",
    "default_worker_id",
    "label",
    "load_clips",
    "process_job",
    "real_time_factor",
    "signals_handled",
    "work",
]

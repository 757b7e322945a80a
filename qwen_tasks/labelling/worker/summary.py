"""What a worker reports: one job's outcome (`JobOutcome`) and the one summary of a `label`, a `work`, a
DAG slot or a fine-tune evaluation run (`WorkSummary`).

One summary type for every caller, so a figure is named and added up in one place: the worker loop
counts outcomes into it (`count`), `label` merges the loop's summary into its plan's (`merge`), the CLI
merges the `--json` summary of a worker in the Qwen-Audio environment (`from_dict`, `merge`), and the DAG
slot takes the figures it returns through XCom (`to_dict(fields, digits=...)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qwen_tasks.records import JobOutcomeStatus


def real_time_factor(wall_seconds: float, audio_seconds: float) -> float | None:
    """Wall seconds per second of audio labelled (lower is faster); None before any audio is done."""
    return wall_seconds / audio_seconds if audio_seconds > 0 else None


@dataclass(frozen=True)
class JobOutcome:
    """What happened to one job (see JobOutcomeStatus: done, retry, failed, lost or skipped)."""

    job_id: int
    run_id: int
    status: JobOutcomeStatus
    labelled: int = 0
    failed: int = 0
    audio_seconds: float = 0.0  # audio seconds of the clips labelled
    process_seconds: float = 0.0
    claim_seconds: float = 0.0
    attempt: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The worker's figures, added up by `merge` (a `label` over several workers, or over a worker elsewhere).
WORK_COUNTERS = (
    "jobs_done",
    "jobs_retried",
    "jobs_failed",
    "jobs_lost",
    "labelled",
    "failed",
    "audio_seconds",
    "model_load_seconds",
    "model_loads",
    "claim_seconds",
    "process_seconds",
)
_OUTCOME_COUNTER = {
    JobOutcomeStatus.DONE: "jobs_done",
    JobOutcomeStatus.RETRY: "jobs_retried",
    JobOutcomeStatus.FAILED: "jobs_failed",
    JobOutcomeStatus.LOST: "jobs_lost",
}


@dataclass
class WorkSummary:
    """What a `label` planned and what its worker(s) did, or what one worker did (`qwen-tasks label
    --json` and `work --json` print `to_dict()`; the planning figures stay 0 for a worker alone)."""

    run_id: int | None = None  # the run worked on (label: the newest; None: several runs or nothing to do)
    run_ids: list[int] = field(default_factory=list)
    worker_id: str | None = None
    # planning (`label`)
    planned: int = 0  # clips in new runs
    jobs: int = 0  # jobs planned (resumed and new)
    left_over: int = 0
    resumed_jobs: int = 0
    reason: str | None = None  # nothing planned: why (planning's per-task reason)
    in_flight_run_ids: list[int] = field(default_factory=list)  # nothing planned: runs others are labelling
    # working
    jobs_done: int = 0
    jobs_retried: int = 0
    jobs_failed: int = 0
    jobs_lost: int = 0
    labelled: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_load_seconds: float = 0.0
    model_loads: int = 0  # a worker loads each model it needs once (several only if its runs differ)
    claim_seconds: float = 0.0
    process_seconds: float = 0.0
    run_status: str | None = None  # the status of run_id at the end
    errors: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)  # jobs finished or failed here, in order
    stopped: str | None = None  # why the worker stopped early (SIGTERM), None when it ran out of work

    @property
    def rtf(self) -> float | None:
        return real_time_factor(self.wall_seconds, self.audio_seconds)

    @property
    def status(self) -> str | None:
        """`run_status` by the name `label` has always given it (its `--json` key)."""
        return self.run_status

    def count(self, outcome: JobOutcome) -> None:
        """Add one job's outcome."""
        if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
            self.job_ids.append(outcome.job_id)
        if outcome.run_id not in self.run_ids:
            self.run_ids.append(outcome.run_id)
        counter = _OUTCOME_COUNTER.get(outcome.status)
        if counter is not None:
            setattr(self, counter, getattr(self, counter) + 1)
        self.labelled += outcome.labelled
        self.failed += outcome.failed
        self.audio_seconds += outcome.audio_seconds
        self.claim_seconds += outcome.claim_seconds
        self.process_seconds += outcome.process_seconds
        if outcome.error and outcome.status in (JobOutcomeStatus.RETRY, JobOutcomeStatus.FAILED):
            self.errors.append(f"job {outcome.job_id}: {outcome.error}")

    def merge(self, other: WorkSummary) -> WorkSummary:
        """Add what another worker did (its WORK_COUNTERS, errors, jobs and runs); the plan's figures,
        the run's status and the wall time stay this summary's. Returns self."""
        for name in WORK_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors += other.errors
        self.job_ids += other.job_ids
        self.run_ids += [r for r in other.run_ids if r not in self.run_ids]
        self.worker_id = self.worker_id or other.worker_id
        self.stopped = self.stopped or other.stopped
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkSummary:
        """A summary back from its `to_dict()` (another process's `--json`); unknown keys are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None})

    def to_dict(self, only: Iterable[str] | None = None, *, digits: int | None = None) -> dict[str, Any]:
        """Every field, `rtf`, and `status` (the run's status: the key `label --json` has always had,
        `run_status` the one of `work --json`); `only` these keys, floats rounded to `digits`."""
        out = asdict(self)
        out["rtf"] = self.rtf
        out["status"] = self.status
        if only is not None:
            out = {k: out[k] for k in only}
        if digits is not None:
            out = {k: round(v, digits) if isinstance(v, float) else v for k, v in out.items()}
        return out

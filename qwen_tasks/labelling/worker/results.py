"""A job's results: its audio read back as ingest admitted it, the model's answers turned into rows, and
the ONE transaction that stores them.

The rule that makes workers crash-safe lives in `write_results`: a job's results, its failures, its
"done" mark and the run's counters are written in one transaction that first checks the lease is still
ours. A worker killed at any point therefore leaves either everything or nothing; the job's lease runs
out and another worker redoes it. Unique keys plus `ON CONFLICT DO NOTHING` make a replay harmless on top
of that. An answer that cannot be stored as it is (no transcript, a p_yes outside [0, 1]) becomes a
failure row of its clip, never a crash of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks.errors import AudioError, DatabaseUnavailable, ModelError, QwenTasksError, StorageUnavailable
from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.answers import normalize_yes_no
from qwen_tasks.records import AudioClip, ClipResult, JobStatus, LabelRequest
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import cry_answer, label_failure, label_job, label_run, transcription

# Tries of a job's result transaction when the connection drops (about 18 s of back-off in all).
WRITE_ATTEMPTS = 8


class AudioStorageUnavailable(QwenTasksError):
    """None of a job's files exists: storage is probably not mounted. Job-level, so the job is retried."""


class LeaseLost(QwenTasksError):
    """Our lease on a job ended and another worker took the job over; our results are discarded."""


class WriteFailed(DatabaseUnavailable):
    """A job's results could not be stored through every retry; the job was released (attempt counted)."""


def load_clips(items: Sequence[jobs.JobItem]) -> tuple[list[AudioClip], dict[int, str]]:
    """Decode a job's audio; returns the clips and, per audio id that could not be read, why.

    Each audio is tried at each of its ok paths (the same bytes may live at several). A file that is no
    longer what ingest recorded (size, mtime, real location under its allowed root: audio_files.load_ingested)
    is not used (its label would describe other audio, or audio that may not be read). When no file of
    the job exists at all, storage is most likely missing (unmounted disk): that is raised as
    AudioStorageUnavailable so the job is retried rather than every clip marked failed.
    """
    # imported here: the audio decoders load only in a process that decodes audio, not for every CLI command
    from qwen_tasks.ingest.audio_files import load_ingested

    clips: list[AudioClip] = []
    failures: dict[int, str] = {}
    missing_only = 0
    for item in items:
        reasons: list[str] = []
        missing = 0
        for recorded in item.paths:
            try:
                waveform = load_ingested(recorded)  # refuses a file that is no longer what ingest admitted
            except StorageUnavailable as exc:  # the bucket cannot be reached: retry the job, fail no clip
                raise AudioStorageUnavailable(str(exc)) from None
            except FileNotFoundError:
                missing += 1
                reasons.append(f"{recorded.path}: file not found (deleted or storage not mounted?)")
                continue
            except AudioError as exc:
                reasons.append(str(exc))
                continue
            clips.append(AudioClip(audio_id=item.audio_id, path=recorded.path, waveform=waveform))
            break
        else:
            if not item.paths:
                reasons.append(
                    f"audio {item.audio_id}: no readable path left (all paths quarantined or missing)"
                )
            failures[item.audio_id] = "; ".join(reasons)
            if item.paths and missing == len(item.paths):
                missing_only += 1
    if items and missing_only == len(items):
        first = next(iter(failures.values()))
        raise AudioStorageUnavailable(f"none of the {len(items)} file(s) of this job exists ({first})")
    return clips, failures


def clean_text(text: str | None) -> str | None:
    """PostgreSQL text and jsonb cannot hold NUL characters, which a random or broken model can emit;
    they are replaced (U+FFFD) so one odd answer does not sink its batch's transaction."""
    return None if text is None else text.replace("\x00", "\ufffd")


def _windows(result: ClipResult) -> list[dict[str, Any]]:
    return [{**asdict(w), "text": clean_text(w.text)} for w in result.windows]


@dataclass
class Rows:
    """A job's rows per table, and the audio seconds of each clip (the run's counter adds those stored)."""

    transcription: list[dict[str, Any]] = field(default_factory=list)
    cry_answer: list[dict[str, Any]] = field(default_factory=list)
    failure: list[dict[str, Any]] = field(default_factory=list)
    durations: dict[int, float] = field(default_factory=dict)


def build_rows(
    job: jobs.Job,
    request: LabelRequest,
    items: Sequence[jobs.JobItem],
    clips: Sequence[AudioClip],
    results: Sequence[ClipResult],
    load_failures: dict[int, str],
) -> Rows:
    """Turn model results into table rows; a result that is unusable becomes a failure row, not a crash."""
    rows = Rows()
    durations = {it.audio_id: it.duration_s for it in items}
    base = {"run_id": job.run_id, "job_id": job.id}
    for audio_id, error in load_failures.items():
        rows.failure.append({**base, "audio_id": audio_id, "error": error[:4000]})
    for clip, result in zip(clips, results, strict=True):
        if result.audio_id != clip.audio_id:
            raise ModelError(
                f"backend returned results out of order (audio {result.audio_id} for {clip.audio_id})"
            )
        problem = result.error
        if problem is None and request.task == "asr" and result.text is None:
            problem = "model returned no transcript"
        if problem is None and request.task == "cry":
            if "generate" in request.methods and result.text is None:
                problem = "model returned no answer"
            if "score" in request.methods and not _valid_p(result.p_yes):
                problem = f"model returned no usable p_yes ({result.p_yes!r})"
        if problem is not None:
            # A backend's error names the clip already (backends report to callers with no row to put
            # it in); the checks above do not. Either way the path appears once.
            named = problem if problem.startswith(f"{clip.path}: ") else f"{clip.path}: {problem}"
            rows.failure.append({**base, "audio_id": clip.audio_id, "error": named[:4000]})
            continue
        rows.durations[clip.audio_id] = durations.get(clip.audio_id, clip.duration_s)
        windows = _windows(result)
        if request.task == "asr":
            rows.transcription.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "text": clean_text(result.text),
                    "language": request.language,
                    "windows": windows,
                    "truncated": result.truncated,
                    "mean_logprob": result.mean_logprob,
                }
            )
            continue
        p_yes = result.p_yes if _valid_p(result.p_yes) else None
        if "score" in request.methods:
            decision = request.decide(p_yes)
            rows.cry_answer.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "method": "score",
                    "raw_answer": None,
                    "p_yes": p_yes,
                    "label": decision.label,
                    "threshold": decision.threshold,
                    "calibration_id": decision.calibration_id,
                    "p_calibrated": decision.p_calibrated,
                    "windows": windows,
                    "truncated": False,  # one forward pass, nothing generated
                }
            )
        if "generate" in request.methods:
            rows.cry_answer.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "method": "generate",
                    "raw_answer": clean_text(result.text),
                    "p_yes": p_yes,
                    "label": normalize_yes_no(result.text or ""),
                    "threshold": None,
                    "calibration_id": None,
                    "p_calibrated": None,
                    "windows": windows,
                    "truncated": result.truncated,
                }
            )
    return rows


def _valid_p(p: float | None) -> bool:
    return p is not None and math.isfinite(p) and 0.0 <= p <= 1.0


def write_results(
    engine: Engine, job: jobs.Job, worker_id: str, rows: Rows, process_seconds: float
) -> tuple[int, int, float]:
    """The one transaction: lease check + done mark, results, failures, run counters.

    Returns (labelled, failed, audio_seconds) as actually inserted. Raises LeaseLost (nothing written)
    when the job is no longer ours.
    """
    with db.transaction(engine) as conn:
        mine = conn.execute(
            label_job.update()
            .where(jobs.held_by(job.id, worker_id))
            .values(
                status=JobStatus.DONE,
                finished_at=sa.func.now(),
                lease_expires_at=None,
                claim_seconds=job.claim_seconds,
                process_seconds=process_seconds,
            )
            .returning(label_job.c.id)
        ).one_or_none()
        if mine is None:
            raise LeaseLost(f"job {job.id}: lease is no longer held by {worker_id}")
        labelled_ids: set[int] = set()
        for table, payload in ((transcription, rows.transcription), (cry_answer, rows.cry_answer)):
            if payload:
                stmt = pg_insert(table).on_conflict_do_nothing().returning(table.c.audio_id)
                labelled_ids.update(conn.execute(stmt, payload).scalars())
        n_failed = 0
        if rows.failure:
            stmt = pg_insert(label_failure).on_conflict_do_nothing().returning(label_failure.c.audio_id)
            n_failed = len(list(conn.execute(stmt, rows.failure).scalars()))
        seconds = sum(rows.durations.get(a, 0.0) for a in labelled_ids)
        conn.execute(
            label_run.update()
            .where(label_run.c.id == job.run_id)
            .values(
                n_labelled=label_run.c.n_labelled + len(labelled_ids),
                n_failed=label_run.c.n_failed + n_failed,
                audio_seconds=label_run.c.audio_seconds + seconds,
            )
        )
    return len(labelled_ids), n_failed, seconds

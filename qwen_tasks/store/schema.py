"""SQLAlchemy Core mirrors of the tables and views of `sql/migrations/` (the SQL files are the truth).

Each relation is declared once, here, and every query imports it from here. Tables declare the columns
Python code uses; views declare all their columns. `tests/store/test_schema.py` checks the declarations
against the migrated database: relation kind (table or view), column names, types and nullability.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from qwen_tasks.records import JobStatus, ModelVersionStatus, RunStatus

metadata = sa.MetaData()


def _id() -> sa.Column:
    return sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True)


def _ts(name: str, default: bool = True) -> sa.Column:
    """A timestamptz column: `NOT NULL DEFAULT now()` (a row's own time), or a nullable event time."""
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=not default,
        server_default=sa.func.now() if default else None,
    )


audio = sa.Table(
    "audio",
    metadata,
    _id(),
    sa.Column("sha256", sa.Text, nullable=False, unique=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("sample_rate", sa.Integer, nullable=False),
    sa.Column("channels", sa.SmallInteger, nullable=False),
    sa.Column("frames", sa.BigInteger, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("subtype", sa.Text),
    _ts("created_at"),
)

audio_file = sa.Table(
    "audio_file",
    metadata,
    _id(),
    sa.Column("path", sa.Text, nullable=False, unique=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id")),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("mtime_ns", sa.BigInteger),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    _ts("first_seen"),
    _ts("last_seen"),
    sa.Column("path_bytes", sa.LargeBinary),  # 0006: the exact name when it is not UTF-8
    sa.Column("root", sa.Text),  # 0006: the allowed root that admitted it at its latest ingest
    sa.Column("etag", sa.Text),  # 0012: an object's entity tag (URL paths); NULL for local files
)

manifest_item = sa.Table(
    "manifest_item",
    metadata,
    _id(),
    sa.Column("manifest_path", sa.Text, nullable=False),
    sa.Column("line_no", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("audio_path", sa.Text, nullable=False),
    sa.Column("audio_file_id", sa.BigInteger, sa.ForeignKey("audio_file.id")),
    sa.Column("reference_text", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("question", sa.Text),
    sa.Column("gt", sa.Text),
    sa.Column("gold_label", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("raw", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    _ts("ingested_at"),
    sa.Column("line_hash", sa.BigInteger),  # 0006: BLAKE2b-64 of the line as written (re-ingest skips)
    sa.UniqueConstraint("manifest_path", "line_no"),
)

label_run = sa.Table(
    "label_run",
    metadata,
    _id(),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("revision", sa.Text, nullable=False, server_default=""),
    sa.Column("prompt_version", sa.Text, nullable=False),
    sa.Column("prompt_template", sa.Text),
    sa.Column("dtype", sa.Text),
    sa.Column("device", sa.Text),
    sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("status", sa.Text, nullable=False, server_default=RunStatus.PLANNED.value),
    sa.Column("n_planned", sa.Integer, nullable=False, server_default="0"),
    sa.Column("n_labelled", sa.Integer, nullable=False, server_default="0"),
    sa.Column("n_failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("audio_seconds", sa.Float, nullable=False, server_default="0"),
    _ts("created_at"),
    _ts("started_at", default=False),
    _ts("finished_at", default=False),
    sa.Column("purpose", sa.Text, nullable=False, server_default="label"),  # 0004
)

label_job = sa.Table(
    "label_job",
    metadata,
    _id(),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default=JobStatus.PENDING.value),
    sa.Column("n_items", sa.Integer, nullable=False),
    sa.Column("audio_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_error", sa.Text),
    sa.Column("claim_seconds", sa.Float),
    sa.Column("process_seconds", sa.Float),
    _ts("created_at"),
    _ts("started_at", default=False),
    _ts("finished_at", default=False),
    sa.UniqueConstraint("run_id", "seq"),
)

label_job_item = sa.Table(
    "label_job_item",
    metadata,
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("label_job.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), nullable=False),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    sa.UniqueConstraint("run_id", "audio_id"),
)

transcription = sa.Table(
    "transcription",
    metadata,
    _id(),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("label_job.id", ondelete="SET NULL")),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("language", sa.Text),
    sa.Column("windows", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    _ts("created_at"),
    sa.Column("truncated", sa.Boolean, nullable=False, server_default=sa.false()),  # 0007: hit the cap
    sa.Column("mean_logprob", sa.Float),  # 0015: mean log-prob of the generated tokens (NULL: not reported)
    sa.UniqueConstraint("run_id", "audio_id"),
)

cry_answer = sa.Table(
    "cry_answer",
    metadata,
    _id(),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("label_job.id", ondelete="SET NULL")),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("raw_answer", sa.Text),
    sa.Column("p_yes", sa.Float),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("threshold", sa.Float),
    sa.Column("windows", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    _ts("created_at"),
    sa.Column("truncated", sa.Boolean, nullable=False, server_default=sa.false()),  # 0007: hit the cap
    # 0016: the decision rule a score answer was decided with (NULL: plain p_yes >= threshold)
    sa.Column("calibration_id", sa.BigInteger, sa.ForeignKey("decision_calibration.id", ondelete="SET NULL")),
    sa.Column("p_calibrated", sa.Float),
    sa.UniqueConstraint("run_id", "audio_id", "method"),
)

label_failure = sa.Table(
    "label_failure",
    metadata,
    _id(),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.BigInteger, sa.ForeignKey("label_job.id", ondelete="SET NULL")),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    _ts("created_at"),
    sa.UniqueConstraint("run_id", "audio_id"),
)

human_label = sa.Table(
    "human_label",
    metadata,
    _id(),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("text", sa.Text),
    sa.Column("reviewer", sa.Text),
    sa.Column("source", sa.Text, nullable=False, server_default="label-studio"),
    _ts("created_at"),
    sa.UniqueConstraint("audio_id", "task"),
)

run_metric = sa.Table(
    "run_metric",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Float),
    sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    _ts("computed_at"),
    sa.Column("inputs", sa.Text),  # 0011: what the figure was computed from (quality.metrics)
)

# 0011: bumped by every statement that changes human_label, manifest_item, audio_file, dataset or
# dataset_audio (the gold and groups of every run's figures); read, never advanced, from Python.
metric_inputs_version = sa.Sequence("metric_inputs_version", metadata=metadata)

# 0003_review_views: per-utterance ASR scores (written by quality.metrics, read by the review views).
utterance_score = sa.Table(
    "utterance_score",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    sa.Column("language", sa.Text, nullable=False),
    sa.Column("unit", sa.Text, nullable=False),
    sa.Column("reference_source", sa.Text, nullable=False),
    sa.Column("n_ref", sa.Integer, nullable=False),
    sa.Column("substitutions", sa.Integer, nullable=False),
    sa.Column("deletions", sa.Integer, nullable=False),
    sa.Column("insertions", sa.Integer, nullable=False),
    sa.Column("error_rate", sa.Float),
    _ts("computed_at"),
)

# 0004_model_version: the stored fine-tune split and the model version registry (labelling.registry).
finetune_split = sa.Table(
    "finetune_split",
    metadata,
    sa.Column("task", sa.Text, primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    sa.Column("part", sa.Text, nullable=False),
    _ts("assigned_at"),
)

model_version = sa.Table(
    "model_version",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("base_revision", sa.Text, nullable=False, server_default=""),
    sa.Column("adapter_path", sa.Text, nullable=False),
    sa.Column("adapter_sha256", sa.Text, nullable=False),
    sa.Column("revision", sa.Text, nullable=False),
    sa.Column("prompt_version", sa.Text, nullable=False),
    sa.Column("request", JSONB, nullable=False),
    sa.Column("data_digest", sa.Text, nullable=False),
    sa.Column("counts", JSONB, nullable=False),
    sa.Column("hyperparams", JSONB, nullable=False),
    sa.Column("loss_curve", JSONB, nullable=False),
    sa.Column("train_seconds", sa.Float, nullable=False),
    sa.Column("base_run_id", sa.BigInteger, sa.ForeignKey("label_run.id")),
    sa.Column("candidate_run_id", sa.BigInteger, sa.ForeignKey("label_run.id")),
    sa.Column("metrics", JSONB),
    sa.Column("status", sa.Text, nullable=False, server_default=ModelVersionStatus.CANDIDATE.value),
    sa.Column("status_reason", sa.Text),
    sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
    _ts("created_at"),
    _ts("promoted_at", default=False),
    _ts("retired_at", default=False),
)

# 0007_datasets: named sets of audio with a split and the tasks they are labelled for.
dataset = sa.Table(
    "dataset",
    metadata,
    _id(),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("split", sa.Text, nullable=False, server_default="train"),
    sa.Column("tasks", ARRAY(sa.Text), nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
)

# 0016_calibration: a decision threshold (and optional probability calibration) per fine-tuned version,
# or per base model (+ revision) and dataset; the newest row of a key is the one labelling uses.
decision_calibration = sa.Table(
    "decision_calibration",
    metadata,
    _id(),
    sa.Column("task", sa.Text, nullable=False, server_default="cry"),
    sa.Column("model_version_id", sa.BigInteger, sa.ForeignKey("model_version.id", ondelete="CASCADE")),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("revision", sa.Text, nullable=False, server_default=""),
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE")),
    sa.Column("prompt_template", sa.Text, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("objective", sa.Text, nullable=False),
    sa.Column("target_precision", sa.Float),
    sa.Column("n_labels", sa.Integer, nullable=False),
    sa.Column("n_yes", sa.Integer, nullable=False),
    sa.Column("source_run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="SET NULL")),
    sa.Column("heldout", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("note", sa.Text),
    _ts("chosen_at"),
)

dataset_audio = sa.Table(
    "dataset_audio",
    metadata,
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    _ts("added_at"),
)

dataset_source = sa.Table(
    "dataset_source",
    metadata,
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("location", sa.Text, primary_key=True),
    _ts("first_ingested_at"),
    _ts("last_ingested_at"),
)

run_dataset = sa.Table(
    "run_dataset",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("n_items", sa.Integer, nullable=False, server_default="0"),
)

model_version_test = sa.Table(
    "model_version_test",
    metadata,
    sa.Column(
        "version_id", sa.BigInteger, sa.ForeignKey("model_version.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("base_run_id", sa.BigInteger, sa.ForeignKey("label_run.id")),
    sa.Column("candidate_run_id", sa.BigInteger, sa.ForeignKey("label_run.id")),
)

# 0008_quality_by_group: a run's metrics over the clips of each dataset and each manifest source.
run_metric_group = sa.Table(
    "run_metric_group",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("grouping", sa.Text, primary_key=True),  # 'dataset' or 'source'
    sa.Column("group_name", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Float),
    sa.Column("details", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    _ts("computed_at"),
)

# 0010: the label each clip has now per task (model part: the newest production run's; human part: the
# human_label row), kept by triggers in the transaction that writes answers or human labels. Read it
# through the latest_label view; never write it from Python.
current_label = sa.Table(
    "current_label",
    metadata,
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    sa.Column("task", sa.Text, primary_key=True),
    sa.Column("run_id", sa.BigInteger),
    sa.Column("method", sa.Text),
    sa.Column("model_label", sa.Text),
    sa.Column("model_text", sa.Text),
    sa.Column("p_yes", sa.Float),
    sa.Column("human_id", sa.BigInteger),
    sa.Column("reviewed_label", sa.Text),
    sa.Column("reviewed_text", sa.Text),
    sa.Column("reviewer", sa.Text),
    sa.Column(
        "label",
        sa.Text,
        sa.Computed("CASE WHEN human_id IS NOT NULL THEN reviewed_label ELSE model_label END"),
    ),
    sa.Column(
        "text", sa.Text, sa.Computed("CASE WHEN human_id IS NOT NULL THEN reviewed_text ELSE model_text END")
    ),
    sa.Column("source", sa.Text, sa.Computed("CASE WHEN human_id IS NOT NULL THEN 'human' ELSE 'model' END")),
    _ts("updated_at"),
    # 0011: the clip's first ok path (audio_path's rule), kept by triggers on current_label and audio_file
    sa.Column("path", sa.Text),
)

# 0014: live Label Studio sync (qwen_tasks.review.sync): a project per (server, dataset, task), the clips
# pushed to it with their Label Studio task ids, and every annotation pulled from it.
review_project = sa.Table(
    "review_project",
    metadata,
    _id(),
    sa.Column("server", sa.Text, nullable=False),
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id"), nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("ls_project_id", sa.BigInteger, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    _ts("created_at"),
    _ts("last_push_at", default=False),
    _ts("last_pull_at", default=False),
    sa.UniqueConstraint("server", "dataset_id", "task"),
    sa.UniqueConstraint("server", "ls_project_id"),
)

review_task = sa.Table(
    "review_task",
    metadata,
    sa.Column("project_id", sa.BigInteger, sa.ForeignKey("review_project.id"), primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), primary_key=True),
    sa.Column("ls_task_id", sa.BigInteger, nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id")),
    _ts("pushed_at"),
    sa.UniqueConstraint("project_id", "ls_task_id"),
)

review_annotation = sa.Table(
    "review_annotation",
    metadata,
    sa.Column("project_id", sa.BigInteger, sa.ForeignKey("review_project.id"), primary_key=True),
    sa.Column("ls_annotation_id", sa.BigInteger, primary_key=True),
    sa.Column("ls_task_id", sa.BigInteger, nullable=False),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("text", sa.Text),
    sa.Column("was_cancelled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reviewer", sa.Text),
    sa.Column("lead_time_s", sa.Float),
    _ts("ls_created_at", default=False),
    sa.Column("ls_updated_at", sa.DateTime(timezone=True), nullable=False),
    _ts("pulled_at"),
)

# 0015_review_queue_ranking: each clip a ranked review queue sent somewhere, and why (review.queue).
review_queued = sa.Table(
    "review_queued",
    metadata,
    _id(),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id"), nullable=False),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="SET NULL")),
    sa.Column("strategy", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("priority", sa.Float, nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    _ts("queued_at"),
)

# 0017_dataset_counts: what each clip adds to the datasets it belongs to, and per dataset the rows of
# differences dataset_summary sums; both kept by triggers (never written from Python).
_PART_COLUMNS = (
    "clips",
    "asr_labelled",
    "cry_labelled",
    "asr_references",
    "cry_gold",
    "cry_gold_yes",
    "cry_gold_no",
)
dataset_clip = sa.Table(
    "dataset_clip",
    metadata,
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("audio_seconds", sa.Float, nullable=False),
    *(sa.Column(name, sa.SmallInteger, nullable=False) for name in _PART_COLUMNS),
)
dataset_count = sa.Table(
    "dataset_count",
    metadata,
    _id(),
    sa.Column("dataset_id", sa.BigInteger, sa.ForeignKey("dataset.id", ondelete="CASCADE"), nullable=False),
    sa.Column("audio_seconds", sa.Numeric, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in _PART_COLUMNS),
)

# 0017_dataset_counts: per run and clip, what review_queue ranks by (kept by triggers).
review_item = sa.Table(
    "review_item",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("task", sa.Text, primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("reasons", ARRAY(sa.Text), nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("p_yes", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("generate_label", sa.Text),
    sa.Column("gold_label", sa.Text),
    sa.Column("gold_source", sa.Text),
    sa.Column("error_rate", sa.Float),
    sa.Column("priority", sa.Float, nullable=False),
)

# --- Views ---------------------------------------------------------------------------------------------
# Every view of sql/migrations/, declared once here so that queries and the schema test share one
# declaration (no ad-hoc `sa.table(...)` mirrors elsewhere). `info={"view": True}` marks them: the schema
# test checks each is a view in the database (and each table a table), and `metadata.create_all` must
# never be used on this metadata, as it would create them as tables. PostgreSQL reports every view column
# as nullable, so view columns are declared nullable.
VIEW_INFO = {"view": True}


def _view(name: str, *columns: sa.Column) -> sa.Table:
    return sa.Table(name, metadata, *columns, info=dict(VIEW_INFO))


def is_view(table: sa.Table) -> bool:
    """True for the Tables above that mirror a SQL view rather than a table."""
    return bool(table.info.get("view"))


# 0002_run_progress: one row per run with its job counts and timings (what `qwen-tasks runs` prints).
run_progress = _view(
    "run_progress",
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task", sa.Text),
    sa.Column("model", sa.Text),
    sa.Column("revision", sa.Text),
    sa.Column("prompt_version", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("clips_planned", sa.Integer),
    sa.Column("clips_labelled", sa.Integer),
    sa.Column("clips_failed", sa.Integer),
    sa.Column("audio_seconds", sa.Float),
    sa.Column("jobs", sa.BigInteger),
    sa.Column("jobs_pending", sa.BigInteger),
    sa.Column("jobs_running", sa.BigInteger),
    sa.Column("jobs_stale", sa.BigInteger),
    sa.Column("jobs_done", sa.BigInteger),
    sa.Column("jobs_failed", sa.BigInteger),
    sa.Column("clips_in_failed_jobs", sa.BigInteger),
    sa.Column("busy_seconds", sa.Float),
    sa.Column("claim_seconds", sa.Float),
    sa.Column("wall_seconds", sa.Float),
    sa.Column("rtf", sa.Float),
    sa.Column("datasets", ARRAY(sa.Text)),  # 0009: the datasets the run covered
)

# 0003_review_views: the first readable path per audio.
audio_path = _view("audio_path", sa.Column("audio_id", sa.BigInteger), sa.Column("path", sa.Text))

# 0003: gold cry answer per audio (human review beats the manifest).
cry_gold = _view(
    "cry_gold",
    sa.Column("audio_id", sa.BigInteger),
    sa.Column("gold_label", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("manifest_item_id", sa.BigInteger),
    sa.Column("reviewer", sa.Text),
)

# 0003: reference transcript per audio (human review beats the manifest).
asr_reference = _view(
    "asr_reference",
    sa.Column("audio_id", sa.BigInteger),
    sa.Column("reference_text", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("manifest_item_id", sa.BigInteger),
    sa.Column("reviewer", sa.Text),
)

# 0003, replaced in 0004 (same columns; evaluation runs left out), 0010 (same columns, read from
# current_label) and 0011 (the path is current_label's): the label to use now per audio and task.
latest_label = _view(
    "latest_label",
    sa.Column("audio_id", sa.BigInteger),
    sa.Column("task", sa.Text),
    sa.Column("label", sa.Text),
    sa.Column("text", sa.Text),
    sa.Column("source", sa.Text),
    sa.Column("model_label", sa.Text),
    sa.Column("model_text", sa.Text),
    sa.Column("p_yes", sa.Float),
    sa.Column("method", sa.Text),
    sa.Column("run_id", sa.BigInteger),
    sa.Column("model", sa.Text),
    sa.Column("prompt_version", sa.Text),
    sa.Column("reviewer", sa.Text),
    sa.Column("path", sa.Text),
)

# 0003: items worth a human look, one row per run and audio, with the reasons and a priority.
review_queue = _view(
    "review_queue",
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task", sa.Text),
    sa.Column("audio_id", sa.BigInteger),
    sa.Column("path", sa.Text),
    sa.Column("reasons", ARRAY(sa.Text)),
    sa.Column("is_latest_run", sa.Boolean),
    sa.Column("label", sa.Text),
    sa.Column("p_yes", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("generate_label", sa.Text),
    sa.Column("raw_answer", sa.Text),
    sa.Column("gold_label", sa.Text),
    sa.Column("gold_source", sa.Text),
    sa.Column("transcript", sa.Text),
    sa.Column("reference_text", sa.Text),
    sa.Column("error_rate", sa.Float),
    sa.Column("priority", sa.Float),
)


def _quality_figures() -> list[sa.Column]:
    """The key figures run_quality (0003) and run_quality_by_dataset (0008) both show, in their order."""
    floats = ("n_gold", "score_accuracy", "score_f1", "score_roc_auc", "best_threshold", "generate_accuracy",
              "generate_f1", "generate_unknown_rate", "methods_agreement", "n_reference", "wer", "cer",
              "error_rate")  # fmt: skip
    return [sa.Column(name, sa.Float) for name in floats]


# 0003: one row per run with its stored metrics as columns (names of run_metric).
run_quality = _view(
    "run_quality",
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task", sa.Text),
    sa.Column("model", sa.Text),
    sa.Column("revision", sa.Text),
    sa.Column("prompt_version", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("n_planned", sa.Integer),
    sa.Column("n_labelled", sa.Integer),
    sa.Column("n_failed", sa.Integer),
    sa.Column("audio_seconds", sa.Float),
    *_quality_figures(),
    sa.Column("items_per_s", sa.Float),
    sa.Column("rtf", sa.Float),
    sa.Column("metrics_computed_at", sa.DateTime(timezone=True)),
)

# 0004_model_version: base vs candidate on the same held-out audio, one row per model version.
model_version_quality = _view(
    "model_version_quality",
    sa.Column("name", sa.Text),
    sa.Column("task", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("base_model", sa.Text),
    sa.Column("revision", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("base_run_id", sa.BigInteger),
    sa.Column("candidate_run_id", sa.BigInteger),
    sa.Column("heldout_gold", sa.Float),
    sa.Column("base_roc_auc", sa.Float),
    sa.Column("candidate_roc_auc", sa.Float),
    sa.Column("base_f1", sa.Float),
    sa.Column("candidate_f1", sa.Float),
    sa.Column("base_accuracy", sa.Float),
    sa.Column("candidate_accuracy", sa.Float),
    sa.Column("heldout_references", sa.Float),
    sa.Column("base_error_rate", sa.Float),
    sa.Column("candidate_error_rate", sa.Float),
    sa.Column("test_datasets", ARRAY(sa.Text)),  # 0007: the test datasets it was also evaluated on
)

# 0007_datasets: one row per dataset (clips, labelled per task, gold / references).
dataset_summary = _view(
    "dataset_summary",
    sa.Column("dataset_id", sa.BigInteger),
    sa.Column("name", sa.Text),
    sa.Column("split", sa.Text),
    sa.Column("tasks", ARRAY(sa.Text)),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("clips", sa.BigInteger),
    sa.Column("audio_seconds", sa.Float),
    sa.Column("asr_labelled", sa.BigInteger),
    sa.Column("cry_labelled", sa.BigInteger),
    sa.Column("asr_references", sa.BigInteger),
    sa.Column("cry_gold", sa.BigInteger),
    sa.Column("cry_gold_yes", sa.BigInteger),
    sa.Column("cry_gold_no", sa.BigInteger),
)

# 0007_datasets: a version's held-out and test-dataset evaluations side by side.
model_version_evaluation = _view(
    "model_version_evaluation",
    sa.Column("name", sa.Text),
    sa.Column("task", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("evaluated_on", sa.Text),
    sa.Column("dataset_id", sa.BigInteger),
    sa.Column("base_run_id", sa.BigInteger),
    sa.Column("candidate_run_id", sa.BigInteger),
    sa.Column("n_gold", sa.Float),
    sa.Column("n_reference", sa.Float),
    sa.Column("base_roc_auc", sa.Float),
    sa.Column("candidate_roc_auc", sa.Float),
    sa.Column("base_f1", sa.Float),
    sa.Column("candidate_f1", sa.Float),
    sa.Column("base_accuracy", sa.Float),
    sa.Column("candidate_accuracy", sa.Float),
    sa.Column("base_error_rate", sa.Float),
    sa.Column("candidate_error_rate", sa.Float),
)

# 0008_quality_by_group: run_quality's figures per run and dataset / manifest source.
run_quality_by_dataset = _view(
    "run_quality_by_dataset",
    sa.Column("run_id", sa.BigInteger),
    sa.Column("task", sa.Text),
    sa.Column("model", sa.Text),
    sa.Column("revision", sa.Text),
    sa.Column("prompt_version", sa.Text),
    sa.Column("grouping", sa.Text),
    sa.Column("group_name", sa.Text),
    sa.Column("split", sa.Text),
    sa.Column("n_results", sa.Float),
    *_quality_figures(),
    sa.Column("metrics_computed_at", sa.DateTime(timezone=True)),
)

# 0009_questions_and_run_datasets: the question each clip is asked (its audio-QA line's own), when it has one.
cry_question = _view(
    "cry_question",
    sa.Column("audio_id", sa.BigInteger),
    sa.Column("question", sa.Text),
    sa.Column("manifest_item_id", sa.BigInteger),
)

VIEWS: tuple[sa.Table, ...] = (
    run_progress, audio_path, cry_gold, asr_reference, latest_label, review_queue, run_quality,
    model_version_quality, dataset_summary, model_version_evaluation, run_quality_by_dataset, cry_question,
)  # fmt: skip

# 0018_cry_run_clip: per cry run and clip, both methods' answers side by side with the clip's gold label
# and manifest source (kept by triggers): what `metrics` and `report` of a cry run read.
cry_run_clip = sa.Table(
    "cry_run_clip",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("label_run.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("audio_id", sa.BigInteger, sa.ForeignKey("audio.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("s_label", sa.Text),
    sa.Column("s_p", sa.Float),
    sa.Column("s_threshold", sa.Float),
    sa.Column("s_calibrated", sa.Float),
    sa.Column("g_label", sa.Text),
    sa.Column("g_p", sa.Float),
    sa.Column("g_threshold", sa.Float),
    sa.Column("g_calibrated", sa.Float),
    sa.Column("g_truncated", sa.Boolean),
    sa.Column("gold_label", sa.Text),
    sa.Column("source", sa.Text),
)

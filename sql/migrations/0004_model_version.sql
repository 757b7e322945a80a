-- 0004: fine-tuned model versions (LoRA adapters trained on reviewed labels), the stored train / held-out
-- split they were trained and evaluated on, and evaluation runs kept apart from production labels.
-- `qwen-tasks finetune` writes these (qwen_tasks.finetune, qwen_tasks.registry).
-- depends: 0003_review_views

-- Why a run exists: 'label' (the nightly DAG, `qwen-tasks label`) or 'evaluation' (a fine-tune's base /
-- candidate runs over the held-out split). Evaluation labels are real labels of real runs, so
-- run_quality, metrics and the report see them; they are left out of latest_label and of "already
-- labelled" when planning, so a candidate that is never promoted never becomes anybody's label.
ALTER TABLE label_run
    ADD COLUMN purpose text NOT NULL DEFAULT 'label' CHECK (purpose IN ('label', 'evaluation'));

-- The train / held-out split per task, by audio content (audio rows are unique by sha256). Assigned once
-- and kept: later fine-tunes reuse it, so held-out audio is never trained on by any version.
CREATE TABLE finetune_split (
    task         text NOT NULL CHECK (task IN ('asr', 'cry')),
    audio_id     bigint NOT NULL REFERENCES audio (id),
    part         text NOT NULL CHECK (part IN ('train', 'heldout')),
    assigned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, audio_id)
);

CREATE TABLE model_version (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    task              text NOT NULL CHECK (task IN ('asr', 'cry')),
    base_model        text NOT NULL,              -- hub id or absolute path, as label_run.model records it
    base_revision     text NOT NULL DEFAULT '',
    adapter_path      text NOT NULL,              -- peft save_pretrained directory
    adapter_sha256    text NOT NULL,              -- of adapter_model.safetensors
    revision          text NOT NULL,              -- label_run.revision of runs with this version
    prompt_version    text NOT NULL,              -- the labelling prompt it was trained with
    request           jsonb NOT NULL,             -- the LabelRequest (question, language, ...)
    data_digest       text NOT NULL,              -- sha256 over (audio sha256, answer) of the training rows
    counts            jsonb NOT NULL,             -- {"train": {...}, "heldout": {...}} per label (cry) / clips
    hyperparams       jsonb NOT NULL,
    loss_curve        jsonb NOT NULL,             -- loss per optimiser step, and per epoch
    train_seconds     double precision NOT NULL,
    base_run_id       bigint REFERENCES label_run (id),  -- evaluation runs on the held-out split
    candidate_run_id  bigint REFERENCES label_run (id),
    metrics           jsonb,                      -- {"base": {...}, "candidate": {...}, "gate": {...}}
    status            text NOT NULL DEFAULT 'candidate'
                      CHECK (status IN ('candidate', 'promoted', 'rejected', 'retired')),
    status_reason     text,
    forced            boolean NOT NULL DEFAULT false,  -- promoted with --force despite the gate
    created_at        timestamptz NOT NULL DEFAULT now(),
    promoted_at       timestamptz,
    retired_at        timestamptz
);
-- The nightly run uses the promoted version of a task: at most one at a time.
CREATE UNIQUE INDEX model_version_one_promoted ON model_version (task) WHERE status = 'promoted';

-- Production labels only: evaluation runs are left out (see label_run.purpose). Same columns as in 0003.
CREATE OR REPLACE VIEW latest_label AS
WITH model_cry AS (
    SELECT DISTINCT ON (c.audio_id)
        c.audio_id, 'cry'::text AS task, c.label, NULL::text AS text, c.p_yes, c.run_id, c.method
    FROM cry_answer c
    JOIN label_run lr ON lr.id = c.run_id AND lr.purpose = 'label'
    ORDER BY c.audio_id, c.run_id DESC, (c.method = 'score') DESC
), model_asr AS (
    SELECT DISTINCT ON (t.audio_id)
        t.audio_id, 'asr'::text AS task, NULL::text AS label, t.text, NULL::double precision AS p_yes,
        t.run_id, NULL::text AS method
    FROM transcription t
    JOIN label_run lr ON lr.id = t.run_id AND lr.purpose = 'label'
    ORDER BY t.audio_id, t.run_id DESC
), model AS (
    SELECT * FROM model_cry
    UNION ALL
    SELECT * FROM model_asr
)
SELECT
    coalesce(h.audio_id, m.audio_id)                        AS audio_id,
    coalesce(h.task, m.task)                                AS task,
    CASE WHEN h.id IS NOT NULL THEN h.label ELSE m.label END AS label,
    CASE WHEN h.id IS NOT NULL THEN h.text ELSE m.text END   AS text,
    CASE WHEN h.id IS NOT NULL THEN 'human' ELSE 'model' END AS source,
    m.label                                                 AS model_label,
    m.text                                                  AS model_text,
    m.p_yes,
    m.method,
    m.run_id,
    r.model,
    r.prompt_version,
    h.reviewer,
    p.path
FROM model m
FULL JOIN human_label h ON h.audio_id = m.audio_id AND h.task = m.task
LEFT JOIN label_run r ON r.id = m.run_id
LEFT JOIN audio_path p ON p.audio_id = coalesce(h.audio_id, m.audio_id);

-- Base vs candidate on the same held-out audio, one row per model version (what `models` prints).
CREATE VIEW model_version_quality AS
SELECT
    v.name,
    v.task,
    v.status,
    v.base_model,
    v.revision,
    v.created_at,
    v.base_run_id,
    v.candidate_run_id,
    b.n_gold            AS heldout_gold,
    b.score_roc_auc     AS base_roc_auc,
    c.score_roc_auc     AS candidate_roc_auc,
    b.score_f1          AS base_f1,
    c.score_f1          AS candidate_f1,
    b.score_accuracy    AS base_accuracy,
    c.score_accuracy    AS candidate_accuracy,
    b.n_reference       AS heldout_references,
    b.error_rate        AS base_error_rate,
    c.error_rate        AS candidate_error_rate
FROM model_version v
LEFT JOIN run_quality b ON b.run_id = v.base_run_id
LEFT JOIN run_quality c ON c.run_id = v.candidate_run_id;

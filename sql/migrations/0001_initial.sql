-- 0001: the whole pipeline's core schema.
-- files -> audio (content, by sha256) -> manifest_item -> label_run / label_job -> results -> run_metric.
-- Applied by `qwen-tasks db upgrade` (yoyo-migrations). Never edit once landed: add a new file.

-- Audio content, identified by its bytes. Two paths with the same bytes share one row.
CREATE TABLE audio (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sha256       text NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes   bigint NOT NULL CHECK (size_bytes > 0),
    duration_s   double precision NOT NULL CHECK (duration_s > 0 AND duration_s < 'Infinity'),
    sample_rate  integer NOT NULL CHECK (sample_rate > 0),
    channels     smallint NOT NULL CHECK (channels > 0),
    frames       bigint NOT NULL CHECK (frames > 0),
    format       text NOT NULL,
    subtype      text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audio_duration_idx ON audio (duration_s);

-- Every path we have seen, good or bad. Quarantined paths keep their reason; nothing is dropped.
CREATE TABLE audio_file (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    path        text NOT NULL UNIQUE,
    audio_id    bigint REFERENCES audio (id),
    size_bytes  bigint CHECK (size_bytes >= 0),
    mtime_ns    bigint,
    status      text NOT NULL CHECK (status IN ('ok', 'quarantined', 'missing')),
    reason      text,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audio_file_ok_has_audio CHECK ((status = 'ok') = (audio_id IS NOT NULL)),
    CONSTRAINT audio_file_quarantine_has_reason CHECK (status <> 'quarantined' OR reason IS NOT NULL)
);
CREATE INDEX audio_file_audio_idx ON audio_file (audio_id);
CREATE INDEX audio_file_status_idx ON audio_file (status) WHERE status <> 'ok';

-- One row per line of a jsonl manifest (ASR: reference text; AQA: question, gt, gold label, source).
CREATE TABLE manifest_item (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    manifest_path   text NOT NULL,
    line_no         integer NOT NULL CHECK (line_no > 0),
    kind            text NOT NULL CHECK (kind IN ('asr', 'aqa')),
    audio_path      text NOT NULL,
    audio_file_id   bigint REFERENCES audio_file (id),
    reference_text  text,
    language        text,
    question        text,
    gt              text,
    gold_label      text CHECK (gold_label IN ('yes', 'no')),
    source          text,
    raw             jsonb NOT NULL DEFAULT '{}'::jsonb,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (manifest_path, line_no),
    CHECK (kind <> 'asr' OR reference_text IS NOT NULL)
);
CREATE INDEX manifest_item_file_idx ON manifest_item (audio_file_id);

-- A labelling run: one task, one model, one prompt version.
CREATE TABLE label_run (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task            text NOT NULL CHECK (task IN ('asr', 'cry')),
    model           text NOT NULL,
    revision        text NOT NULL DEFAULT '',
    prompt_version  text NOT NULL,
    prompt_template text,
    dtype           text,
    device          text,
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'planned'
                    CHECK (status IN ('planned', 'running', 'done', 'failed')),
    n_planned       integer NOT NULL DEFAULT 0 CHECK (n_planned >= 0),
    n_labelled      integer NOT NULL DEFAULT 0 CHECK (n_labelled >= 0),
    n_failed        integer NOT NULL DEFAULT 0 CHECK (n_failed >= 0),
    audio_seconds   double precision NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX label_run_key_idx ON label_run (task, model, revision, prompt_version);

-- A batch of audio to label; workers claim jobs with FOR UPDATE SKIP LOCKED and a lease.
CREATE TABLE label_job (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    seq               integer NOT NULL CHECK (seq >= 0),
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'done', 'failed')),
    n_items           integer NOT NULL CHECK (n_items > 0),
    audio_seconds     double precision NOT NULL DEFAULT 0,
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    lease_owner       text,
    lease_expires_at  timestamptz,
    last_error        text,
    claim_seconds     double precision,
    process_seconds   double precision,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    UNIQUE (run_id, seq)
);
CREATE INDEX label_job_claim_idx ON label_job (run_id, status, lease_expires_at)
    WHERE status IN ('pending', 'running');

-- Which audio a job covers; an audio is planned at most once per run.
CREATE TABLE label_job_item (
    job_id    bigint NOT NULL REFERENCES label_job (id) ON DELETE CASCADE,
    run_id    bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    audio_id  bigint NOT NULL REFERENCES audio (id),
    PRIMARY KEY (job_id, audio_id),
    UNIQUE (run_id, audio_id)
);

-- ASR results. `windows` holds per-window results for audio split into <= 30 s windows.
CREATE TABLE transcription (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    job_id      bigint REFERENCES label_job (id) ON DELETE SET NULL,
    audio_id    bigint NOT NULL REFERENCES audio (id),
    text        text NOT NULL,
    language    text,
    windows     jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, audio_id)
);
CREATE INDEX transcription_audio_idx ON transcription (audio_id);

-- Cry-detection results, one row per method (score: p_yes from one forward pass; generate: raw answer).
CREATE TABLE cry_answer (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    job_id      bigint REFERENCES label_job (id) ON DELETE SET NULL,
    audio_id    bigint NOT NULL REFERENCES audio (id),
    method      text NOT NULL CHECK (method IN ('score', 'generate')),
    raw_answer  text,
    p_yes       double precision CHECK (p_yes >= 0 AND p_yes <= 1),
    label       text NOT NULL CHECK (label IN ('yes', 'no', 'unknown')),
    threshold   double precision,
    windows     jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, audio_id, method),
    CHECK (method <> 'score' OR p_yes IS NOT NULL)
);
CREATE INDEX cry_answer_audio_idx ON cry_answer (audio_id);

-- Items that failed alone (bad decode, error in the model): kept with their error, never silently dropped.
CREATE TABLE label_failure (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    job_id      bigint REFERENCES label_job (id) ON DELETE SET NULL,
    audio_id    bigint NOT NULL REFERENCES audio (id),
    error       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, audio_id)
);

-- Human review results (Label Studio import); they take precedence over model labels.
CREATE TABLE human_label (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audio_id    bigint NOT NULL REFERENCES audio (id),
    task        text NOT NULL CHECK (task IN ('asr', 'cry')),
    label       text CHECK (label IN ('yes', 'no', 'unknown')),
    text        text,
    reviewer    text,
    source      text NOT NULL DEFAULT 'label-studio',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (audio_id, task),
    CHECK ((task = 'cry' AND label IS NOT NULL) OR (task = 'asr' AND text IS NOT NULL))
);

-- Quality metrics per run (WER, CER, accuracy, AUC, ...), scalar value plus details.
CREATE TABLE run_metric (
    run_id      bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    name        text NOT NULL,
    value       double precision,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, name)
);

-- 0014: live sync with a Label Studio server (`qwen-tasks review push` / `review pull`, DAG
-- qwen_audio_review_sync). One Label Studio project per (server, dataset, task); every clip pushed to a
-- project is remembered with its Label Studio task id (so no clip is pushed twice to one project, even
-- after a push killed between Label Studio's answer and our commit: the next push adopts the task by its
-- data.audio_id); every Label Studio annotation pulled is one review_annotation row (reviewer e-mail,
-- time spent, Label Studio's updated_at). human_label keeps the label resolved from them per (audio,
-- task) (qwen_tasks.review.resolution documents the rule). No credentials are stored: `server` is the
-- base URL without user info.
-- depends: 0010_current_label

CREATE TABLE review_project (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server          text NOT NULL,                 -- Label Studio base URL (no user info, no token)
    dataset_id      bigint NOT NULL REFERENCES dataset (id),
    task            text NOT NULL CHECK (task IN ('asr', 'cry')),
    ls_project_id   bigint NOT NULL,               -- Label Studio's project id
    title           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_push_at    timestamptz,
    last_pull_at    timestamptz,
    UNIQUE (server, dataset_id, task),
    UNIQUE (server, ls_project_id)
);

-- One row per clip pushed to a project (its Label Studio task).
CREATE TABLE review_task (
    project_id      bigint NOT NULL REFERENCES review_project (id) ON DELETE CASCADE,
    audio_id        bigint NOT NULL REFERENCES audio (id),
    ls_task_id      bigint NOT NULL,
    run_id          bigint REFERENCES label_run (id) ON DELETE SET NULL,  -- whose answer was the prediction
    pushed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, audio_id),
    UNIQUE (project_id, ls_task_id)
);

-- One row per Label Studio annotation (cancelled / skipped ones included, marked): who, what, how long.
CREATE TABLE review_annotation (
    project_id       bigint NOT NULL REFERENCES review_project (id) ON DELETE CASCADE,
    ls_annotation_id bigint NOT NULL,
    ls_task_id       bigint NOT NULL,
    audio_id         bigint NOT NULL REFERENCES audio (id),
    task             text NOT NULL CHECK (task IN ('asr', 'cry')),
    label            text CHECK (label IN ('yes', 'no', 'unknown')),   -- cry: the reviewer's choice
    text             text,                                             -- asr: the reviewer's transcript
    was_cancelled    boolean NOT NULL DEFAULT false,
    reviewer         text,                                             -- e-mail (else Label Studio user id)
    lead_time_s      double precision,                                 -- time spent, as Label Studio measured
    ls_created_at    timestamptz,
    ls_updated_at    timestamptz NOT NULL,
    pulled_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, ls_annotation_id)
);
CREATE INDEX review_annotation_audio_idx ON review_annotation (audio_id, task);

-- 0015: the ranked review queue (qwen_tasks.review.queue). Two things are stored:
--   transcription.mean_logprob: the mean log-probability of the tokens greedy decoding generated for the
--     transcript (end token included), read from generate's own scores at labelling time; NULL for rows
--     written before this migration and by backends that do not report it. The ASR `uncertainty`
--     strategy ranks the lowest first.
--   review_queued: one row per clip each time a queue was sent somewhere (Label Studio project, a file),
--     with the strategy that chose it and why, so a reviewed label can be traced to how it was picked
--     and quality estimates can use the `random` share only (uniform, unbiased).
-- depends: 0010_current_label

ALTER TABLE transcription ADD COLUMN mean_logprob double precision;

CREATE TABLE review_queued (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audio_id     bigint NOT NULL REFERENCES audio (id),
    task         text NOT NULL CHECK (task IN ('asr', 'cry')),
    run_id       bigint REFERENCES label_run (id) ON DELETE SET NULL,
    strategy     text NOT NULL CHECK (strategy IN ('uncertainty', 'disagreement', 'gold-conflict', 'random')),
    reason       text NOT NULL,
    priority     double precision NOT NULL,
    destination  text NOT NULL,
    queued_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX review_queued_audio_idx ON review_queued (task, audio_id);
CREATE INDEX review_queued_destination_idx ON review_queued (destination, task);

-- 0009: run_progress shows the datasets each run covered (what `qwen-tasks runs` prints), and the
-- question each clip is asked for the cry task: its audio-QA manifest line's own `question`
-- (the latest line about that audio wins, as cry_gold picks the gold label), so labelling asks what the
-- stock evaluate_aqa.py asks. Clips without such a line are asked the default question (or --question,
-- which overrides this for every clip). qwen_tasks.labelling.planning groups clips by it: one run per
-- question, whose prompt version carries a digest of the question.
-- depends: 0007_datasets

CREATE VIEW cry_question AS
SELECT DISTINCT ON (af.audio_id) af.audio_id, btrim(mi.question) AS question, mi.id AS manifest_item_id
FROM manifest_item mi
JOIN audio_file af ON af.id = mi.audio_file_id
WHERE mi.kind = 'aqa' AND btrim(coalesce(mi.question, '')) <> '' AND af.audio_id IS NOT NULL
ORDER BY af.audio_id, mi.id DESC;

-- Same columns as in 0002, plus the names of the datasets the run covered (table run_dataset, 0007).
CREATE OR REPLACE VIEW run_progress AS
SELECT
    r.id                                                          AS run_id,
    r.task,
    r.model,
    r.revision,
    r.prompt_version,
    r.status,
    r.created_at,
    r.started_at,
    r.finished_at,
    r.n_planned                                                   AS clips_planned,
    r.n_labelled                                                  AS clips_labelled,
    r.n_failed                                                    AS clips_failed,
    r.audio_seconds,
    coalesce(j.jobs, 0)                                           AS jobs,
    coalesce(j.jobs_pending, 0)                                   AS jobs_pending,
    coalesce(j.jobs_running, 0)                                   AS jobs_running,
    coalesce(j.jobs_stale, 0)                                     AS jobs_stale,
    coalesce(j.jobs_done, 0)                                      AS jobs_done,
    coalesce(j.jobs_failed, 0)                                    AS jobs_failed,
    j.clips_in_failed_jobs,
    j.busy_seconds,
    j.claim_seconds,
    extract(epoch FROM coalesce(r.finished_at, now()) - r.started_at)::double precision AS wall_seconds,
    (extract(epoch FROM coalesce(r.finished_at, now()) - r.started_at)
        / nullif(r.audio_seconds, 0))::double precision           AS rtf,
    ARRAY(SELECT d.name FROM run_dataset rd JOIN dataset d ON d.id = rd.dataset_id
          WHERE rd.run_id = r.id ORDER BY d.name)                 AS datasets
FROM label_run r
LEFT JOIN (
    SELECT
        run_id,
        count(*)                                                  AS jobs,
        count(*) FILTER (WHERE status = 'pending')                AS jobs_pending,
        count(*) FILTER (WHERE status = 'running')                AS jobs_running,
        -- running, but the lease ran out: its worker is probably gone; the next claim takes it over
        count(*) FILTER (WHERE status = 'running' AND lease_expires_at < now()) AS jobs_stale,
        count(*) FILTER (WHERE status = 'done')                   AS jobs_done,
        count(*) FILTER (WHERE status = 'failed')                 AS jobs_failed,
        coalesce(sum(n_items) FILTER (WHERE status = 'failed'), 0) AS clips_in_failed_jobs,
        sum(process_seconds)                                      AS busy_seconds,
        sum(claim_seconds)                                        AS claim_seconds
    FROM label_job
    GROUP BY run_id
) j ON j.run_id = r.id;

-- 0002: progress of labelling runs, one row per run (what `qwen-tasks runs` shows).
-- Counters come from label_run (updated in the same transaction as each job's results) and from the
-- jobs themselves; nothing here is stored twice. wall_seconds counts to now() while a run is unfinished.
-- depends: 0001_initial

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
        / nullif(r.audio_seconds, 0))::double precision           AS rtf
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

-- 0018: a cry run's clips kept by triggers (issue 26, docs/sql.md "Session of 0018"). `qwen-tasks
-- metrics` and `report` of a cry run built, at every call, a per-clip table from the run's answers (1 M
-- at production scale) joined to cry_gold, and calibration and the report joined them to cry_gold again:
-- 8.9 s and 5.4 s. Now:
--   cry_run_clip: per cry run and clip, both methods' answer side by side (label, p_yes, threshold,
--     p_calibrated; truncated for generate), the clip's gold label (cry_gold) and manifest source (its
--     latest audio-QA line with one), refreshed for the clips a statement touches on cry_answer,
--     human_label, manifest_item and audio_file; a run deleted cascades. Metrics and the report read it
--     by its primary key (run_id, audio_id): one narrow row per clip, the gold already there.
-- The refresh follows review_item's (0017): the clips are locked first (clip_lock), then the rows are
-- computed once and written as an upsert of the rows that changed plus a delete of the rows that went.
-- review_item_refresh is rewritten the same way: it computed its items twice (delete pass, insert pass).
-- depends: 0017_dataset_counts

CREATE TABLE cry_run_clip (
    run_id          bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    audio_id        bigint NOT NULL REFERENCES audio (id) ON DELETE CASCADE,
    s_label         text,              -- the score answer (NULL: none)
    s_p             double precision,
    s_threshold     double precision,
    s_calibrated    double precision,  -- its p_calibrated
    g_label         text,              -- the generate answer (NULL: none)
    g_p             double precision,
    g_threshold     double precision,
    g_calibrated    double precision,
    g_truncated     boolean,
    gold_label      text,              -- cry_gold's
    source          text,              -- the source of the clip's latest aqa manifest line with one
    PRIMARY KEY (run_id, audio_id)
);
CREATE INDEX cry_run_clip_audio_idx ON cry_run_clip (audio_id);

-- The rows of clips `ids`, from the answers, cry_gold and manifest_item as they are now. Gold and source
-- are lateral lookups by audio_id (OFFSET 0: not a hash of the whole of cry_gold, see review_item_rows).
CREATE FUNCTION cry_run_clip_rows(ids bigint[]) RETURNS SETOF cry_run_clip
LANGUAGE sql STABLE AS $$
    SELECT p.run_id, p.audio_id, p.s_label, p.s_p, p.s_threshold, p.s_calibrated,
           p.g_label, p.g_p, p.g_threshold, p.g_calibrated, p.g_truncated, gd.gold_label, src.source
    FROM (
        SELECT a.run_id, a.audio_id,
               max(a.label) FILTER (WHERE a.method = 'score')            AS s_label,
               max(a.p_yes) FILTER (WHERE a.method = 'score')            AS s_p,
               max(a.threshold) FILTER (WHERE a.method = 'score')        AS s_threshold,
               max(a.p_calibrated) FILTER (WHERE a.method = 'score')     AS s_calibrated,
               max(a.label) FILTER (WHERE a.method = 'generate')         AS g_label,
               max(a.p_yes) FILTER (WHERE a.method = 'generate')         AS g_p,
               max(a.threshold) FILTER (WHERE a.method = 'generate')     AS g_threshold,
               max(a.p_calibrated) FILTER (WHERE a.method = 'generate')  AS g_calibrated,
               bool_or(a.truncated) FILTER (WHERE a.method = 'generate') AS g_truncated
        FROM cry_answer a
        WHERE a.audio_id = ANY (ids)
        GROUP BY a.run_id, a.audio_id
    ) p
    LEFT JOIN LATERAL (SELECT c.gold_label FROM cry_gold c WHERE c.audio_id = p.audio_id OFFSET 0) gd ON true
    LEFT JOIN LATERAL (
        SELECT mi.source
        FROM manifest_item mi JOIN audio_file af ON af.id = mi.audio_file_id
        WHERE af.audio_id = p.audio_id AND mi.kind = 'aqa' AND mi.source IS NOT NULL
        ORDER BY mi.id DESC LIMIT 1
    ) src ON true
$$;

-- The rows of clips `ids` made what cry_run_clip_rows says now, computed once: rows that went are
-- deleted, the others upserted (an unchanged row is not rewritten).
CREATE FUNCTION cry_run_clip_refresh(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clip_lock(ids);
    WITH fresh AS MATERIALIZED (SELECT * FROM cry_run_clip_rows(ids)),
    gone AS (
        DELETE FROM cry_run_clip r
        WHERE r.audio_id = ANY (ids)
          AND NOT EXISTS (SELECT 1 FROM fresh f WHERE f.run_id = r.run_id AND f.audio_id = r.audio_id)
    )
    INSERT INTO cry_run_clip SELECT * FROM fresh
    ON CONFLICT (run_id, audio_id) DO UPDATE
    SET s_label = EXCLUDED.s_label, s_p = EXCLUDED.s_p, s_threshold = EXCLUDED.s_threshold,
        s_calibrated = EXCLUDED.s_calibrated, g_label = EXCLUDED.g_label, g_p = EXCLUDED.g_p,
        g_threshold = EXCLUDED.g_threshold, g_calibrated = EXCLUDED.g_calibrated,
        g_truncated = EXCLUDED.g_truncated, gold_label = EXCLUDED.gold_label, source = EXCLUDED.source
    WHERE (cry_run_clip.*) IS DISTINCT FROM (EXCLUDED.*);
END $$;

-- Every row from scratch (the backfill below, and after a TRUNCATE), 20,000 clips at a time, by the
-- refresh's own rows function.
CREATE FUNCTION cry_run_clip_rebuild() RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    chunk bigint[];
BEGIN
    LOCK TABLE cry_run_clip IN EXCLUSIVE MODE;
    DELETE FROM cry_run_clip;
    FOR chunk IN SELECT array_agg(DISTINCT audio_id ORDER BY audio_id) FROM cry_answer
                 GROUP BY audio_id / 20000 ORDER BY audio_id / 20000 LOOP
        INSERT INTO cry_run_clip SELECT * FROM cry_run_clip_rows(chunk);
    END LOOP;
END $$;

-- review_item_refresh (0017) computed review_item_rows twice (the delete pass, the insert pass): now
-- once, as above. Same rows: items that went are deleted, changed ones updated, new ones inserted.
CREATE OR REPLACE FUNCTION review_item_refresh(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clip_lock(ids);
    WITH fresh AS MATERIALIZED (SELECT * FROM review_item_rows(ids)),
    gone AS (
        DELETE FROM review_item r
        WHERE r.audio_id = ANY (ids)
          AND NOT EXISTS (SELECT 1 FROM fresh f
                          WHERE f.run_id = r.run_id AND f.task = r.task AND f.audio_id = r.audio_id)
    )
    INSERT INTO review_item SELECT * FROM fresh
    ON CONFLICT (run_id, task, audio_id) DO UPDATE
    SET reasons = EXCLUDED.reasons, label = EXCLUDED.label, p_yes = EXCLUDED.p_yes,
        threshold = EXCLUDED.threshold, generate_label = EXCLUDED.generate_label,
        gold_label = EXCLUDED.gold_label, gold_source = EXCLUDED.gold_source,
        error_rate = EXCLUDED.error_rate, priority = EXCLUDED.priority
    WHERE (review_item.*) IS DISTINCT FROM (EXCLUDED.*);
END $$;

-- The statement trigger function of 0017 with one more kind of refresh, 'clips' (cry_run_clip): same
-- clips as the others (every clip in the old and new rows of the answers and human_label, the clips of
-- the manifest lines' files, the clips of audio_file rows whose status or clip changed).
CREATE OR REPLACE FUNCTION clip_facts_changed() RETURNS trigger
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF 'lock' = ANY (TG_ARGV) THEN
            RETURN NULL;
        END IF;
        IF 'counts' = ANY (TG_ARGV) THEN
            PERFORM dataset_counts_rebuild();
        END IF;
        IF 'review' = ANY (TG_ARGV) THEN
            PERFORM review_item_rebuild();
        END IF;
        IF 'clips' = ANY (TG_ARGV) THEN
            PERFORM cry_run_clip_rebuild();
        END IF;
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'manifest_item' THEN
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            SELECT array_agg(DISTINCT f.audio_id) INTO ids
            FROM new_rows n JOIN audio_file f ON f.id = n.audio_file_id WHERE f.audio_id IS NOT NULL;
        END IF;
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            SELECT ids || array_agg(DISTINCT f.audio_id) INTO ids
            FROM old_rows o JOIN audio_file f ON f.id = o.audio_file_id WHERE f.audio_id IS NOT NULL;
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT n.audio_id) INTO ids FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT o.audio_id) INTO ids FROM old_rows o;
    ELSIF TG_TABLE_NAME = 'audio_file' THEN
        SELECT array_agg(DISTINCT a.audio_id) INTO ids
        FROM old_rows o JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL (VALUES (o.audio_id), (n.audio_id)) a (audio_id)
        WHERE (o.status, o.audio_id) IS DISTINCT FROM (n.status, n.audio_id) AND a.audio_id IS NOT NULL;
    ELSIF TG_TABLE_NAME = 'current_label' THEN
        SELECT array_agg(DISTINCT n.audio_id) INTO ids
        FROM old_rows o JOIN new_rows n ON n.audio_id = o.audio_id AND n.task = o.task
        WHERE (o.run_id IS NULL) <> (n.run_id IS NULL);
    ELSIF TG_TABLE_NAME = 'audio' THEN
        SELECT array_agg(n.id) INTO ids
        FROM old_rows o JOIN new_rows n ON n.id = o.id WHERE o.duration_s <> n.duration_s;
    ELSE  -- human_label, the answers, utterance_score: every clip in the old and new rows
        SELECT array_agg(DISTINCT a.audio_id) INTO ids
        FROM (SELECT audio_id FROM old_rows UNION SELECT audio_id FROM new_rows) a;
    END IF;
    ids := array_remove(ids, NULL);
    IF coalesce(cardinality(ids), 0) = 0 THEN
        RETURN NULL;
    END IF;
    IF 'lock' = ANY (TG_ARGV) THEN
        PERFORM clip_lock(ids);
    END IF;
    IF 'counts' = ANY (TG_ARGV) THEN
        PERFORM dataset_clip_refresh(ids);
    END IF;
    IF 'review' = ANY (TG_ARGV) THEN
        PERFORM review_item_refresh(ids);
    END IF;
    IF 'clips' = ANY (TG_ARGV) THEN
        PERFORM cry_run_clip_refresh(ids);
    END IF;
    RETURN NULL;
END $$;

-- keep_run_clips_* fire after clip_lock_* and keep_facts_* (name order): the clips are locked already.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['cry_answer', 'human_label', 'manifest_item', 'audio_file'] LOOP
        EXECUTE format('CREATE TRIGGER keep_run_clips_insert AFTER INSERT ON %I REFERENCING NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(''clips'')', t);
        EXECUTE format('CREATE TRIGGER keep_run_clips_update AFTER UPDATE ON %I '
                       'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(''clips'')', t);
        EXECUTE format('CREATE TRIGGER keep_run_clips_delete AFTER DELETE ON %I REFERENCING OLD TABLE AS old_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(''clips'')', t);
        EXECUTE format('CREATE TRIGGER keep_run_clips_truncate AFTER TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(''clips'')', t);
    END LOOP;
END $$;

-- Existing data.
DO $$ BEGIN PERFORM cry_run_clip_rebuild(); END $$;

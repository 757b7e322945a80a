-- 0017: dataset_summary from counts kept by triggers (issue 26, docs/sql.md). The view read every member
-- clip (1 M at production scale) and computed cry_gold / asr_reference whole on each call: 4.7 s. Now:
--   dataset_clip: per clip, what it adds to each dataset it belongs to (readable, seconds, labelled per
--     task, reference, gold), recomputed for the clips a statement touches on audio_file, audio,
--     current_label, human_label and manifest_item;
--   dataset_count: per dataset, rows of differences (one per dataset and statement that changed
--     something, never an update of a shared row, so concurrent writers never wait on each other here);
--     the view sums them. Membership changes (dataset_audio) add or subtract the clip's stored part.
-- Lock order: the dataset_clip rows of a statement are locked in audio_id order before they are read
-- again (a later statement, so a fresh snapshot sees what a writer that held them committed); the
-- dataset_clip row is the clip's lock for review_item too. The triggers are named keep_facts_* so that,
-- on a table that also has current_label_* triggers, they fire after those (alphabetical order):
-- current_label rows, then dataset_clip rows, as a worker takes them.
--   review_item: per run and clip, what review_queue ranks by (reasons, priority and what it is computed
--     from), refreshed for the clips a statement touches on the answers, utterance_score, human_label,
--     manifest_item and audio_file; indexed on (run_id, priority DESC, audio_id), so the first items of a
--     run are an index walk. The review_queue view keeps its columns and reads it.
-- depends: 0011_sql_at_scale

CREATE TABLE dataset_clip (
    audio_id        bigint PRIMARY KEY REFERENCES audio (id) ON DELETE CASCADE,
    clips           smallint NOT NULL DEFAULT 0,          -- 1: has a readable path
    audio_seconds   double precision NOT NULL DEFAULT 0,  -- its duration when readable
    asr_labelled    smallint NOT NULL DEFAULT 0,          -- readable and a model label (asr)
    cry_labelled    smallint NOT NULL DEFAULT 0,          -- readable and a model label (cry)
    asr_references  smallint NOT NULL DEFAULT 0,          -- rows in asr_reference
    cry_gold        smallint NOT NULL DEFAULT 0,          -- rows in cry_gold
    cry_gold_yes    smallint NOT NULL DEFAULT 0,
    cry_gold_no     smallint NOT NULL DEFAULT 0
);

CREATE TABLE dataset_count (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset_id      bigint NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    clips           bigint NOT NULL,
    audio_seconds   numeric NOT NULL,  -- exact, so additions and subtractions cancel
    asr_labelled    bigint NOT NULL,
    cry_labelled    bigint NOT NULL,
    asr_references  bigint NOT NULL,
    cry_gold        bigint NOT NULL,
    cry_gold_yes    bigint NOT NULL,
    cry_gold_no     bigint NOT NULL
);
CREATE INDEX dataset_count_dataset_idx ON dataset_count (dataset_id);

-- What the clips `ids` add to a dataset now (the 0011 dataset_summary's rules, per clip).
CREATE FUNCTION dataset_clip_parts(ids bigint[])
RETURNS TABLE (audio_id bigint, clips smallint, audio_seconds double precision, asr_labelled smallint,
               cry_labelled smallint, asr_references smallint, cry_gold smallint, cry_gold_yes smallint,
               cry_gold_no smallint)
LANGUAGE sql STABLE AS $$
    SELECT a.id, k.ok::int::smallint, CASE WHEN k.ok THEN a.duration_s ELSE 0 END,
           (k.ok AND EXISTS (SELECT 1 FROM current_label c
                             WHERE c.audio_id = a.id AND c.task = 'asr' AND c.run_id IS NOT NULL))::int::smallint,
           (k.ok AND EXISTS (SELECT 1 FROM current_label c
                             WHERE c.audio_id = a.id AND c.task = 'cry' AND c.run_id IS NOT NULL))::int::smallint,
           EXISTS (SELECT 1 FROM asr_reference r WHERE r.audio_id = a.id)::int::smallint,
           g.n::smallint, g.yes::smallint, g.no::smallint
    FROM unnest(ids) i (audio_id)
    JOIN audio a ON a.id = i.audio_id
    CROSS JOIN LATERAL (SELECT EXISTS (SELECT 1 FROM audio_file f
                                       WHERE f.audio_id = a.id AND f.status = 'ok') AS ok) k
    CROSS JOIN LATERAL (SELECT count(*) AS n, count(*) FILTER (WHERE gd.gold_label = 'yes') AS yes,
                               count(*) FILTER (WHERE gd.gold_label = 'no') AS no
                        FROM cry_gold gd WHERE gd.audio_id = a.id) g
$$;

-- The clips' lock: their dataset_clip rows (a zero row made for a clip without one, which has added
-- nothing yet), locked in audio_id order.
CREATE FUNCTION clip_lock(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO dataset_clip (audio_id)
    SELECT DISTINCT i.audio_id FROM unnest(ids) i (audio_id) JOIN audio a ON a.id = i.audio_id
    ORDER BY 1
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM dataset_clip c WHERE c.audio_id = ANY (ids) ORDER BY c.audio_id FOR UPDATE;
END $$;

-- Recompute the parts of clips `ids` (not empty) and add the differences to each dataset they belong to.
CREATE FUNCTION dataset_clip_refresh(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clip_lock(ids);
    WITH fresh AS (
        SELECT * FROM dataset_clip_parts(ARRAY(SELECT DISTINCT unnest(ids)))
    ), changed AS (
        UPDATE dataset_clip c
        SET clips = f.clips, audio_seconds = f.audio_seconds, asr_labelled = f.asr_labelled,
            cry_labelled = f.cry_labelled, asr_references = f.asr_references, cry_gold = f.cry_gold,
            cry_gold_yes = f.cry_gold_yes, cry_gold_no = f.cry_gold_no
        FROM fresh f, dataset_clip o
        WHERE c.audio_id = f.audio_id AND o.audio_id = f.audio_id
          AND (o.clips, o.audio_seconds, o.asr_labelled, o.cry_labelled, o.asr_references, o.cry_gold,
               o.cry_gold_yes, o.cry_gold_no)
              IS DISTINCT FROM (f.clips, f.audio_seconds, f.asr_labelled, f.cry_labelled, f.asr_references,
                                f.cry_gold, f.cry_gold_yes, f.cry_gold_no)
        RETURNING c.audio_id, f.clips - o.clips AS clips,
                  f.audio_seconds::numeric - o.audio_seconds::numeric AS audio_seconds,
                  f.asr_labelled - o.asr_labelled AS asr_labelled, f.cry_labelled - o.cry_labelled AS cry_labelled,
                  f.asr_references - o.asr_references AS asr_references, f.cry_gold - o.cry_gold AS cry_gold,
                  f.cry_gold_yes - o.cry_gold_yes AS cry_gold_yes, f.cry_gold_no - o.cry_gold_no AS cry_gold_no
    )
    INSERT INTO dataset_count (dataset_id, clips, audio_seconds, asr_labelled, cry_labelled, asr_references,
                               cry_gold, cry_gold_yes, cry_gold_no)
    SELECT da.dataset_id, sum(d.clips), sum(d.audio_seconds), sum(d.asr_labelled), sum(d.cry_labelled),
           sum(d.asr_references), sum(d.cry_gold), sum(d.cry_gold_yes), sum(d.cry_gold_no)
    FROM changed d
    JOIN dataset_audio da ON da.audio_id = d.audio_id
    GROUP BY da.dataset_id;
END $$;

-- Every clip and every dataset from scratch (the backfill below, and after a TRUNCATE).
CREATE FUNCTION dataset_counts_rebuild() RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    LOCK TABLE dataset_clip, dataset_count IN EXCLUSIVE MODE;
    DELETE FROM dataset_count;
    DELETE FROM dataset_clip;
    INSERT INTO dataset_clip
    SELECT a.id,
           (ok.audio_id IS NOT NULL)::int::smallint,
           CASE WHEN ok.audio_id IS NOT NULL THEN a.duration_s ELSE 0 END,
           (ok.audio_id IS NOT NULL AND la.audio_id IS NOT NULL)::int::smallint,
           (ok.audio_id IS NOT NULL AND lc.audio_id IS NOT NULL)::int::smallint,
           (ar.audio_id IS NOT NULL)::int::smallint,
           coalesce(g.n, 0)::smallint, coalesce(g.yes, 0)::smallint, coalesce(g.no, 0)::smallint
    FROM audio a
    LEFT JOIN (SELECT DISTINCT f.audio_id FROM audio_file f WHERE f.status = 'ok') ok ON ok.audio_id = a.id
    LEFT JOIN current_label lc ON lc.audio_id = a.id AND lc.task = 'cry' AND lc.run_id IS NOT NULL
    LEFT JOIN current_label la ON la.audio_id = a.id AND la.task = 'asr' AND la.run_id IS NOT NULL
    LEFT JOIN (SELECT DISTINCT r.audio_id FROM asr_reference r) ar ON ar.audio_id = a.id
    LEFT JOIN (SELECT gd.audio_id, count(*) AS n, count(*) FILTER (WHERE gd.gold_label = 'yes') AS yes,
                      count(*) FILTER (WHERE gd.gold_label = 'no') AS no
               FROM cry_gold gd GROUP BY gd.audio_id) g ON g.audio_id = a.id
    ORDER BY a.id;
    INSERT INTO dataset_count (dataset_id, clips, audio_seconds, asr_labelled, cry_labelled, asr_references,
                               cry_gold, cry_gold_yes, cry_gold_no)
    SELECT da.dataset_id, sum(c.clips), sum(c.audio_seconds::numeric), sum(c.asr_labelled),
           sum(c.cry_labelled), sum(c.asr_references), sum(c.cry_gold), sum(c.cry_gold_yes),
           sum(c.cry_gold_no)
    FROM dataset_audio da JOIN dataset_clip c ON c.audio_id = da.audio_id
    GROUP BY da.dataset_id;
END $$;

-- The clips a statement on one of the fact tables touched (only real changes of audio_file and
-- current_label count: an ingest re-scan rewrites every file row it sees, a worker every label).
-- jit = off for the refreshes it runs, whatever the session's setting: their plans are estimated far
-- above jit_above_cost, and compiling took ~1 s per 1,000-clip statement at 1 M clips (0.27 s without).
CREATE FUNCTION clip_facts_changed() RETURNS trigger
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
    RETURN NULL;
END $$;

CREATE TRIGGER keep_facts_update AFTER UPDATE ON audio
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed('counts');

-- Membership: a clip that joins (leaves) a dataset adds (subtracts) its stored part; its row is locked
-- first, so a concurrent refresh of the clip either ran before (its part is read here) or runs after
-- (and sees the membership). A dataset deleted takes its counts with it (ON DELETE CASCADE).
CREATE FUNCTION dataset_counts_members_changed() RETURNS trigger
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM dataset_count;
        RETURN NULL;
    END IF;
    -- a clip without a row has added nothing yet: a zero row is made, so that it can be locked
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT n.audio_id) INTO ids FROM new_rows n;
        INSERT INTO dataset_clip (audio_id) SELECT i FROM unnest(ids) i ORDER BY 1 ON CONFLICT DO NOTHING;
    ELSE
        SELECT array_agg(DISTINCT o.audio_id) INTO ids FROM old_rows o;
    END IF;
    PERFORM 1 FROM dataset_clip c WHERE c.audio_id = ANY (ids) ORDER BY c.audio_id FOR UPDATE;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dataset_count (dataset_id, clips, audio_seconds, asr_labelled, cry_labelled,
                                   asr_references, cry_gold, cry_gold_yes, cry_gold_no)
        SELECT m.dataset_id, sum(c.clips), sum(c.audio_seconds::numeric), sum(c.asr_labelled),
               sum(c.cry_labelled), sum(c.asr_references), sum(c.cry_gold), sum(c.cry_gold_yes),
               sum(c.cry_gold_no)
        FROM new_rows m JOIN dataset_clip c ON c.audio_id = m.audio_id
        GROUP BY m.dataset_id;
    ELSE
        INSERT INTO dataset_count (dataset_id, clips, audio_seconds, asr_labelled, cry_labelled,
                                   asr_references, cry_gold, cry_gold_yes, cry_gold_no)
        SELECT m.dataset_id, -sum(c.clips), -sum(c.audio_seconds::numeric), -sum(c.asr_labelled),
               -sum(c.cry_labelled), -sum(c.asr_references), -sum(c.cry_gold), -sum(c.cry_gold_yes),
               -sum(c.cry_gold_no)
        FROM old_rows m JOIN dataset_clip c ON c.audio_id = m.audio_id
        WHERE EXISTS (SELECT 1 FROM dataset d WHERE d.id = m.dataset_id)  -- not when the dataset goes
        GROUP BY m.dataset_id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER keep_facts_insert AFTER INSERT ON dataset_audio
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION dataset_counts_members_changed();
CREATE TRIGGER keep_facts_delete AFTER DELETE ON dataset_audio
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION dataset_counts_members_changed();
CREATE TRIGGER keep_facts_truncate AFTER TRUNCATE ON dataset_audio
    FOR EACH STATEMENT EXECUTE FUNCTION dataset_counts_members_changed();

-- A dataset's rows of differences folded into one (the backfill; also callable at any time, e.g. from a
-- maintenance job: the sums do not change).
CREATE FUNCTION dataset_count_compact() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE dataset_count IN EXCLUSIVE MODE;
    CREATE TEMP TABLE dataset_count_sums ON COMMIT DROP AS
    SELECT dataset_id, sum(clips) AS clips, sum(audio_seconds) AS audio_seconds,
           sum(asr_labelled) AS asr_labelled, sum(cry_labelled) AS cry_labelled,
           sum(asr_references) AS asr_references, sum(cry_gold) AS cry_gold,
           sum(cry_gold_yes) AS cry_gold_yes, sum(cry_gold_no) AS cry_gold_no
    FROM dataset_count GROUP BY dataset_id;
    DELETE FROM dataset_count;
    INSERT INTO dataset_count (dataset_id, clips, audio_seconds, asr_labelled, cry_labelled, asr_references,
                               cry_gold, cry_gold_yes, cry_gold_no)
    SELECT * FROM dataset_count_sums;
    DROP TABLE dataset_count_sums;
END $$;

-- What review_queue (0011) ranks, per run and clip, for clips `ids`: its inner query and priority, less
-- the wide columns it looks up for the rows it returns (path, raw answer, transcript, reference). Gold
-- and reference are lateral lookups by audio_id (index scans of their branches; OFFSET 0 keeps the
-- planner from pulling them up into a join it hashes over the whole of cry_gold / asr_reference, which
-- took 5 s at 1 M clips for a 1,000-clip job).
CREATE TABLE review_item (
    run_id          bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    task            text NOT NULL,
    audio_id        bigint NOT NULL REFERENCES audio (id) ON DELETE CASCADE,
    reasons         text[] NOT NULL,
    label           text,
    p_yes           double precision,
    threshold       double precision,
    generate_label  text,
    gold_label      text,
    gold_source     text,
    error_rate      double precision,
    priority        double precision NOT NULL,
    PRIMARY KEY (run_id, task, audio_id)
);
CREATE INDEX review_item_rank_idx ON review_item (run_id, priority DESC, audio_id);
CREATE INDEX review_item_audio_idx ON review_item (audio_id);

CREATE FUNCTION review_item_rows(ids bigint[]) RETURNS SETOF review_item
LANGUAGE sql STABLE AS $$
    SELECT i.run_id, i.task, i.audio_id, i.reasons, i.label, i.p_yes, i.threshold, i.generate_label,
           i.gold_label, i.gold_source, i.error_rate,
           cardinality(i.reasons) * 10
               + CASE WHEN 'disagrees_with_gold' = ANY (i.reasons) THEN 20 ELSE 0 END
               + coalesce(least(i.error_rate, 5), 0)
               + coalesce(greatest(0, 1 - 10 * abs(i.p_yes - coalesce(i.threshold, 0.5))), 0)
    FROM (
        SELECT
            a.run_id, 'cry'::text AS task, a.audio_id,
            array_remove(ARRAY[
                CASE WHEN gd.gold_label IS NOT NULL AND (
                    (s.label IN ('yes', 'no') AND s.label <> gd.gold_label) OR
                    (g.label IN ('yes', 'no') AND g.label <> gd.gold_label))
                    THEN 'disagrees_with_gold' END,
                CASE WHEN 'unknown' IN (s.label, g.label) THEN 'unknown' END,
                CASE WHEN abs(s.p_yes - coalesce(s.threshold, 0.5)) < 0.1 THEN 'near_threshold' END,
                CASE WHEN s.label IN ('yes', 'no') AND g.label IN ('yes', 'no')
                    AND s.label <> g.label THEN 'methods_disagree' END
            ], NULL)                                         AS reasons,
            coalesce(s.label, g.label)                       AS label,
            s.p_yes, s.threshold, g.label AS generate_label,
            gd.gold_label, gd.source AS gold_source,
            NULL::double precision AS error_rate
        FROM cry_answer a
        LEFT JOIN cry_answer s ON s.run_id = a.run_id AND s.audio_id = a.audio_id AND s.method = 'score'
        LEFT JOIN cry_answer g ON g.run_id = a.run_id AND g.audio_id = a.audio_id AND g.method = 'generate'
        LEFT JOIN LATERAL (SELECT * FROM cry_gold c WHERE c.audio_id = a.audio_id OFFSET 0) gd ON true
        WHERE a.audio_id = ANY (ids)
          AND (a.method = 'score' OR s.audio_id IS NULL)
          AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = a.audio_id AND h.task = 'cry')
        UNION ALL
        SELECT
            t.run_id, 'asr'::text AS task, t.audio_id,
            array_remove(ARRAY[
                CASE WHEN u.error_rate > 0.3 OR (u.n_ref = 0 AND u.insertions > 0) THEN 'high_wer' END,
                CASE WHEN btrim(t.text) = '' THEN 'empty_transcript' END
            ], NULL)                                         AS reasons,
            NULL::text, NULL::double precision, NULL::double precision, NULL::text,
            NULL::text, ref.source, u.error_rate
        FROM transcription t
        LEFT JOIN utterance_score u ON u.run_id = t.run_id AND u.audio_id = t.audio_id
        LEFT JOIN LATERAL (SELECT * FROM asr_reference r WHERE r.audio_id = t.audio_id OFFSET 0) ref ON true
        WHERE t.audio_id = ANY (ids)
          AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = t.audio_id AND h.task = 'asr')
    ) i
    WHERE cardinality(i.reasons) > 0
$$;

-- The items of clips `ids` made what review_item_rows says now: rows that changed or went are deleted,
-- the missing ones inserted (an unchanged item is not rewritten).
CREATE FUNCTION review_item_refresh(ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM clip_lock(ids);
    WITH fresh AS (SELECT * FROM review_item_rows(ids))
    DELETE FROM review_item r
    WHERE r.audio_id = ANY (ids)
      AND NOT EXISTS (SELECT 1 FROM fresh f
                      WHERE f.run_id = r.run_id AND f.task = r.task AND f.audio_id = r.audio_id
                        AND (f.*) IS NOT DISTINCT FROM (r.*));
    INSERT INTO review_item SELECT * FROM review_item_rows(ids) ON CONFLICT DO NOTHING;
END $$;

-- Every item from scratch (the backfill below, and after a TRUNCATE), 20,000 clips at a time: each
-- chunk is index lookups by audio_id, as a trigger's refresh is.
CREATE FUNCTION review_item_rebuild() RETURNS void
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    chunk bigint[];
BEGIN
    LOCK TABLE review_item IN EXCLUSIVE MODE;
    DELETE FROM review_item;
    FOR chunk IN SELECT array_agg(id ORDER BY id) FROM audio GROUP BY id / 20000 ORDER BY id / 20000 LOOP
        INSERT INTO review_item SELECT * FROM review_item_rows(chunk);
    END LOOP;
END $$;

-- The statement triggers on the fact tables, by what a statement there refreshes: clip_lock_* fire
-- first (alphabetical order, before current_label_*) and only lock the statement's clips, so every
-- statement takes dataset_clip rows once, in audio_id order, before any current_label row (the nested
-- refreshes then find them held); keep_facts_* fire after current_label_* and refresh.
DO $$
DECLARE
    spec text[];
    args text;
BEGIN
    FOREACH spec SLICE 1 IN ARRAY ARRAY[
        ['clip_lock', 'cry_answer', 'lock'], ['clip_lock', 'transcription', 'lock'],
        ['clip_lock', 'human_label', 'lock'], ['clip_lock', 'audio_file', 'lock'],
        ['keep_facts', 'audio_file', 'counts,review'], ['keep_facts', 'human_label', 'counts,review'],
        ['keep_facts', 'manifest_item', 'counts,review'], ['keep_facts', 'current_label', 'counts'],
        ['keep_facts', 'cry_answer', 'review'], ['keep_facts', 'transcription', 'review'],
        ['keep_facts', 'utterance_score', 'review']]
    LOOP
        args := (SELECT string_agg(quote_literal(a), ', ') FROM unnest(string_to_array(spec[3], ',')) a);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(%s)', spec[1] || '_insert', spec[2], args);
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %I REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(%s)', spec[1] || '_update', spec[2], args);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %I REFERENCING OLD TABLE AS old_rows '
                       'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(%s)', spec[1] || '_delete', spec[2], args);
        IF spec[1] = 'keep_facts' THEN
            EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION clip_facts_changed(%s)', spec[1] || '_truncate', spec[2], args);
        END IF;
    END LOOP;
END $$;

-- Existing data.
DO $$ BEGIN PERFORM dataset_counts_rebuild(); PERFORM review_item_rebuild(); END $$;

-- Same columns and counts as in 0011 (tests/store/test_dataset_counts.py compares them after random
-- writes), read from the stored differences: a few rows per dataset, not every member clip.
CREATE OR REPLACE VIEW dataset_summary AS
SELECT
    d.id                                                  AS dataset_id,
    d.name,
    d.split,
    d.tasks,
    d.created_at,
    coalesce(c.clips, 0)::bigint                          AS clips,
    coalesce(c.audio_seconds, 0)::double precision        AS audio_seconds,
    coalesce(c.asr_labelled, 0)::bigint                   AS asr_labelled,
    coalesce(c.cry_labelled, 0)::bigint                   AS cry_labelled,
    coalesce(c.asr_references, 0)::bigint                 AS asr_references,
    coalesce(c.cry_gold, 0)::bigint                       AS cry_gold,
    coalesce(c.cry_gold_yes, 0)::bigint                   AS cry_gold_yes,
    coalesce(c.cry_gold_no, 0)::bigint                    AS cry_gold_no
FROM dataset d
LEFT JOIN (
    SELECT dataset_id, sum(clips) AS clips, sum(audio_seconds) AS audio_seconds,
           sum(asr_labelled) AS asr_labelled, sum(cry_labelled) AS cry_labelled,
           sum(asr_references) AS asr_references, sum(cry_gold) AS cry_gold,
           sum(cry_gold_yes) AS cry_gold_yes, sum(cry_gold_no) AS cry_gold_no
    FROM dataset_count
    GROUP BY dataset_id
) c ON c.dataset_id = d.id;

-- Same columns and rows as in 0011 (tests/store/test_dataset_counts.py compares them after random
-- writes), read from review_item: a run's first items are a walk of review_item_rank_idx; the path, the
-- raw answer, the transcript and the reference are looked up for the rows returned only.
CREATE OR REPLACE VIEW review_queue AS
SELECT
    i.run_id,
    i.task,
    i.audio_id,
    (SELECT p.path FROM audio_path p WHERE p.audio_id = i.audio_id) AS path,
    i.reasons,
    (i.run_id = CASE i.task WHEN 'cry' THEN (SELECT max(id) FROM label_run WHERE task = 'cry')
                            ELSE (SELECT max(id) FROM label_run WHERE task = 'asr') END) AS is_latest_run,
    i.label, i.p_yes, i.threshold, i.generate_label,
    CASE WHEN i.task = 'cry' THEN (
        SELECT g.raw_answer FROM cry_answer g
        WHERE g.run_id = i.run_id AND g.audio_id = i.audio_id AND g.method = 'generate') END AS raw_answer,
    i.gold_label, i.gold_source,
    CASE WHEN i.task = 'asr' THEN (
        SELECT t.text FROM transcription t WHERE t.run_id = i.run_id AND t.audio_id = i.audio_id) END
        AS transcript,
    CASE WHEN i.task = 'asr' THEN (
        SELECT ref.reference_text FROM asr_reference ref WHERE ref.audio_id = i.audio_id) END
        AS reference_text,
    i.error_rate,
    i.priority
FROM review_item i;

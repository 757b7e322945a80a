-- 0011: the rest of "SQL at production scale" (docs/sql.md). current_label also keeps the clip's display
-- path (audio_path's rule), maintained when labels are written and when audio_file rows change path or
-- status, so latest_label needs no join and its counts read one table. review_queue sorts narrow rows and
-- looks up path and answer text for the rows it returns only; dataset_summary joins sets, not per-clip
-- lookups; run_metric rows say what they were computed from, so `report` can reuse them.
-- depends: 0010_current_label

-- The clip's first readable path (the audio_path view's rule), NULL when it has none.
ALTER TABLE current_label ADD COLUMN path text;

-- A row written without a path (every insert of the 0010 trigger functions) gets audio_path's.
CREATE FUNCTION current_label_fill_path() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.path IS NULL THEN
        NEW.path := (SELECT p.path FROM audio_path p WHERE p.audio_id = NEW.audio_id);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER current_label_path BEFORE INSERT ON current_label
    FOR EACH ROW EXECUTE FUNCTION current_label_fill_path();

-- audio_file rows added, moved, quarantined, marked missing or deleted: the paths of the clips concerned
-- are read again (an ingest re-scan rewrites every row it sees; only real changes count).
CREATE FUNCTION current_label_files_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT audio_id) INTO ids FROM new_rows WHERE audio_id IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT audio_id) INTO ids FROM old_rows WHERE audio_id IS NOT NULL;
    ELSE
        SELECT array_agg(DISTINCT a.audio_id) INTO ids
        FROM old_rows o
        JOIN new_rows n ON n.id = o.id
        CROSS JOIN LATERAL (VALUES (o.audio_id), (n.audio_id)) a (audio_id)
        WHERE (o.path, o.status, o.audio_id) IS DISTINCT FROM (n.path, n.status, n.audio_id)
          AND a.audio_id IS NOT NULL;
    END IF;
    IF ids IS NOT NULL THEN
        -- rows locked in key order, as the answer triggers' upserts take them: no deadlock with a worker
        PERFORM 1 FROM current_label c WHERE c.audio_id = ANY (ids) ORDER BY c.audio_id, c.task FOR UPDATE;
        UPDATE current_label c SET path = p.path, updated_at = now()
        FROM (SELECT i.audio_id, (SELECT ap.path FROM audio_path ap WHERE ap.audio_id = i.audio_id) AS path
              FROM unnest(ids) i (audio_id)) p
        WHERE c.audio_id = p.audio_id AND c.path IS DISTINCT FROM p.path;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER current_label_files_insert AFTER INSERT ON audio_file
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_files_changed();
CREATE TRIGGER current_label_files_update AFTER UPDATE ON audio_file
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_files_changed();
CREATE TRIGGER current_label_files_delete AFTER DELETE ON audio_file
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_files_changed();

-- Existing rows: rewritten once with their path (TRUNCATE + insert rather than an UPDATE of every row,
-- which would leave the table twice its size until a VACUUM).
CREATE TEMP TABLE current_label_0011 ON COMMIT DROP AS
SELECT c.audio_id, c.task, c.run_id, c.method, c.model_label, c.model_text, c.p_yes, c.human_id,
       c.reviewed_label, c.reviewed_text, c.reviewer, c.updated_at, p.path
FROM current_label c LEFT JOIN audio_path p ON p.audio_id = c.audio_id;
TRUNCATE current_label;
ALTER TABLE current_label DISABLE TRIGGER current_label_path;
INSERT INTO current_label (audio_id, task, run_id, method, model_label, model_text, p_yes, human_id,
                           reviewed_label, reviewed_text, reviewer, updated_at, path)
SELECT audio_id, task, run_id, method, model_label, model_text, p_yes, human_id, reviewed_label,
       reviewed_text, reviewer, updated_at, path
FROM current_label_0011 ORDER BY audio_id, task;
ALTER TABLE current_label ENABLE TRIGGER current_label_path;
CREATE INDEX current_label_path_idx ON current_label (path);

-- Same columns as in 0010; the path is the row's own.
CREATE OR REPLACE VIEW latest_label AS
SELECT
    c.audio_id,
    c.task,
    c.label,
    c.text,
    c.source,
    c.model_label,
    c.model_text,
    c.p_yes,
    c.method,
    c.run_id,
    r.model,
    r.prompt_version,
    c.reviewer,
    c.path
FROM current_label c
LEFT JOIN label_run r ON r.id = c.run_id;

-- The review queue: same columns and rules as in 0010, written without a WITH clause so that PostgreSQL
-- merges the view into the query that reads it (a CTE is planned on its own, every column computed
-- before the caller's ORDER BY ... LIMIT). The path and the generated answer are scalar lookups in the
-- select list, which the planner evaluates after the sort and limit: for the 50 rows returned, not for
-- every item of the run. What the priority needs (labels, p_yes, threshold, gold, error rate) stays in
-- the narrow rows that are sorted.
CREATE OR REPLACE VIEW review_queue AS
SELECT
    i.run_id,
    i.task,
    i.audio_id,
    (SELECT p.path FROM audio_path p WHERE p.audio_id = i.audio_id) AS path,
    i.reasons,
    i.is_latest_run,
    i.label, i.p_yes, i.threshold, i.generate_label,
    CASE WHEN i.task = 'cry' THEN (
        SELECT g.raw_answer FROM cry_answer g
        WHERE g.run_id = i.run_id AND g.audio_id = i.audio_id AND g.method = 'generate') END AS raw_answer,
    i.gold_label, i.gold_source,
    i.transcript, i.reference_text, i.error_rate,
    cardinality(i.reasons) * 10
        + CASE WHEN 'disagrees_with_gold' = ANY (i.reasons) THEN 20 ELSE 0 END
        + coalesce(least(i.error_rate, 5), 0)
        + coalesce(greatest(0, 1 - 10 * abs(i.p_yes - coalesce(i.threshold, 0.5))), 0) AS priority
FROM (
    -- cry: per run and clip, one anchor answer (score, else generate) and its sibling by the key
    SELECT
        a.run_id, 'cry'::text AS task, a.audio_id,
        (a.run_id = (SELECT max(id) FROM label_run WHERE task = 'cry')) AS is_latest_run,
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
        NULL::text AS transcript, NULL::text AS reference_text, NULL::double precision AS error_rate
    FROM cry_answer a
    LEFT JOIN cry_answer s ON s.run_id = a.run_id AND s.audio_id = a.audio_id AND s.method = 'score'
    LEFT JOIN cry_answer g ON g.run_id = a.run_id AND g.audio_id = a.audio_id AND g.method = 'generate'
    LEFT JOIN cry_gold gd ON gd.audio_id = a.audio_id
    WHERE (a.method = 'score' OR s.audio_id IS NULL)
      AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = a.audio_id AND h.task = 'cry')
    UNION ALL
    SELECT
        t.run_id, 'asr'::text AS task, t.audio_id,
        (t.run_id = (SELECT max(id) FROM label_run WHERE task = 'asr')) AS is_latest_run,
        array_remove(ARRAY[
            CASE WHEN u.error_rate > 0.3 OR (u.n_ref = 0 AND u.insertions > 0) THEN 'high_wer' END,
            CASE WHEN btrim(t.text) = '' THEN 'empty_transcript' END
        ], NULL)                                         AS reasons,
        NULL::text AS label, NULL::double precision AS p_yes, NULL::double precision AS threshold,
        NULL::text AS generate_label,
        NULL::text AS gold_label, ref.source AS gold_source,
        t.text AS transcript, ref.reference_text, u.error_rate
    FROM transcription t
    LEFT JOIN utterance_score u ON u.run_id = t.run_id AND u.audio_id = t.audio_id
    LEFT JOIN asr_reference ref ON ref.audio_id = t.audio_id
    WHERE NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = t.audio_id AND h.task = 'asr')
) i
WHERE cardinality(i.reasons) > 0;

-- dataset_summary (0007, 0010) with the same columns and counts, as one pass over the members joined to
-- each fact as a set (readable files, current labels, references, gold), which PostgreSQL hashes or
-- merges once, instead of looking every fact up per member clip.
CREATE OR REPLACE VIEW dataset_summary AS
SELECT
    d.id                                                  AS dataset_id,
    d.name,
    d.split,
    d.tasks,
    d.created_at,
    coalesce(c.clips, 0)                                  AS clips,
    coalesce(c.audio_seconds, 0)::double precision        AS audio_seconds,
    coalesce(c.asr_labelled, 0)                           AS asr_labelled,
    coalesce(c.cry_labelled, 0)                           AS cry_labelled,
    coalesce(c.asr_references, 0)                         AS asr_references,
    coalesce(c.cry_gold, 0)                               AS cry_gold,
    coalesce(c.cry_gold_yes, 0)                           AS cry_gold_yes,
    coalesce(c.cry_gold_no, 0)                            AS cry_gold_no
FROM dataset d
LEFT JOIN (
    SELECT
        da.dataset_id,
        count(*) FILTER (WHERE ok.audio_id IS NOT NULL)                          AS clips,
        sum(a.duration_s) FILTER (WHERE ok.audio_id IS NOT NULL)                 AS audio_seconds,
        count(*) FILTER (WHERE ok.audio_id IS NOT NULL AND la.run_id IS NOT NULL) AS asr_labelled,
        count(*) FILTER (WHERE ok.audio_id IS NOT NULL AND lc.run_id IS NOT NULL) AS cry_labelled,
        count(ar.audio_id)                                                        AS asr_references,
        count(g.audio_id)                                                         AS cry_gold,
        count(g.audio_id) FILTER (WHERE g.gold_label = 'yes')                     AS cry_gold_yes,
        count(g.audio_id) FILTER (WHERE g.gold_label = 'no')                      AS cry_gold_no
    FROM dataset_audio da
    JOIN audio a ON a.id = da.audio_id
    LEFT JOIN (SELECT DISTINCT f.audio_id FROM audio_file f WHERE f.status = 'ok') ok
        ON ok.audio_id = da.audio_id
    LEFT JOIN current_label lc ON lc.audio_id = da.audio_id AND lc.task = 'cry'
    LEFT JOIN current_label la ON la.audio_id = da.audio_id AND la.task = 'asr'
    LEFT JOIN (SELECT DISTINCT r.audio_id FROM asr_reference r) ar ON ar.audio_id = da.audio_id
    LEFT JOIN cry_gold g ON g.audio_id = da.audio_id
    GROUP BY da.dataset_id
) c ON c.dataset_id = d.id;

-- Stored run figures say what they were computed from (`run_metric.inputs`, written by
-- quality.metrics), so `report` reuses them while that is still true instead of recomputing. The gold
-- and grouping side of a run's inputs (human labels, manifest lines, files, datasets) is one counter,
-- bumped by any statement that changes those tables: cheap to read, never a lock between writers
-- (a sequence is not transactional: a rolled-back change only costs one recomputation).
ALTER TABLE run_metric ADD COLUMN inputs text;
CREATE SEQUENCE metric_inputs_version;

CREATE FUNCTION metric_inputs_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('metric_inputs_version');
    RETURN NULL;
END $$;

CREATE TRIGGER metric_inputs_human AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON human_label
    FOR EACH STATEMENT EXECUTE FUNCTION metric_inputs_changed();
CREATE TRIGGER metric_inputs_manifest AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON manifest_item
    FOR EACH STATEMENT EXECUTE FUNCTION metric_inputs_changed();
CREATE TRIGGER metric_inputs_files AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON audio_file
    FOR EACH STATEMENT EXECUTE FUNCTION metric_inputs_changed();
CREATE TRIGGER metric_inputs_dataset AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dataset
    FOR EACH STATEMENT EXECUTE FUNCTION metric_inputs_changed();
CREATE TRIGGER metric_inputs_dataset_audio AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON dataset_audio
    FOR EACH STATEMENT EXECUTE FUNCTION metric_inputs_changed();

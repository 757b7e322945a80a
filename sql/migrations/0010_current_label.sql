-- 0010: labels at production scale. The label each clip currently has per task is kept in a table,
-- `current_label`, written in the same transaction as the rows it comes from (triggers on cry_answer,
-- transcription, human_label and label_run), instead of being recomputed over every answer of every run
-- each time `latest_label` is read. `latest_label` keeps its name and columns on top of it. The views
-- people filter (audio_path, cry_gold, asr_reference, review_queue) are rewritten so that a filter on
-- audio id, path or run reaches the tables' indexes. docs/sql.md has the measurements.
-- depends: 0009_questions_and_run_datasets 0008_quality_by_group

-- One row per audio and task that has a production model label or a human label.
--   model part: the newest production run's (label_run.purpose = 'label', highest run_id; for cry the
--     'score' method's row when that run has one, else 'generate'), as latest_label picked it before;
--   human part: the human_label row (reviewed_label for cry, reviewed_text for asr);
--   label / text / source: the human's when there is one, else the model's (generated columns).
-- Kept by the triggers below; never written by hand. A row with neither part is deleted.
CREATE TABLE current_label (
    audio_id        bigint NOT NULL REFERENCES audio (id),
    task            text NOT NULL CHECK (task IN ('asr', 'cry')),
    run_id          bigint,           -- label_run.id of the model label (NULL: human label only)
    method          text CHECK (method IN ('score', 'generate')),
    model_label     text CHECK (model_label IN ('yes', 'no', 'unknown')),
    model_text      text,
    p_yes           double precision,
    human_id        bigint,           -- human_label.id (NULL: model label only)
    reviewed_label  text,
    reviewed_text   text,
    reviewer        text,
    label           text GENERATED ALWAYS AS
                        (CASE WHEN human_id IS NOT NULL THEN reviewed_label ELSE model_label END) STORED,
    text            text GENERATED ALWAYS AS
                        (CASE WHEN human_id IS NOT NULL THEN reviewed_text ELSE model_text END) STORED,
    source          text GENERATED ALWAYS AS
                        (CASE WHEN human_id IS NOT NULL THEN 'human' ELSE 'model' END) STORED,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (audio_id, task)
);
CREATE INDEX current_label_task_idx ON current_label (task, source, label);
CREATE INDEX current_label_run_idx ON current_label (run_id);

-- Recompute both parts of the given audio of one task from the source tables (deletes, updates, a
-- run's purpose changing, the backfill).
CREATE FUNCTION current_label_recompute(p_task text, p_audio bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM current_label c WHERE c.task = p_task AND c.audio_id = ANY (p_audio);
    INSERT INTO current_label (audio_id, task, run_id, method, model_label, model_text, p_yes,
                               human_id, reviewed_label, reviewed_text, reviewer)
    SELECT i.audio_id, p_task, m.run_id, m.method, m.label, m.text, m.p_yes,
           h.id, h.label, h.text, h.reviewer
    FROM (SELECT DISTINCT unnest(p_audio) AS audio_id) i
    LEFT JOIN LATERAL (
        SELECT * FROM (
            SELECT c.run_id, c.method, c.label, NULL::text AS text, c.p_yes
            FROM cry_answer c JOIN label_run r ON r.id = c.run_id AND r.purpose = 'label'
            WHERE p_task = 'cry' AND c.audio_id = i.audio_id
            UNION ALL
            SELECT t.run_id, NULL, NULL, t.text, NULL
            FROM transcription t JOIN label_run r ON r.id = t.run_id AND r.purpose = 'label'
            WHERE p_task = 'asr' AND t.audio_id = i.audio_id
        ) a
        ORDER BY a.run_id DESC, a.method = 'score' DESC NULLS LAST
        LIMIT 1
    ) m ON true
    LEFT JOIN human_label h ON h.audio_id = i.audio_id AND h.task = p_task
    WHERE m.run_id IS NOT NULL OR h.id IS NOT NULL
    ORDER BY i.audio_id;
END $$;

-- New answers: the model part moves to the newest of them when it beats the stored one (a higher run,
-- or the score method of the same run). Monotonic, so two runs writing the same clip at once end on the
-- newer one whatever the commit order (the upsert waits on the row and compares with what committed).
CREATE FUNCTION current_label_cry_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO current_label AS cur (audio_id, task, run_id, method, model_label, p_yes)
    SELECT DISTINCT ON (n.audio_id) n.audio_id, 'cry', n.run_id, n.method, n.label, n.p_yes
    FROM new_rows n JOIN label_run r ON r.id = n.run_id AND r.purpose = 'label'
    ORDER BY n.audio_id, n.run_id DESC, (n.method = 'score') DESC
    ON CONFLICT (audio_id, task) DO UPDATE
        SET run_id = excluded.run_id, method = excluded.method, model_label = excluded.model_label,
            model_text = NULL, p_yes = excluded.p_yes, updated_at = now()
        WHERE cur.run_id IS NULL
           OR (excluded.run_id, excluded.method = 'score') > (cur.run_id, cur.method = 'score');
    RETURN NULL;
END $$;

CREATE FUNCTION current_label_asr_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO current_label AS cur (audio_id, task, run_id, model_text)
    SELECT DISTINCT ON (n.audio_id) n.audio_id, 'asr', n.run_id, n.text
    FROM new_rows n JOIN label_run r ON r.id = n.run_id AND r.purpose = 'label'
    ORDER BY n.audio_id, n.run_id DESC
    ON CONFLICT (audio_id, task) DO UPDATE
        SET run_id = excluded.run_id, method = NULL, model_label = NULL, model_text = excluded.model_text,
            p_yes = NULL, updated_at = now()
        WHERE cur.run_id IS NULL OR excluded.run_id > cur.run_id;
    RETURN NULL;
END $$;

-- Answers updated or deleted (a run deleted cascades here): recompute the clips they were about.
CREATE FUNCTION current_label_answers_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'UPDATE' THEN
        SELECT array_agg(DISTINCT audio_id) INTO ids
        FROM (SELECT audio_id FROM old_rows UNION SELECT audio_id FROM new_rows) a;
    ELSE
        SELECT array_agg(DISTINCT audio_id) INTO ids FROM old_rows;
    END IF;
    IF ids IS NOT NULL THEN
        PERFORM current_label_recompute(TG_ARGV[0], ids);
    END IF;
    RETURN NULL;
END $$;

-- Human labels: the human part follows human_label row for row.
CREATE FUNCTION current_label_human_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE current_label c
        SET human_id = NULL, reviewed_label = NULL, reviewed_text = NULL, reviewer = NULL, updated_at = now()
        FROM old_rows o
        WHERE c.audio_id = o.audio_id AND c.task = o.task AND c.human_id = o.id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO current_label AS cur (audio_id, task, human_id, reviewed_label, reviewed_text, reviewer)
        SELECT n.audio_id, n.task, n.id, n.label, n.text, n.reviewer FROM new_rows n ORDER BY n.audio_id
        ON CONFLICT (audio_id, task) DO UPDATE
            SET human_id = excluded.human_id, reviewed_label = excluded.reviewed_label,
                reviewed_text = excluded.reviewed_text, reviewer = excluded.reviewer, updated_at = now();
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM current_label c USING old_rows o
        WHERE c.audio_id = o.audio_id AND c.task = o.task AND c.run_id IS NULL AND c.human_id IS NULL;
    END IF;
    RETURN NULL;
END $$;

-- A run whose purpose changes (evaluation <-> label) adds or removes its answers from the labels.
CREATE FUNCTION current_label_run_purpose_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.purpose IS DISTINCT FROM OLD.purpose THEN
        PERFORM current_label_recompute(
            NEW.task,
            CASE WHEN NEW.task = 'cry'
                 THEN ARRAY(SELECT DISTINCT audio_id FROM cry_answer WHERE run_id = NEW.id)
                 ELSE ARRAY(SELECT audio_id FROM transcription WHERE run_id = NEW.id) END);
    END IF;
    RETURN NULL;
END $$;

-- TRUNCATE of a source table: rebuild the whole table.
CREATE FUNCTION current_label_rebuild() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM current_label;
    PERFORM current_label_backfill();
    RETURN NULL;
END $$;

-- Every label from scratch (the backfill below, and after a TRUNCATE).
CREATE FUNCTION current_label_backfill() RETURNS void
LANGUAGE sql AS $$
    INSERT INTO current_label (audio_id, task, run_id, method, model_label, model_text, p_yes,
                               human_id, reviewed_label, reviewed_text, reviewer)
    SELECT coalesce(m.audio_id, h.audio_id), coalesce(m.task, h.task), m.run_id, m.method, m.label, m.text,
           m.p_yes, h.id, h.label, h.text, h.reviewer
    FROM (
        SELECT DISTINCT ON (c.audio_id) c.audio_id, 'cry'::text AS task, c.run_id, c.method, c.label,
               NULL::text AS text, c.p_yes
        FROM cry_answer c JOIN label_run r ON r.id = c.run_id AND r.purpose = 'label'
        ORDER BY c.audio_id, c.run_id DESC, (c.method = 'score') DESC
    ) m
    FULL JOIN (SELECT * FROM human_label WHERE task = 'cry') h ON h.audio_id = m.audio_id
    UNION ALL
    SELECT coalesce(m.audio_id, h.audio_id), coalesce(m.task, h.task), m.run_id, NULL, NULL, m.text, NULL,
           h.id, h.label, h.text, h.reviewer
    FROM (
        SELECT DISTINCT ON (t.audio_id) t.audio_id, 'asr'::text AS task, t.run_id, t.text
        FROM transcription t JOIN label_run r ON r.id = t.run_id AND r.purpose = 'label'
        ORDER BY t.audio_id, t.run_id DESC
    ) m
    FULL JOIN (SELECT * FROM human_label WHERE task = 'asr') h ON h.audio_id = m.audio_id;
$$;

CREATE TRIGGER current_label_cry_insert AFTER INSERT ON cry_answer
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_cry_inserted();
CREATE TRIGGER current_label_cry_update AFTER UPDATE ON cry_answer
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_answers_changed('cry');
CREATE TRIGGER current_label_cry_delete AFTER DELETE ON cry_answer
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_answers_changed('cry');
CREATE TRIGGER current_label_cry_truncate AFTER TRUNCATE ON cry_answer
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_rebuild();

CREATE TRIGGER current_label_asr_insert AFTER INSERT ON transcription
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_asr_inserted();
CREATE TRIGGER current_label_asr_update AFTER UPDATE ON transcription
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_answers_changed('asr');
CREATE TRIGGER current_label_asr_delete AFTER DELETE ON transcription
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_answers_changed('asr');
CREATE TRIGGER current_label_asr_truncate AFTER TRUNCATE ON transcription
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_rebuild();

CREATE TRIGGER current_label_human_insert AFTER INSERT ON human_label
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_human_changed();
CREATE TRIGGER current_label_human_update AFTER UPDATE ON human_label
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_human_changed();
CREATE TRIGGER current_label_human_delete AFTER DELETE ON human_label
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION current_label_human_changed();
CREATE TRIGGER current_label_human_truncate AFTER TRUNCATE ON human_label
    FOR EACH STATEMENT EXECUTE FUNCTION current_label_rebuild();

CREATE TRIGGER current_label_run_purpose AFTER UPDATE OF purpose ON label_run
    FOR EACH ROW EXECUTE FUNCTION current_label_run_purpose_changed();

-- Existing data.
DO $$ BEGIN PERFORM current_label_backfill(); END $$;

-- The first readable path per audio (as in 0003), written so that a filter on path or on audio_id is an
-- index lookup (the DISTINCT ON form read every file before filtering).
CREATE INDEX audio_file_ok_audio_idx ON audio_file (audio_id, id) INCLUDE (path) WHERE status = 'ok';
CREATE OR REPLACE VIEW audio_path AS
SELECT f.audio_id, f.path
FROM audio_file f
WHERE f.status = 'ok'
  AND NOT EXISTS (SELECT 1 FROM audio_file e
                  WHERE e.audio_id = f.audio_id AND e.status = 'ok' AND e.id < f.id);

-- Same columns and meaning as in 0004, read from current_label.
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
    p.path
FROM current_label c
LEFT JOIN label_run r ON r.id = c.run_id
LEFT JOIN audio_path p ON p.audio_id = c.audio_id;

-- Gold labels and references (as in 0003), as two disjoint branches, so a filter on audio_id reaches
-- human_label and manifest_item through their indexes: the human's row (its manifest line beside it), or
-- the latest manifest line with gold / a reference for audio no human reviewed.
CREATE INDEX manifest_item_aqa_gold_idx ON manifest_item (audio_file_id, id)
    WHERE kind = 'aqa' AND gold_label IS NOT NULL;
CREATE INDEX manifest_item_asr_ref_idx ON manifest_item (audio_file_id, id)
    WHERE kind = 'asr' AND reference_text IS NOT NULL;

CREATE OR REPLACE VIEW cry_gold AS
SELECT h.audio_id, h.label AS gold_label, 'human'::text AS source, m.manifest_item_id, h.reviewer
FROM human_label h
LEFT JOIN LATERAL (
    SELECT mi.id AS manifest_item_id
    FROM manifest_item mi JOIN audio_file af ON af.id = mi.audio_file_id
    WHERE af.audio_id = h.audio_id AND mi.kind = 'aqa' AND mi.gold_label IS NOT NULL
    ORDER BY mi.id DESC LIMIT 1
) m ON true
WHERE h.task = 'cry' AND h.label IN ('yes', 'no')
UNION ALL
SELECT af.audio_id, mi.gold_label, 'manifest'::text, mi.id, NULL::text
FROM manifest_item mi
JOIN audio_file af ON af.id = mi.audio_file_id
WHERE mi.kind = 'aqa' AND mi.gold_label IS NOT NULL AND af.audio_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = af.audio_id AND h.task = 'cry')
  AND NOT EXISTS (SELECT 1 FROM manifest_item m2 JOIN audio_file f2 ON f2.id = m2.audio_file_id
                  WHERE f2.audio_id = af.audio_id AND m2.kind = 'aqa' AND m2.gold_label IS NOT NULL
                    AND m2.id > mi.id);

CREATE OR REPLACE VIEW asr_reference AS
SELECT h.audio_id, h.text AS reference_text, m.language, 'human'::text AS source, m.manifest_item_id,
       h.reviewer
FROM human_label h
LEFT JOIN LATERAL (
    SELECT mi.id AS manifest_item_id, mi.language
    FROM manifest_item mi JOIN audio_file af ON af.id = mi.audio_file_id
    WHERE af.audio_id = h.audio_id AND mi.kind = 'asr' AND mi.reference_text IS NOT NULL
    ORDER BY mi.id DESC LIMIT 1
) m ON true
WHERE h.task = 'asr'
UNION ALL
SELECT af.audio_id, mi.reference_text, mi.language, 'manifest'::text, mi.id, NULL::text
FROM manifest_item mi
JOIN audio_file af ON af.id = mi.audio_file_id
WHERE mi.kind = 'asr' AND mi.reference_text IS NOT NULL AND af.audio_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = af.audio_id AND h.task = 'asr')
  AND NOT EXISTS (SELECT 1 FROM manifest_item m2 JOIN audio_file f2 ON f2.id = m2.audio_file_id
                  WHERE f2.audio_id = af.audio_id AND m2.kind = 'asr' AND m2.reference_text IS NOT NULL
                    AND m2.id > mi.id);

-- The review queue (same columns and rules as in 0003). Per run and clip, the cry answers are read from
-- one anchor row (the score answer, else the generate one) and its sibling by the (run_id, audio_id,
-- method) key, instead of joining every score answer to every generate answer of every run before any
-- filter; is_latest_run is computed in each branch against its task's newest run, so that filter (like
-- run_id and audio_id) becomes an index scan of that run's answers.
CREATE OR REPLACE VIEW review_queue AS
WITH cry_items AS (
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
        s.p_yes, s.threshold, g.label AS generate_label, g.raw_answer,
        gd.gold_label, gd.source AS gold_source,
        NULL::text AS transcript, NULL::text AS reference_text, NULL::double precision AS error_rate
    FROM cry_answer a
    LEFT JOIN cry_answer s ON s.run_id = a.run_id AND s.audio_id = a.audio_id AND s.method = 'score'
    LEFT JOIN cry_answer g ON g.run_id = a.run_id AND g.audio_id = a.audio_id AND g.method = 'generate'
    LEFT JOIN cry_gold gd ON gd.audio_id = a.audio_id
    WHERE (a.method = 'score' OR s.audio_id IS NULL)
      AND NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = a.audio_id AND h.task = 'cry')
), asr_items AS (
    SELECT
        t.run_id, 'asr'::text AS task, t.audio_id,
        (t.run_id = (SELECT max(id) FROM label_run WHERE task = 'asr')) AS is_latest_run,
        array_remove(ARRAY[
            CASE WHEN u.error_rate > 0.3 OR (u.n_ref = 0 AND u.insertions > 0) THEN 'high_wer' END,
            CASE WHEN btrim(t.text) = '' THEN 'empty_transcript' END
        ], NULL)                                         AS reasons,
        NULL::text AS label, NULL::double precision AS p_yes, NULL::double precision AS threshold,
        NULL::text AS generate_label, NULL::text AS raw_answer,
        NULL::text AS gold_label, ref.source AS gold_source,
        t.text AS transcript, ref.reference_text, u.error_rate
    FROM transcription t
    LEFT JOIN utterance_score u ON u.run_id = t.run_id AND u.audio_id = t.audio_id
    LEFT JOIN asr_reference ref ON ref.audio_id = t.audio_id
    WHERE NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = t.audio_id AND h.task = 'asr')
), items AS (
    SELECT * FROM cry_items
    UNION ALL
    SELECT * FROM asr_items
)
SELECT
    i.run_id,
    i.task,
    i.audio_id,
    p.path,
    i.reasons,
    i.is_latest_run,
    i.label, i.p_yes, i.threshold, i.generate_label, i.raw_answer,
    i.gold_label, i.gold_source,
    i.transcript, i.reference_text, i.error_rate,
    cardinality(i.reasons) * 10
        + CASE WHEN 'disagrees_with_gold' = ANY (i.reasons) THEN 20 ELSE 0 END
        + coalesce(least(i.error_rate, 5), 0)
        + coalesce(greatest(0, 1 - 10 * abs(i.p_yes - coalesce(i.threshold, 0.5))), 0) AS priority
FROM items i
LEFT JOIN audio_path p ON p.audio_id = i.audio_id
WHERE cardinality(i.reasons) > 0;

-- dataset_summary (0007) with the same columns: "has a production label" is a current_label lookup.
CREATE OR REPLACE VIEW dataset_summary AS
SELECT
    d.id                                                        AS dataset_id,
    d.name,
    d.split,
    d.tasks,
    d.created_at,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL)    AS clips,
    coalesce(sum(a.duration_s) FILTER (WHERE ok.audio_id IS NOT NULL), 0)::double precision AS audio_seconds,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM current_label l
        WHERE l.audio_id = da.audio_id AND l.task = 'asr' AND l.run_id IS NOT NULL)) AS asr_labelled,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM current_label l
        WHERE l.audio_id = da.audio_id AND l.task = 'cry' AND l.run_id IS NOT NULL)) AS cry_labelled,
    count(da.audio_id) FILTER (WHERE EXISTS (
        SELECT 1 FROM asr_reference ar WHERE ar.audio_id = da.audio_id)) AS asr_references,
    count(g.audio_id)                                           AS cry_gold,
    count(g.audio_id) FILTER (WHERE g.gold_label = 'yes')       AS cry_gold_yes,
    count(g.audio_id) FILTER (WHERE g.gold_label = 'no')        AS cry_gold_no
FROM dataset d
LEFT JOIN dataset_audio da ON da.dataset_id = d.id
LEFT JOIN audio a ON a.id = da.audio_id
LEFT JOIN LATERAL (
    SELECT f.audio_id FROM audio_file f WHERE f.audio_id = da.audio_id AND f.status = 'ok' LIMIT 1
) ok ON true
LEFT JOIN cry_gold g ON g.audio_id = da.audio_id
GROUP BY d.id;

-- 0011: the rest of "SQL at production scale" (docs/sql.md). current_label also keeps the clip's display
-- path (audio_path's rule), maintained when labels are written and when audio_file rows change path or
-- status, so latest_label needs no join and its counts read one table. review_queue sorts a narrow row per
-- item (the priority from indexed columns) and computes path and gold for the rows it returns only.
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

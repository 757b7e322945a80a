-- 0007: datasets. Every clip belongs to named datasets, each with a split (train / test) and the tasks it
-- is labelled for; labelling, metrics, review and fine-tuning are scoped by them. `qwen-tasks ingest
-- --dataset NAME [--split S] [--tasks T]` writes these (qwen_tasks.ingest.datasets).
-- Also: the transcripts that hit the generation cap are flagged, and a fine-tune's evaluations on test
-- datasets are recorded beside its held-out evaluation.
-- depends: 0006_lossless_paths_and_rechecks 0004_model_version

CREATE TABLE dataset (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$'),
    -- 'test': a fixed evaluation set. Its clips are never training rows of any fine-tuned version.
    split       text NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'test')),
    tasks       text[] NOT NULL CHECK (cardinality(tasks) > 0 AND tasks <@ ARRAY['asr', 'cry']::text[]),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Which audio content (one row per sha256) belongs to which dataset. Added by every ingest that finds
-- the clip in one of the dataset's sources, never removed by one: a clip that was ever in a test set
-- stays there, so it cannot drift into training. A clip whose every path is gone is simply not labelled.
CREATE TABLE dataset_audio (
    dataset_id  bigint NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    audio_id    bigint NOT NULL REFERENCES audio (id),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, audio_id)
);
CREATE INDEX dataset_audio_audio_idx ON dataset_audio (audio_id);

-- Where a dataset's audio comes from: folders, audio files and manifests, as ingest was given them.
CREATE TABLE dataset_source (
    dataset_id        bigint NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    kind              text NOT NULL CHECK (kind IN ('folder', 'file', 'manifest')),
    location          text NOT NULL,
    first_ingested_at timestamptz NOT NULL DEFAULT now(),
    last_ingested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, location)
);

-- The datasets a labelling run covered: those in its scope that contributed at least one clip.
CREATE TABLE run_dataset (
    run_id      bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    dataset_id  bigint NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    n_items     integer NOT NULL DEFAULT 0 CHECK (n_items >= 0),
    PRIMARY KEY (run_id, dataset_id)
);
CREATE INDEX run_dataset_dataset_idx ON run_dataset (dataset_id);

-- A transcript (or generated answer) that stopped at max_new_tokens: probably cut short.
ALTER TABLE transcription ADD COLUMN truncated boolean NOT NULL DEFAULT false;
ALTER TABLE cry_answer ADD COLUMN truncated boolean NOT NULL DEFAULT false;

-- A fine-tuned version evaluated on a test dataset (base and candidate, two evaluation runs), beside its
-- held-out evaluation (model_version.base_run_id / candidate_run_id).
CREATE TABLE model_version_test (
    version_id        bigint NOT NULL REFERENCES model_version (id) ON DELETE CASCADE,
    dataset_id        bigint NOT NULL REFERENCES dataset (id) ON DELETE CASCADE,
    base_run_id       bigint REFERENCES label_run (id),
    candidate_run_id  bigint REFERENCES label_run (id),
    PRIMARY KEY (version_id, dataset_id)
);

-- Existing databases: the audio ingested before becomes a dataset per manifest and per folder it came
-- from. A manifest gives its kinds' tasks (asr -> asr, aqa -> cry) and its file stem as the name; audio
-- named by no manifest is grouped by the root that admitted it (its folder, for rows from before 0006),
-- with both tasks. Names are made valid, and unique with a -2, -3 ... suffix.
CREATE TEMPORARY TABLE _legacy_source ON COMMIT DROP AS
WITH manifests AS (
    SELECT mi.manifest_path AS location, 'manifest'::text AS kind,
           regexp_replace(regexp_replace(mi.manifest_path, '^.*/', ''), '\.[^.]*$', '') AS base,
           array_agg(DISTINCT CASE mi.kind WHEN 'asr' THEN 'asr' ELSE 'cry' END ORDER BY
                     CASE mi.kind WHEN 'asr' THEN 'asr' ELSE 'cry' END) AS tasks
    FROM manifest_item mi
    GROUP BY mi.manifest_path
), folders AS (
    SELECT DISTINCT coalesce(f.root, regexp_replace(f.path, '/[^/]*$', '')) AS location,
           'folder'::text AS kind
    FROM audio_file f
    WHERE f.status = 'ok'
      AND NOT EXISTS (SELECT 1 FROM manifest_item mi WHERE mi.audio_file_id = f.id)
), sources AS (
    SELECT location, kind, base, tasks FROM manifests
    UNION ALL
    SELECT location, kind, regexp_replace(location, '^.*/', ''), ARRAY['asr', 'cry']::text[] FROM folders
), named AS (
    SELECT location, kind, tasks,
           left(coalesce(nullif(regexp_replace(regexp_replace(base, '[^A-Za-z0-9._-]+', '-', 'g'),
                                               '^[^A-Za-z0-9]+', ''), ''), 'dataset'), 90) AS name
    FROM sources
)
SELECT location, kind, tasks,
       CASE WHEN row_number() OVER w = 1 THEN name ELSE name || '-' || row_number() OVER w END AS name
FROM named
WINDOW w AS (PARTITION BY name ORDER BY kind DESC, location);

INSERT INTO dataset (name, split, tasks)
SELECT name, 'train', tasks FROM _legacy_source ORDER BY kind DESC, location;

INSERT INTO dataset_source (dataset_id, kind, location)
SELECT d.id, s.kind, s.location FROM _legacy_source s JOIN dataset d ON d.name = s.name;

INSERT INTO dataset_audio (dataset_id, audio_id)
SELECT DISTINCT d.id, f.audio_id
FROM _legacy_source s
JOIN dataset d ON d.name = s.name
JOIN manifest_item mi ON mi.manifest_path = s.location
JOIN audio_file f ON f.id = mi.audio_file_id AND f.audio_id IS NOT NULL
WHERE s.kind = 'manifest';

INSERT INTO dataset_audio (dataset_id, audio_id)
SELECT DISTINCT d.id, f.audio_id
FROM _legacy_source s
JOIN dataset d ON d.name = s.name
JOIN audio_file f ON f.status = 'ok'
    AND coalesce(f.root, regexp_replace(f.path, '/[^/]*$', '')) = s.location
    AND NOT EXISTS (SELECT 1 FROM manifest_item mi WHERE mi.audio_file_id = f.id)
WHERE s.kind = 'folder'
ON CONFLICT DO NOTHING;

-- Earlier runs covered the legacy datasets their clips belong to.
INSERT INTO run_dataset (run_id, dataset_id, n_items)
SELECT i.run_id, da.dataset_id, count(*)
FROM label_job_item i
JOIN dataset_audio da ON da.audio_id = i.audio_id
GROUP BY i.run_id, da.dataset_id;

-- One row per dataset: its clips (audio with a readable path), how many have a production label per task,
-- and how many have gold (cry) or a reference transcript (asr). `qwen-tasks datasets` prints this.
CREATE VIEW dataset_summary AS
SELECT
    d.id                                                        AS dataset_id,
    d.name,
    d.split,
    d.tasks,
    d.created_at,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL)    AS clips,
    coalesce(sum(a.duration_s) FILTER (WHERE ok.audio_id IS NOT NULL), 0)::double precision AS audio_seconds,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM transcription t JOIN label_run r ON r.id = t.run_id AND r.purpose = 'label'
        WHERE t.audio_id = da.audio_id))                        AS asr_labelled,
    count(da.audio_id) FILTER (WHERE ok.audio_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM cry_answer c JOIN label_run r ON r.id = c.run_id AND r.purpose = 'label'
        WHERE c.audio_id = da.audio_id))                        AS cry_labelled,
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

-- The held-out evaluation and each test-dataset evaluation of a version, side by side: one row per
-- (version, evaluation set); evaluated_on is 'heldout' or the test dataset's name.
CREATE VIEW model_version_evaluation AS
WITH evals AS (
    SELECT v.id AS version_id, 'heldout'::text AS evaluated_on, NULL::bigint AS dataset_id,
           v.base_run_id, v.candidate_run_id
    FROM model_version v
    UNION ALL
    SELECT t.version_id, d.name, d.id, t.base_run_id, t.candidate_run_id
    FROM model_version_test t JOIN dataset d ON d.id = t.dataset_id
)
SELECT
    v.name,
    v.task,
    v.status,
    e.evaluated_on,
    e.dataset_id,
    e.base_run_id,
    e.candidate_run_id,
    b.n_gold            AS n_gold,
    b.n_reference       AS n_reference,
    b.score_roc_auc     AS base_roc_auc,
    c.score_roc_auc     AS candidate_roc_auc,
    b.score_f1          AS base_f1,
    c.score_f1          AS candidate_f1,
    b.score_accuracy    AS base_accuracy,
    c.score_accuracy    AS candidate_accuracy,
    b.error_rate        AS base_error_rate,
    c.error_rate        AS candidate_error_rate
FROM evals e
JOIN model_version v ON v.id = e.version_id
LEFT JOIN run_quality b ON b.run_id = e.base_run_id
LEFT JOIN run_quality c ON c.run_id = e.candidate_run_id;

-- model_version_quality (0004) keeps its columns; test_datasets lists the test sets a version was also
-- evaluated on (their figures: model_version_evaluation).
CREATE OR REPLACE VIEW model_version_quality AS
SELECT
    v.name,
    v.task,
    v.status,
    v.base_model,
    v.revision,
    v.created_at,
    v.base_run_id,
    v.candidate_run_id,
    b.n_gold            AS heldout_gold,
    b.score_roc_auc     AS base_roc_auc,
    c.score_roc_auc     AS candidate_roc_auc,
    b.score_f1          AS base_f1,
    c.score_f1          AS candidate_f1,
    b.score_accuracy    AS base_accuracy,
    c.score_accuracy    AS candidate_accuracy,
    b.n_reference       AS heldout_references,
    b.error_rate        AS base_error_rate,
    c.error_rate        AS candidate_error_rate,
    ARRAY(SELECT d.name FROM model_version_test t JOIN dataset d ON d.id = t.dataset_id
          WHERE t.version_id = v.id ORDER BY d.name) AS test_datasets
FROM model_version v
LEFT JOIN run_quality b ON b.run_id = v.base_run_id
LEFT JOIN run_quality c ON c.run_id = v.candidate_run_id;

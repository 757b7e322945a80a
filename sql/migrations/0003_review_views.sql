-- 0003: what reviewers query. Gold labels and references (human review overriding manifests), per-
-- utterance ASR scores, the latest label per audio, the review queue and per-run quality.
-- Human labels (table human_label, filled by `qwen-tasks review-import`) take precedence everywhere.
-- depends: 0001_initial

-- Per-utterance ASR edit counts, written by `qwen-tasks metrics` (qwen_tasks.metrics) for each ASR run.
-- error_rate = (S + D + I) / n_ref in the language's unit (word, or char for Chinese); NULL when n_ref = 0.
CREATE TABLE utterance_score (
    run_id            bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    audio_id          bigint NOT NULL REFERENCES audio (id),
    language          text NOT NULL,
    unit              text NOT NULL CHECK (unit IN ('word', 'char')),
    reference_source  text NOT NULL CHECK (reference_source IN ('manifest', 'human')),
    n_ref             integer NOT NULL CHECK (n_ref >= 0),
    substitutions     integer NOT NULL CHECK (substitutions >= 0),
    deletions         integer NOT NULL CHECK (deletions >= 0),
    insertions        integer NOT NULL CHECK (insertions >= 0),
    error_rate        double precision CHECK (error_rate >= 0),
    computed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, audio_id)
);

-- One readable path per audio (several paths can hold the same bytes): the first one seen that is ok.
CREATE VIEW audio_path AS
SELECT DISTINCT ON (audio_id) audio_id, path
FROM audio_file
WHERE status = 'ok'
ORDER BY audio_id, id;

-- Gold answer for cry detection per audio: a human label beats the manifest's gold_label (latest line).
-- A human 'unknown' means "reviewer could not tell": that audio then has no gold at all.
CREATE VIEW cry_gold AS
WITH manifest_gold AS (
    SELECT DISTINCT ON (af.audio_id) af.audio_id, mi.gold_label, mi.id AS manifest_item_id
    FROM manifest_item mi
    JOIN audio_file af ON af.id = mi.audio_file_id
    WHERE mi.kind = 'aqa' AND mi.gold_label IS NOT NULL AND af.audio_id IS NOT NULL
    ORDER BY af.audio_id, mi.id DESC
), resolved AS (
    SELECT
        coalesce(h.audio_id, m.audio_id)                             AS audio_id,
        CASE WHEN h.id IS NOT NULL THEN h.label ELSE m.gold_label END AS gold_label,
        CASE WHEN h.id IS NOT NULL THEN 'human' ELSE 'manifest' END   AS source,
        m.manifest_item_id,
        h.reviewer
    FROM (SELECT * FROM human_label WHERE task = 'cry') h
    FULL JOIN manifest_gold m ON m.audio_id = h.audio_id
)
SELECT * FROM resolved WHERE gold_label IN ('yes', 'no');

-- Reference transcript per audio: a human transcript beats the manifest's reference_text (latest line).
-- language comes from the manifest (NULL: detected from the text when scoring).
CREATE VIEW asr_reference AS
WITH manifest_ref AS (
    SELECT DISTINCT ON (af.audio_id) af.audio_id, mi.reference_text, mi.language, mi.id AS manifest_item_id
    FROM manifest_item mi
    JOIN audio_file af ON af.id = mi.audio_file_id
    WHERE mi.kind = 'asr' AND mi.reference_text IS NOT NULL AND af.audio_id IS NOT NULL
    ORDER BY af.audio_id, mi.id DESC
)
SELECT
    coalesce(h.audio_id, m.audio_id)                              AS audio_id,
    CASE WHEN h.id IS NOT NULL THEN h.text ELSE m.reference_text END AS reference_text,
    m.language,
    CASE WHEN h.id IS NOT NULL THEN 'human' ELSE 'manifest' END    AS source,
    m.manifest_item_id,
    h.reviewer
FROM (SELECT * FROM human_label WHERE task = 'asr') h
FULL JOIN manifest_ref m ON m.audio_id = h.audio_id;

-- The label to use now, per audio and task: a human label if there is one, else the latest run's.
-- For cry detection the model label is the 'score' method's (calibrated p_yes vs threshold) when the
-- run has it, else the 'generate' method's normalised answer.
CREATE VIEW latest_label AS
WITH model_cry AS (
    SELECT DISTINCT ON (c.audio_id)
        c.audio_id, 'cry'::text AS task, c.label, NULL::text AS text, c.p_yes, c.run_id, c.method
    FROM cry_answer c
    ORDER BY c.audio_id, c.run_id DESC, (c.method = 'score') DESC
), model_asr AS (
    SELECT DISTINCT ON (t.audio_id)
        t.audio_id, 'asr'::text AS task, NULL::text AS label, t.text, NULL::double precision AS p_yes,
        t.run_id, NULL::text AS method
    FROM transcription t
    ORDER BY t.audio_id, t.run_id DESC
), model AS (
    SELECT * FROM model_cry
    UNION ALL
    SELECT * FROM model_asr
)
SELECT
    coalesce(h.audio_id, m.audio_id)                        AS audio_id,
    coalesce(h.task, m.task)                                AS task,
    CASE WHEN h.id IS NOT NULL THEN h.label ELSE m.label END AS label,
    CASE WHEN h.id IS NOT NULL THEN h.text ELSE m.text END   AS text,
    CASE WHEN h.id IS NOT NULL THEN 'human' ELSE 'model' END AS source,
    m.label                                                 AS model_label,
    m.text                                                  AS model_text,
    m.p_yes,
    m.method,
    m.run_id,
    r.model,
    r.prompt_version,
    h.reviewer,
    p.path
FROM model m
FULL JOIN human_label h ON h.audio_id = m.audio_id AND h.task = m.task
LEFT JOIN label_run r ON r.id = m.run_id
LEFT JOIN audio_path p ON p.audio_id = coalesce(h.audio_id, m.audio_id);

-- Items worth a human look, one row per run and audio, with the reasons. Audio that already has a
-- human label for the task is left out (it has been reviewed). Filter on run_id / is_latest_run.
--   cry: disagrees_with_gold, unknown, near_threshold (|p_yes - threshold| < 0.1), methods_disagree
--   asr: high_wer (utterance error rate > 0.3), empty_transcript
CREATE VIEW review_queue AS
WITH latest_run AS (
    SELECT task, max(id) AS run_id FROM label_run GROUP BY task
), cry AS (
    SELECT
        coalesce(s.run_id, g.run_id)     AS run_id,
        coalesce(s.audio_id, g.audio_id) AS audio_id,
        s.label AS score_label, s.p_yes, s.threshold,
        g.label AS generate_label, g.raw_answer, g.p_yes AS generate_p_yes
    FROM (SELECT * FROM cry_answer WHERE method = 'score') s
    FULL JOIN (SELECT * FROM cry_answer WHERE method = 'generate') g
        ON g.run_id = s.run_id AND g.audio_id = s.audio_id
), cry_items AS (
    SELECT
        c.run_id, 'cry'::text AS task, c.audio_id,
        array_remove(ARRAY[
            CASE WHEN gd.gold_label IS NOT NULL AND (
                (c.score_label IN ('yes', 'no') AND c.score_label <> gd.gold_label) OR
                (c.generate_label IN ('yes', 'no') AND c.generate_label <> gd.gold_label))
                THEN 'disagrees_with_gold' END,
            CASE WHEN 'unknown' IN (c.score_label, c.generate_label) THEN 'unknown' END,
            CASE WHEN abs(c.p_yes - coalesce(c.threshold, 0.5)) < 0.1 THEN 'near_threshold' END,
            CASE WHEN c.score_label IN ('yes', 'no') AND c.generate_label IN ('yes', 'no')
                AND c.score_label <> c.generate_label THEN 'methods_disagree' END
        ], NULL)                                         AS reasons,
        coalesce(c.score_label, c.generate_label)        AS label,
        c.p_yes, c.threshold, c.generate_label, c.raw_answer,
        gd.gold_label, gd.source AS gold_source,
        NULL::text AS transcript, NULL::text AS reference_text, NULL::double precision AS error_rate
    FROM cry c
    LEFT JOIN cry_gold gd ON gd.audio_id = c.audio_id
    WHERE NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = c.audio_id AND h.task = 'cry')
), asr_items AS (
    SELECT
        t.run_id, 'asr'::text AS task, t.audio_id,
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
    (i.run_id = lr.run_id)                AS is_latest_run,
    i.label, i.p_yes, i.threshold, i.generate_label, i.raw_answer,
    i.gold_label, i.gold_source,
    i.transcript, i.reference_text, i.error_rate,
    -- higher first: wrong beats unsure beats borderline; then how far off
    cardinality(i.reasons) * 10
        + CASE WHEN 'disagrees_with_gold' = ANY (i.reasons) THEN 20 ELSE 0 END
        + coalesce(least(i.error_rate, 5), 0)
        + coalesce(greatest(0, 1 - 10 * abs(i.p_yes - coalesce(i.threshold, 0.5))), 0) AS priority
FROM items i
JOIN label_run r ON r.id = i.run_id
JOIN latest_run lr ON lr.task = r.task
LEFT JOIN audio_path p ON p.audio_id = i.audio_id
WHERE cardinality(i.reasons) > 0;

-- Quality per run: counts from label_run and key metrics from run_metric (NULL until `qwen-tasks
-- metrics` has run for it). Cry metrics are per method: score_* (p_yes) and generate_* (answers).
CREATE VIEW run_quality AS
SELECT
    r.id AS run_id,
    r.task,
    r.model,
    r.revision,
    r.prompt_version,
    r.status,
    r.created_at,
    r.finished_at,
    r.n_planned,
    r.n_labelled,
    r.n_failed,
    r.audio_seconds,
    max(m.value) FILTER (WHERE m.name = 'n_gold')                 AS n_gold,
    max(m.value) FILTER (WHERE m.name = 'score.accuracy')         AS score_accuracy,
    max(m.value) FILTER (WHERE m.name = 'score.f1')               AS score_f1,
    max(m.value) FILTER (WHERE m.name = 'score.roc_auc')          AS score_roc_auc,
    max(m.value) FILTER (WHERE m.name = 'score.best_threshold')   AS best_threshold,
    max(m.value) FILTER (WHERE m.name = 'generate.accuracy')      AS generate_accuracy,
    max(m.value) FILTER (WHERE m.name = 'generate.f1')            AS generate_f1,
    max(m.value) FILTER (WHERE m.name = 'generate.unknown_rate')  AS generate_unknown_rate,
    max(m.value) FILTER (WHERE m.name = 'methods.agreement')      AS methods_agreement,
    max(m.value) FILTER (WHERE m.name = 'n_reference')            AS n_reference,
    max(m.value) FILTER (WHERE m.name = 'wer')                    AS wer,
    max(m.value) FILTER (WHERE m.name = 'cer')                    AS cer,
    max(m.value) FILTER (WHERE m.name = 'error_rate')             AS error_rate,
    max(m.value) FILTER (WHERE m.name = 'throughput.items_per_s') AS items_per_s,
    max(m.value) FILTER (WHERE m.name = 'throughput.rtf')         AS rtf,
    max(m.computed_at)                                            AS metrics_computed_at
FROM label_run r
LEFT JOIN run_metric m ON m.run_id = r.id
GROUP BY r.id;

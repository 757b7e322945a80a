-- 0008: quality per dataset and per manifest source. `qwen-tasks metrics` (qwen_tasks.quality.metrics)
-- stores, beside a run's whole-run figures (run_metric), the same figures over the run's clips of each
-- dataset it covered and of each manifest `source`: one row per run, grouping, group and metric name.
-- depends: 0007_datasets

-- grouping 'dataset': group_name is dataset.name (the datasets in run_dataset; for a run without
-- run_dataset rows, every dataset its clips belong to). grouping 'source': group_name is the `source` of
-- the clip's manifest line of the task's kind (aqa for cry, asr for asr; the latest line with a source).
-- Names as in run_metric; replaced together with them each time the run's metrics are computed.
CREATE TABLE run_metric_group (
    run_id       bigint NOT NULL REFERENCES label_run (id) ON DELETE CASCADE,
    grouping     text NOT NULL CHECK (grouping IN ('dataset', 'source')),
    group_name   text NOT NULL,
    name         text NOT NULL,
    value        double precision,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, grouping, group_name, name)
);

-- One row per run, grouping and group, with run_quality's figure columns (split: the dataset's, for
-- grouping 'dataset'). Filter on grouping and group_name.
CREATE VIEW run_quality_by_dataset AS
SELECT
    r.id AS run_id,
    r.task,
    r.model,
    r.revision,
    r.prompt_version,
    g.grouping,
    g.group_name,
    d.split,
    max(g.value) FILTER (WHERE g.name = 'n_results')               AS n_results,
    max(g.value) FILTER (WHERE g.name = 'n_gold')                  AS n_gold,
    max(g.value) FILTER (WHERE g.name = 'score.accuracy')          AS score_accuracy,
    max(g.value) FILTER (WHERE g.name = 'score.f1')                AS score_f1,
    max(g.value) FILTER (WHERE g.name = 'score.roc_auc')           AS score_roc_auc,
    max(g.value) FILTER (WHERE g.name = 'score.best_threshold')    AS best_threshold,
    max(g.value) FILTER (WHERE g.name = 'generate.accuracy')       AS generate_accuracy,
    max(g.value) FILTER (WHERE g.name = 'generate.f1')             AS generate_f1,
    max(g.value) FILTER (WHERE g.name = 'generate.unknown_rate')   AS generate_unknown_rate,
    max(g.value) FILTER (WHERE g.name = 'methods.agreement')       AS methods_agreement,
    max(g.value) FILTER (WHERE g.name = 'n_reference')             AS n_reference,
    max(g.value) FILTER (WHERE g.name = 'wer')                     AS wer,
    max(g.value) FILTER (WHERE g.name = 'cer')                     AS cer,
    max(g.value) FILTER (WHERE g.name = 'error_rate')              AS error_rate,
    max(g.computed_at)                                             AS metrics_computed_at
FROM run_metric_group g
JOIN label_run r ON r.id = g.run_id
LEFT JOIN dataset d ON g.grouping = 'dataset' AND d.name = g.group_name
GROUP BY r.id, g.grouping, g.group_name, d.split;

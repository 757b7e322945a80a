-- Quality per dataset and per manifest source: one line per run and group with its key figures (run
-- `qwen-tasks metrics` first; the view is filled from run_metric_group, written with the run's metrics).
-- grouping 'dataset': the datasets each run covered (split: train / test); 'source': the manifest lines'
-- `source` field. Latest run of each task only; drop the WHERE for every run.
SELECT q.run_id, q.task, q.grouping, q.group_name, q.split, q.n_results, q.n_gold,
       round(q.score_accuracy::numeric, 3) AS acc, round(q.score_f1::numeric, 3) AS f1,
       round(q.score_roc_auc::numeric, 3) AS auc,
       round(q.generate_unknown_rate::numeric, 3) AS gen_unknown,
       q.n_reference, round(q.wer::numeric, 3) AS wer, round(q.cer::numeric, 3) AS cer,
       q.metrics_computed_at
FROM run_quality_by_dataset q
WHERE q.run_id IN (SELECT max(id) FROM label_run GROUP BY task)
ORDER BY q.task, q.grouping, q.group_name;

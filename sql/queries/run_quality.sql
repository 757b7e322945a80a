-- Compare runs: one line per run with its key metrics (run `qwen-tasks metrics --run ID` first; the
-- metric columns stay NULL until then). All stored metrics are in run_metric (name, value, details).
SELECT run_id, task, model, prompt_version, status, n_labelled, n_failed, n_gold,
       round(score_accuracy::numeric, 3) AS acc, round(score_f1::numeric, 3) AS f1,
       round(score_roc_auc::numeric, 3) AS auc, best_threshold,
       round(generate_unknown_rate::numeric, 3) AS gen_unknown,
       round(wer::numeric, 3) AS wer, round(cer::numeric, 3) AS cer,
       round(items_per_s::numeric, 2) AS items_per_s, metrics_computed_at
FROM run_quality
ORDER BY run_id DESC;

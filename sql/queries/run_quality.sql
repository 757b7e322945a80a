-- Compare runs: one line per run with its key metrics (run `qwen-tasks metrics --run ID` first; the
-- metric columns stay NULL until then). All stored metrics are in run_metric (name, value, details).
-- wer/cer: our scoring (formatting differences are not errors); *_official: the Qwen2-Audio
-- evaluate_asr.py scoring, to compare with published tables (docs/review.md, "ASR scoring").
SELECT q.run_id, q.task, q.model, q.prompt_version, q.status, q.n_labelled, q.n_failed, q.n_gold,
       round(q.score_accuracy::numeric, 3) AS acc, round(q.score_f1::numeric, 3) AS f1,
       round(q.score_roc_auc::numeric, 3) AS auc, q.best_threshold,
       round(q.generate_unknown_rate::numeric, 3) AS gen_unknown,
       round(q.wer::numeric, 3) AS wer, round(q.cer::numeric, 3) AS cer,
       round(o.wer_official::numeric, 3) AS wer_official, round(o.cer_official::numeric, 3) AS cer_official,
       round(q.items_per_s::numeric, 2) AS items_per_s, q.metrics_computed_at
FROM run_quality q
LEFT JOIN (
    SELECT run_id,
           max(value) FILTER (WHERE name = 'wer_official') AS wer_official,
           max(value) FILTER (WHERE name = 'cer_official') AS cer_official
    FROM run_metric
    GROUP BY run_id
) o ON o.run_id = q.run_id
ORDER BY q.run_id DESC;

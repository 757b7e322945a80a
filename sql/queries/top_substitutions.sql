-- Systematic paraphrases of the latest ASR run: the most frequent (reference -> model) pairs,
-- e.g. 高兴 -> 开心. Computed by `qwen-tasks metrics`.
SELECT m.run_id, pair ->> 'reference' AS reference, pair ->> 'hypothesis' AS model_wrote,
       (pair ->> 'count')::int AS n
FROM run_metric m
CROSS JOIN LATERAL jsonb_array_elements(m.details -> 'top') AS pair
WHERE m.name = 'substitutions'
  AND m.run_id = (SELECT max(id) FROM label_run WHERE task = 'asr')
ORDER BY n DESC, reference;

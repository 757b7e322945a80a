-- Precision / recall / F1 of "p_yes >= threshold" for the latest cry run (score method), to pick a
-- threshold; the best-F1 one is run_metric 'score.best_threshold'.
SELECT (s ->> 'threshold')::float AS threshold,
       round((s ->> 'precision')::numeric, 3) AS precision,
       round((s ->> 'recall')::numeric, 3) AS recall,
       round((s ->> 'f1')::numeric, 3) AS f1,
       round((s ->> 'accuracy')::numeric, 3) AS accuracy
FROM run_metric m
CROSS JOIN LATERAL jsonb_array_elements(m.details -> 'sweep') AS s
WHERE m.name = 'score.best_threshold'
  AND m.run_id = (SELECT max(id) FROM label_run WHERE task = 'cry')
ORDER BY threshold;

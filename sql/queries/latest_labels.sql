-- The label to use now for every audio (human review first, then the newest run), and how many came
-- from each source. Swap the second query's WHERE for your own filter.
SELECT task, source, label, count(*) AS n
FROM latest_label
GROUP BY task, source, label
ORDER BY task, source, label;

SELECT audio_id, path, label, source, round(p_yes::numeric, 3) AS p_yes, model, run_id, reviewer
FROM latest_label
WHERE task = 'cry' AND label = 'yes'
ORDER BY audio_id;

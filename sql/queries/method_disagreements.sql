-- Where the two cry methods disagree in a run: p_yes says one thing, the generated answer another.
-- Reading raw_answer shows whether the normaliser or the model is at fault. The latest cry run, first
-- 200 clips: put a run id in place of the subquery for another run, drop the LIMIT for all of them.
-- (One run at a time: its answers are read by the run's index, not every run's joined first.)
SELECT s.run_id, s.audio_id, p.path, round(s.p_yes::numeric, 3) AS p_yes, s.label AS score_label,
       g.label AS generate_label, g.raw_answer
FROM cry_answer s
JOIN cry_answer g ON g.run_id = s.run_id AND g.audio_id = s.audio_id AND g.method = 'generate'
LEFT JOIN audio_path p ON p.audio_id = s.audio_id
WHERE s.run_id = (SELECT max(id) FROM label_run WHERE task = 'cry')
  AND s.method = 'score' AND s.label <> g.label
ORDER BY s.audio_id
LIMIT 200;

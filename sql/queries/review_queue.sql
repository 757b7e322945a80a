-- What to listen to next: the review queue of each task's latest run, most urgent first.
-- reasons: disagrees_with_gold, unknown, near_threshold, methods_disagree (cry); high_wer, empty_transcript (asr).
-- Items that already have a human label are not in the queue. Export it for Label Studio with
--   qwen-tasks review-export --task cry --out tasks.json
SELECT task, audio_id, path, reasons, label, round(p_yes::numeric, 3) AS p_yes, gold_label, raw_answer,
       round(error_rate::numeric, 3) AS error_rate, reference_text, transcript
FROM review_queue
WHERE is_latest_run
ORDER BY priority DESC, audio_id
LIMIT 50;

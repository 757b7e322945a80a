-- 0009: the question each clip is asked for the cry task: its audio-QA manifest line's own `question`
-- (the latest line about that audio wins, as cry_gold picks the gold label), so labelling asks what the
-- stock evaluate_aqa.py asks. Clips without such a line are asked the default question (or --question,
-- which overrides this for every clip). qwen_tasks.labelling.planning groups clips by it: one run per
-- question, whose prompt version carries a digest of the question.
-- depends: 0007_datasets

CREATE VIEW cry_question AS
SELECT DISTINCT ON (af.audio_id) af.audio_id, btrim(mi.question) AS question, mi.id AS manifest_item_id
FROM manifest_item mi
JOIN audio_file af ON af.id = mi.audio_file_id
WHERE mi.kind = 'aqa' AND btrim(coalesce(mi.question, '')) <> '' AND af.audio_id IS NOT NULL
ORDER BY af.audio_id, mi.id DESC;

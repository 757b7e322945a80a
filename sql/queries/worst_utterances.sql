-- The ASR utterances with the highest error rate in the latest ASR run, with reference and transcript.
SELECT u.audio_id, p.path, u.language, u.unit, u.n_ref, round(u.error_rate::numeric, 3) AS error_rate,
       u.substitutions, u.deletions, u.insertions, r.reference_text, t.text AS transcript
FROM utterance_score u
JOIN transcription t ON t.run_id = u.run_id AND t.audio_id = u.audio_id
LEFT JOIN asr_reference r ON r.audio_id = u.audio_id
LEFT JOIN audio_path p ON p.audio_id = u.audio_id
WHERE u.run_id = (SELECT max(id) FROM label_run WHERE task = 'asr')
ORDER BY u.error_rate DESC NULLS LAST
LIMIT 20;

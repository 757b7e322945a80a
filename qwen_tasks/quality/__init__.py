"""Stage 3, quality: how good the labels are, from the database back into it (`run_metric`) and a report.

`transcript_text` normalises ASR text per language so WER/CER count recognition errors, not formatting;
`scoring` computes WER/CER and the substitution pairs; `official_asr` re-implements the Qwen2-Audio
paper's scoring; `metrics` computes and stores a run's metrics; `report` writes the HTML report.

May import: `store`, `ingest`, `labelling` and the shared modules. Never `review`, `orchestration`, `cli`.
"""

"""Stage 4, review: people check labels; what they confirm is what the fine-tune stage learns from.

`export` writes a run's labels as JSON Lines with their provenance; `label_studio` is the Label Studio
round trip (review queue out, human labels in) and the fine-tune rows (`export-finetune`); `queue` ranks
what reviewers see; `sync` is the live Label Studio sync; `new_reviews` counts reviewed labels newer than
a task's promoted version (whether an automatic fine-tune is worth it). Fine-tuning itself is the next
stage, `qwen_tasks.finetune`.

May import: `store`, `ingest`, `labelling`, `quality` and the shared modules. Never `finetune`,
`orchestration`, `cli`.
"""

"""Stage 4, review and fine-tune: people check labels, and reviewed labels make the model better.

`export` writes a run's labels as JSON Lines with their provenance; `label_studio` is the Label Studio
round trip (review queue out, human labels in) and the fine-tune rows; `finetune` is the loop behind
`qwen-tasks finetune` and the `qwen_audio_finetune` DAG (data, split, train, evaluate, register, gate);
`trainer` is its torch side (LoRA on a loaded Qwen2-Audio).

May import: `store`, `ingest`, `labelling`, `quality` and the shared modules. Never `orchestration`, `cli`.
"""

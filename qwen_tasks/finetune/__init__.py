"""Stage 5, fine-tune: reviewed labels make the model better, and only a measurably better version is kept.

`options` holds what `qwen-tasks finetune` and the `qwen_audio_finetune` DAG take (`FinetuneOptions`, the
DAG form); `data` finds the labelled clips in scope and stores the train / held-out split (`prepare`,
done once: its result is what training uses); `trainer` is the torch side (LoRA on a loaded
Qwen2-Audio); `train` trains, saves and registers a version; `evaluate` runs the held-out and test-set
evaluation runs, the gate and the version's decision rules; `run` is the whole loop (`run_finetune`).
The DAG's steps are in `orchestration.finetune_steps`.

May import: `store`, `ingest`, `labelling`, `quality`, `review` and the shared modules. Never
`orchestration`, `cli`.
"""

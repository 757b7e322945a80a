"""Stage 2, labelling: ingested audio becomes labels (`transcription`, `cry_answer`) through a model.

`options` (what to label and how; the CLI flags and the DAG's Params come from it), `planning` (resume
or plan a run), `jobs` (runs and jobs in PostgreSQL: plan, claim with a lease, finish), `worker/` (load
a job's audio, ask the model, write results and the done mark in one transaction), `backends/` (the
models), `prompts`, `windows` (audio over 30 s), `answers` (a free-form answer becomes yes/no/unknown,
before it is stored), `registry` (which model version labels a task) and `environments` (which Python
environment can load which model).

May import: `store`, `ingest` and the shared `config` / `errors` / `records`. Never `quality`,
`review`, `orchestration` or `cli`: data flows from here to them, not back.
"""

"""Stage 1, ingest: files and manifests become rows in `audio`, `audio_file` and `manifest_item`.

`audio_files` probes, decodes and hashes audio (every failure is an `AudioError` with a reason a
person can act on), `manifests` parses the jsonl manifests users already have one line at a time, and
`register` walks folders, deduplicates by sha256 and quarantines bad files (`qwen-tasks ingest` and the
DAG's `ingest` task both call `register.ingest`). `sources` is where bytes come from when they live in
object storage (`s3://bucket/prefix` through fsspec): listings, one download per object, the workers'
bounded cache.

May import: `store` and the shared `config` / `errors` / `records`. Never a model, never a later stage.
"""

"""Development aids shipped with the package but outside the pipeline: sample audio, the tiny model, the demo.

`samples` writes synthetic audio and manifests, `tiny_model` builds the random-init Qwen2-Audio that
tests, the demo and `qwen-tasks make-tiny-model` use, `airflow_local` runs the DAG with `dag.test()` in
a project-local AIRFLOW_HOME, `airflow_stack` starts a real local CeleryExecutor Airflow (api-server,
scheduler, dag-processor, Celery workers; the slow test and `bench/dag.py --celery`), and `demo` is
`make demo`. They may import any stage; no stage imports
them, except the CLI's `make-tiny-model`.
"""

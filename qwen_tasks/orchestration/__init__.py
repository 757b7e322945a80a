"""Stage 6, orchestration: the Airflow side. The DAG files in `dags/` only wire these functions together.

`steps` holds each labelling DAG task as a plain function (ids and counts in and out, never payloads),
`finetune_steps` each fine-tune DAG task the same way (prepare, train, evaluate, promote, report),
`connection` maps the Airflow connection `qwen_tasks_db` to the CLI's database URL, `triggers` is the
deferrable wait for an external worker fleet, `assets` names the Airflow assets and decides what an
event-started run does, and `airflow_api` posts asset events from outside Airflow (REST API).

May import: every stage before it. Nothing in `qwen_tasks` imports this package except `dev` (the demo
runs the DAG), the DAG files, and `cli` (`models promote` / `review-import` post asset events).
"""

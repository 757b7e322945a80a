#!/usr/bin/env bash
# One-shot setup run by the `airflow-init` service before anything else starts. Every step is idempotent,
# so `docker compose up` can run it again on every start.
#   1. migrate Airflow's metadata database
#   2. migrate the labels database (qwen-tasks db upgrade, via QWEN_TASKS_DATABASE_URL)
#   3. create the `gpu` pool that bounds how many labelling tasks hold a GPU at once
#   4. write the admin password for Airflow 3's simple auth manager
set -euo pipefail

echo "[init] migrating the Airflow metadata database"
airflow db migrate

echo "[init] migrating the labels database"
qwen-tasks db upgrade

slots="${QWEN_TASKS_GPU_POOL_SLOTS:-1}"
echo "[init] pool gpu = ${slots} slot(s)"
airflow pools set gpu "${slots}" "GPU slots for label_batch: one per GPU worker process (QWEN_TASKS_GPU_POOL_SLOTS)"

# The simple auth manager reads user passwords from this JSON file; the user list comes from
# AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS (admin:admin in docker-compose.yml).
passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-${AIRFLOW_HOME:-/opt/airflow}/simple_auth_manager_passwords.json.generated}"
mkdir -p "$(dirname "$passwords_file")"
python - "$passwords_file" "${_AIRFLOW_WWW_USER_USERNAME:-admin}" "${_AIRFLOW_WWW_USER_PASSWORD:-admin}" <<'PY'
import json, sys
path, user, password = sys.argv[1:4]
try:
    with open(path) as f:
        passwords = json.loads(f.read().strip() or "{}")
except FileNotFoundError:
    passwords = {}
passwords[user] = password
with open(path, "w") as f:
    f.write(json.dumps(passwords) + "\n")
print(f"[init] UI login: {user} (password from _AIRFLOW_WWW_USER_PASSWORD)")
PY
echo "[init] done"

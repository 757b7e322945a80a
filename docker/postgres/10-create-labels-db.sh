#!/usr/bin/env bash
# Runs once, when the postgres volume is empty (docker-entrypoint-initdb.d). The image already created the
# Airflow metadata database ($POSTGRES_DB, owner $POSTGRES_USER); this adds the labels database and its
# own role, so the labelling data can be backed up, granted and moved independently of Airflow's.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v labels_user="${LABELS_DB_USER:-labels}" -v labels_password="${LABELS_DB_PASSWORD:-labels}" \
    -v labels_db="${LABELS_DB_NAME:-labels}" <<'SQL'
CREATE ROLE :"labels_user" LOGIN PASSWORD :'labels_password';
CREATE DATABASE :"labels_db" OWNER :"labels_user";
SQL

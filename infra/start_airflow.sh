#!/usr/bin/env bash
# Airflow standalone on 127.0.0.1:8080 with authentication on (simple auth manager: the admin
# password is generated into $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated).
# The API server uses 8080 because the defaults collide with the log server on 8793/8794.
set -euo pipefail
cd "$(dirname "$0")/.."
export GENSAR_HOME="${GENSAR_HOME:-$PWD/.gensar}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$GENSAR_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=8080
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=8793
export SPARK_LOCAL_IP=127.0.0.1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/airflow standalone

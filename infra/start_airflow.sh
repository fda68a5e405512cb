#!/usr/bin/env bash
# Airflow on one machine, everything on loopback, authentication on: what `airflow standalone`
# runs (API server, scheduler, DAG processor, triggerer), started one by one because standalone's
# log servers listen on every interface. On one machine task logs are read from local files, so
# no log server is needed. UI/API: http://127.0.0.1:8080 (8080: the defaults collide with the
# log server ports 8793/8794). Users come from AIRFLOW_USERS (default admin:admin); the passwords
# are generated into $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated. AIRFLOW_PORT
# picks another port. Ctrl-C (or a TERM to the process group) stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
export GENSAR_HOME="${GENSAR_HOME:-$PWD/.gensar}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$GENSAR_HOME/airflow}"
PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="${AIRFLOW_USERS:-admin:admin}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=False
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$PORT/execution/
export SPARK_LOCAL_IP=127.0.0.1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
airflow db migrate >/dev/null
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
airflow api-server --host 127.0.0.1 --port "$PORT" & pids+=($!)
airflow scheduler --skip-serve-logs & pids+=($!)
airflow dag-processor & pids+=($!)
airflow triggerer --skip-serve-logs & pids+=($!)
wait -n

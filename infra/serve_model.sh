#!/usr/bin/env bash
# Serve the champion GenSAR model over HTTP on loopback (MLflow scoring server).
#   infra/serve_model.sh [PORT] [MODEL_URI]     default: 5001, models:/gensar@champion
# Request (Content-Type: application/json), rows of task, history, query, k:
#   POST /invocations {"dataframe_split": {"columns": ["task","history","query","k"],
#     "data": [["search", "[{\"behavior\":\"rec\",\"item_id\":\"50\"}]", "comedy", 10]]}}
# Answer: {"predictions": [{"task", "items", "scores", "skipped_history"}]}: history items are never
# returned (both tasks); history items the model does not know are skipped and listed.
# A bad request gets HTTP 400 with "reason", "row" and "field" (rules: gensar_core/serving_model.py).
# Load test: python bench/serve.py --url http://127.0.0.1:PORT
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR="${GENSAR_HOME:-$PWD/.gensar}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$HOME_DIR/mlflow/mlflow.db}"
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
exec mlflow models serve -m "${2:-models:/gensar@champion}" --env-manager local \
  --host 127.0.0.1 --port "${1:-5001}" --workers 1

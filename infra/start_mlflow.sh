#!/usr/bin/env bash
# Start an MLflow tracking server on loopback.
#   infra/start_mlflow.sh [PORT]            sqlite backend under $GENSAR_HOME/mlflow
#   MLFLOW_BACKEND_URI=postgresql://user:pw@127.0.0.1/mlflow infra/start_mlflow.sh
# Then point the pipeline at it: --set tracking.uri=http://127.0.0.1:5000
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-5000}"
HOME_DIR="${GENSAR_HOME:-$PWD/.gensar}"
mkdir -p "$HOME_DIR/mlflow"
BACKEND="${MLFLOW_BACKEND_URI:-sqlite:///$HOME_DIR/mlflow/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACT_ROOT:-$HOME_DIR/mlflow/artifacts}"
exec .venv/bin/mlflow server --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "$BACKEND" --default-artifact-root "$ARTIFACTS" --workers 1

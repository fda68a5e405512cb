#!/usr/bin/env bash
# Start an MLflow tracking server on loopback.
#   infra/start_mlflow.sh [PORT]            sqlite backend under $GENSAR_HOME/mlflow
#   MLFLOW_BACKEND_URI=postgresql+psycopg2://gensar:PASSWORD@127.0.0.1:5432/mlflow infra/start_mlflow.sh 5000
#     (a database of infra/start_postgres.sh; name the driver: SQLAlchemy 2.1 reads a bare
#     postgresql:// as psycopg 3, which the lock does not install)
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

#!/usr/bin/env bash
# A Spark standalone cluster on this machine from the installed pyspark: one master and
# SPARK_WORKER_INSTANCES workers (default 2, 1 core and 1g each), every port on 127.0.0.1.
#   infra/start_spark_cluster.sh            master spark://127.0.0.1:7077, UI http://127.0.0.1:8090
#   SPARK_MASTER_PORT=7078 SPARK_MASTER_WEBUI_PORT=8091 SPARK_WORKER_INSTANCES=1 infra/start_spark_cluster.sh
# Then: spark-submit --master spark://127.0.0.1:7077 jobs/ingest.py, or an Airflow Spark
# connection with host spark://127.0.0.1 and port 7077 (infra/cluster.md). The master UI stays
# on (loopback only): its /json/ page is how scripts see which workers and apps it has; 8090
# because Airflow's API server takes 8080. Ctrl-C (or a TERM to this script) stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
GENSAR_HOME="${GENSAR_HOME:-$PWD/.gensar}"
PORT="${SPARK_MASTER_PORT:-7077}"
UI_PORT="${SPARK_MASTER_WEBUI_PORT:-8090}"
WORKERS="${SPARK_WORKER_INSTANCES:-2}"
CORES="${SPARK_WORKER_CORES:-1}"
MEMORY="${SPARK_WORKER_MEMORY:-1g}"
DIR="${SPARK_CLUSTER_DIR:-$GENSAR_HOME/spark-cluster}"
# every daemon, executor and driver binds loopback (this also puts the web UIs there)
export SPARK_LOCAL_IP=127.0.0.1
# executors start Python workers with the driver's PYSPARK_PYTHON; this is the fallback
export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$PWD/.venv/bin/python}"
# no REST submission server: it would take a fixed port (6066) and nothing here needs it
export SPARK_MASTER_OPTS="${SPARK_MASTER_OPTS:-} -Dspark.master.rest.enabled=false"
# the workers' own settings come from the arguments below, not from a caller's environment
unset SPARK_WORKER_PORT SPARK_WORKER_WEBUI_PORT SPARK_WORKER_DIR SPARK_WORKER_CORES SPARK_WORKER_MEMORY
mkdir -p "$DIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
.venv/bin/spark-class org.apache.spark.deploy.master.Master \
  --host 127.0.0.1 --port "$PORT" --webui-port "$UI_PORT" & pids+=($!)
for i in $(seq 1 "$WORKERS"); do
  # web UI port 0: any free port, so several workers (and clusters) never collide
  .venv/bin/spark-class org.apache.spark.deploy.worker.Worker \
    --host 127.0.0.1 --cores "$CORES" --memory "$MEMORY" --webui-port 0 \
    --work-dir "$DIR/worker-$i" "spark://127.0.0.1:$PORT" & pids+=($!)
done
wait -n

#!/usr/bin/env bash
# Regenerates docs/results.md and docs/results.json from scratch on both datasets: MovieLens-100K
# (the embedded default) and Amazon Office 2014 (configs/amazon-office.yaml; the data is not in the
# repository: OFFICE_DATA names its folder, default ../shared/datasets/amazon-office-2014).
#
# Per dataset, in its own GENSAR_HOME under RESULTS_HOME (default ./.gensar-results):
#   1. ingest, split, both embeddings, identifiers (the default pipeline's steps);
#   2. tune_baselines: SASRec and the query-aware SASRec swept on valid, the winners trained at
#      every train seed (models/baselines/*/sweep.json);
#   3. the generative model at its train seed and at each ensemble seed, one training each
#      (JOBS at once, default the number of cores, one torch thread each);
#   4. evaluate: the test split, read once, after every choice above was fixed on valid. Two-stage
#      baselines tune their depth and blend on valid inside this step.
# Then gensar_core/results.py turns both reports into docs/results.{md,json}. Extra arguments go to
# every gensar call, e.g. `--set evaluate.max_cases=500` for a quicker, rougher pass. Cost on a
# 2-core CPU, measured piecewise on 2026-12-08: about 3 hours a dataset (sweeps about 1.5 hours,
# three generative trainings 20-25 minutes each two at a time, the test evaluation of Amazon
# Office's 4,905 users at 221 ms a case for the ensemble and 76 ms for one model).
set -euo pipefail
cd "$(dirname "$0")/.."
gensar=${GENSAR:-.venv/bin/gensar}
python=${PYTHON:-.venv/bin/python}
root=${RESULTS_HOME:-$PWD/.gensar-results}
parallel=${JOBS:-$(nproc)}
office=${OFFICE_DATA:-../shared/datasets/amazon-office-2014}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SPARK_LOCAL_IP=127.0.0.1

# one model vs one model (a member as the default decodes it: the `gensar-single` row) and three
# vs three (the default ensemble, and SASRec's three seeds averaged)
# (full-catalogue ranking only: the 100-candidate protocol doubles the decoding and the
# comparison does not read it)
report=(--set "evaluate.baselines=[popularity, sasrec, sasrec-x3, query-sasrec, bm25, dense, bm25+sasrec, dense+sasrec]"
        --set "evaluate.protocols=[full]"
        --set 'evaluate.variants={gensar-single: ["train.ensemble_seeds=[]"]}'
        --set "evaluate.compare=[[gensar-single, sasrec], [gensar, sasrec-x3]]")

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed training stops the others
wait_one() { wait -n || { echo "a training failed: see $1" >&2; exit 1; }; }

run_dataset() {  # key, then the config arguments
  local key=$1; shift
  local config=("$@")
  export GENSAR_HOME="$root/$key"
  local logs="$GENSAR_HOME/logs"
  mkdir -p "$logs"
  echo "== $key: data, embeddings, identifiers"
  "$gensar" "${config[@]}" run --steps ingest,split,embed_semantic,embed_collaborative,learn_identifiers
  echo "== $key: baseline sweeps on valid (log: $logs/tune_baselines.log)"
  "$gensar" "${config[@]}" --set train.progress=false tune_baselines > "$logs/tune_baselines.log" 2>&1
  local seeds
  seeds=$("$gensar" "${config[@]}" config --json | "$python" -c '
import json, sys
train = json.load(sys.stdin)["train"]
print(" ".join(str(s) for s in dict.fromkeys([train["seed"], *train["ensemble_seeds"]])))')
  echo "== $key: the generative model at train seeds $seeds"
  local running=0
  for seed in $seeds; do
    "$gensar" "${config[@]}" --set train.num_threads=1 --set train.progress=false --set "train.seed=$seed" \
      --set "train.ensemble_seeds=[]" train > "$logs/train-seed$seed.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$parallel" ]; then wait_one "$logs"; running=$((running - 1)); fi
  done
  while [ "$running" -gt 0 ]; do wait_one "$logs"; running=$((running - 1)); done
  # the seed replicas of the single model are the ensemble's members: same folders, no new training
  echo "== $key: evaluation on test"
  "$gensar" "${config[@]}" "${report[@]}" --set "evaluate.seeds={gensar-single: [${seeds// /, }]}" evaluate
}

run_dataset ml-100k "$@"
run_dataset amazon-office -c configs/amazon-office.yaml --set "data.source.inter=$office/Office.inter.json" \
  --set "data.source.items=$office/Office.item.json" "$@"
"$python" -m gensar_core.results "ml-100k=$root/ml-100k/warehouse" "amazon-office=$root/amazon-office/warehouse" --out docs
echo "results: docs/results.md, docs/results.json"

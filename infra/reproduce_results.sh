#!/usr/bin/env bash
# Reproduces the README's results section on the embedded default: GenSAR (joint, timeline
# formulation), each variant of `evaluate.variants` in configs/ablations.yaml (rec-only,
# search-only, TIGER-style, the paper's prompted T5), then one evaluation report with every
# baseline. About 60-80 minutes on 2 CPU cores. Outputs under $GENSAR_HOME (default ./.gensar-results).
# Extra arguments go to every gensar call, e.g. `--set identifiers.codebook_size=256`.
# JOBS (default: the number of cores) variants train at once, one torch thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
gensar=${GENSAR:-.venv/bin/gensar}
export GENSAR_HOME=${GENSAR_HOME:-$PWD/.gensar-results}
config=(-c configs/ablations.yaml "$@")
parallel=${JOBS:-$(nproc)}

"$gensar" "${config[@]}" run --steps ingest,split,embed_semantic,embed_collaborative,learn_identifiers,build_corpus,train
# every model has its own folder; the corpus (all tasks) serves the prompted variant
variants=$("$gensar" "${config[@]}" config --json | .venv/bin/python -c \
    'import json, sys; print(" ".join(json.load(sys.stdin)["evaluate"]["variants"]))')
logs="$GENSAR_HOME/logs"
mkdir -p "$logs"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed variant stops the others
running=0
wait_one() { wait -n || { echo "a variant failed: see $logs" >&2; exit 1; }; running=$((running - 1)); }
for variant in $variants; do
  echo "training variant $variant (log: $logs/train-$variant.log)"
  "$gensar" "${config[@]}" --set train.num_threads=1 --set train.progress=false --variant "$variant" train \
      > "$logs/train-$variant.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait_one; fi
done
while [ "$running" -gt 0 ]; do wait_one; done
"$gensar" "${config[@]}" evaluate
echo "report: $GENSAR_HOME/warehouse/reports/eval-test/report.md"

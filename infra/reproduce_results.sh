#!/usr/bin/env bash
# Reproduces the README's results section on the embedded default: GenSAR (joint, timeline
# formulation), each variant of `evaluate.variants` in configs/ablations.yaml (rec-only,
# search-only, TIGER-style, the paper's prompted T5), then one evaluation report with every
# baseline. About 70-80 minutes on 2 CPU cores. Outputs under $GENSAR_HOME (default ./.gensar-results).
# Extra arguments go to every gensar call, e.g. `--set identifiers.codebook_size=256`.
set -euo pipefail
cd "$(dirname "$0")/.."
gensar=${GENSAR:-.venv/bin/gensar}
export GENSAR_HOME=${GENSAR_HOME:-$PWD/.gensar-results}
config=(-c configs/ablations.yaml "$@")

"$gensar" "${config[@]}" run --steps ingest,split,embed_semantic,embed_collaborative,learn_identifiers,build_corpus,train
# every model has its own folder; the corpus (all tasks) serves the prompted variant
for variant in $("$gensar" "${config[@]}" config --json | .venv/bin/python -c \
    'import json, sys; print(" ".join(json.load(sys.stdin)["evaluate"]["variants"]))'); do
  "$gensar" "${config[@]}" --variant "$variant" train
done
"$gensar" "${config[@]}" evaluate
echo "report: $GENSAR_HOME/warehouse/reports/eval-test/report.md"

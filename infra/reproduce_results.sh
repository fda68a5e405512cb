#!/usr/bin/env bash
# Reproduces the README's results section on the embedded default: GenSAR (joint), its rec-only
# and search-only variants and a TIGER-style single-ID model, one epoch each on the same splits and
# identifiers, then one evaluation report with every baseline (configs/ablations.yaml).
# About 40 minutes on 2 CPU cores. Outputs under $GENSAR_HOME (default ./.gensar-results).
# Extra arguments go to every gensar call, e.g. `--set identifiers.codebook_size=256` (the
# paper's codebooks; use another GENSAR_HOME for it).
set -euo pipefail
cd "$(dirname "$0")/.."
gensar=${GENSAR:-.venv/bin/gensar}
export GENSAR_HOME=${GENSAR_HOME:-$PWD/.gensar-results}
config=(-c configs/ablations.yaml "$@")

"$gensar" "${config[@]}" run --steps ingest,split,embed_semantic,embed_collaborative,learn_identifiers,build_corpus,train
# the corpus table is rebuilt for each variant (one corpus/ folder); each model has its own folder
for variant in "corpus.tasks.search.enabled=false corpus.tasks.query.enabled=false corpus.tasks.adhoc.enabled=false" \
               "corpus.tasks.rec.enabled=false corpus.tasks.query.enabled=false" \
               "corpus.id_scheme=semantic"; do
  overrides=()
  for o in $variant; do overrides+=(--set "$o"); done
  "$gensar" "${config[@]}" "${overrides[@]}" run --steps build_corpus,train
done
"$gensar" "${config[@]}" evaluate
echo "report: $GENSAR_HOME/warehouse/reports/eval-test/report.md"

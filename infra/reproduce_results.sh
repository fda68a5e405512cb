#!/usr/bin/env bash
# Reproduces the README's results table on the embedded default: GenSAR (joint, timeline
# formulation), each variant of `evaluate.variants` in configs/ablations.yaml (rec-only,
# search-only, TIGER-style, the paper's prompted T5), the replicas at the train seeds of
# `evaluate.seeds`, then one evaluation report with every baseline. About 4 hours on 2 CPU
# cores. Outputs under $GENSAR_HOME (default ./.gensar-results).
# Extra arguments go to every gensar call, e.g. `--set identifiers.codebook_size=256`.
# JOBS (default: the number of cores) trainings run at once, one torch thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
gensar=${GENSAR:-.venv/bin/gensar}
export GENSAR_HOME=${GENSAR_HOME:-$PWD/.gensar-results}
config=(-c configs/ablations.yaml "$@")
parallel=${JOBS:-$(nproc)}

"$gensar" "${config[@]}" run --steps ingest,split,embed_semantic,embed_collaborative,learn_identifiers
# the prompted variant reads the build_corpus prompts (all tasks); a timeline config skips that step
"$gensar" "${config[@]}" --variant gensar-prompted-t5 build_corpus
# every model has its own folder. One
# training per line, each a single model: the variant (or 'gensar', the config's own model) and
# a train seed, for the config's own seed, each ensemble member's (train.ensemble_seeds) and
# each of evaluate.seeds; a folder that two lines would train (an ensemble member that is also
# a replica or another variant's model) is trained once
trainings=$("$gensar" "${config[@]}" config --json | .venv/bin/python -c '
import json, sys
from gensar_core.config import PipelineConfig, with_overrides
from gensar_core.model.ensemble import member_config
from gensar_core.model.runs import train_seed, trained_model_dir
cfg = PipelineConfig.model_validate(json.load(sys.stdin))
ev = cfg.evaluate
seen = set()
for name in ["gensar", *ev.variants]:
    model = cfg if name == "gensar" else with_overrides(cfg, ev.variants[name])
    for seed in [train_seed(model), *model.train.ensemble_seeds, *ev.seeds.get(name, [])]:
        folder = trained_model_dir(member_config(model, seed))
        if folder not in seen:
            seen.add(folder)
            print(name, seed)')
logs="$GENSAR_HOME/logs"
mkdir -p "$logs"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed training stops the others
running=0
wait_one() { wait -n || { echo "a training failed: see $logs" >&2; exit 1; }; running=$((running - 1)); }
while read -r name seed; do
  args=(--set train.num_threads=1 --set train.progress=false --set "train.seed=$seed" --set "train.ensemble_seeds=[]")
  log="$logs/train-$name"
  if [ "$name" != gensar ]; then args+=(--variant "$name"); fi
  log+="-seed$seed.log"
  echo "training $name, train seed $seed (log: $log)"
  "$gensar" "${config[@]}" "${args[@]}" train > "$log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait_one; fi
done <<< "$trainings"
while [ "$running" -gt 0 ]; do wait_one; done
"$gensar" "${config[@]}" evaluate
echo "report: $GENSAR_HOME/warehouse/reports/eval-test/report.md"

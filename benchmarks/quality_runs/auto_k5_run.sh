#!/usr/bin/env bash
# Helper E5 (/work/notes/results_E5.md): issue 18's auto rows with auto's own 5 inner folds, refit=bag, default
# select and the 4 default candidates, one condition per command under the shared lock (sleep 45 between, so
# exclusive-lock waiters get it). Usage: auto_k5_run.sh "breast_cancer:0 breast_cancer:0.5 ..."
# Cache: fresh, outside the repo (${E5CACHE:-/tmp/e5cache/auto_cache_k5}); outputs auto_k5_<ds>_<rate>.{json,log}.
set -u
cd "$(dirname "$0")/../.."
. .venv/bin/activate
CACHE=${E5CACHE:-/tmp/e5cache/auto_cache_k5}
mkdir -p "$CACHE"
first=1
for cond in $1; do
  ds=${cond%%:*}; rate=${cond##*:}
  [ $first = 1 ] || sleep 45
  first=0
  log=benchmarks/quality_runs/auto_k5_${ds}_${rate}.log
  { date -u; uptime; } > "$log"
  flock -s /tmp/raypipe_bench.lock nice -n 19 timeout 1800 \
    python benchmarks/fusion_quality_auto.py --dataset "$ds" --dropout "$rate" --inner-folds 5 --refit bag \
      --cache "$CACHE" --json benchmarks/quality_runs/auto_k5_${ds}_${rate}.json >> "$log" 2>&1
  rc=$?
  { echo "rc=$rc"; date -u; uptime; } >> "$log"
done

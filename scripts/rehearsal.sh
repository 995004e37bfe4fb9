#!/usr/bin/env bash
# The README's main command: an end-to-end rehearsal on generated data, through day.py.
#   setup .venv -> generate data -> local competition server -> day.py --submit
#   (preflight, train_resnet.py, ensemble.py --auto, visualize.py --worst, submit.py --dry-run,
#   then one submission) -> report.html -> the server's score.
# Everything goes under rehearsal/ (data, runs, submissions); the model settings are in
# recipes/rehearsal.toml. Run it again and day.py reuses every stage whose inputs are unchanged
# (runs/day.json); the server is new each time, so it submits again. Extra arguments go to day.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1
PY=.venv/bin/python
OUT=${REHEARSAL_DIR:-rehearsal}
DATA=$OUT/data RUNS=$OUT/runs

[ -f "$DATA/test/ground_truth.json" ] || $PY -m utils.data.rehearsal_data --out "$DATA"

# The local server on a free port; its first line says where.
log=$(mktemp)
$PY -m utils.submission.server --data "$DATA" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "serving on" "$log" && break; sleep 0.1; done
url=$(grep -o 'http://[^ ]*' "$log" | head -1)
[ -n "$url" ] || { cat "$log"; echo "error: the local server did not start" >&2; exit 1; }

# The day in one command (recipes/rehearsal.toml: a small ResNet from random weights at 64 px);
# it ends with the server's score and writes $RUNS/report.html.
$PY day.py --data "$DATA" --runs "$RUNS" --out "$OUT/submissions" --recipe recipes/rehearsal.toml \
    --url "$url" --group rehearsal --submit "$@"

#!/usr/bin/env bash
# The README's main command: an end-to-end rehearsal on generated data.
#   setup .venv -> generate data -> train_resnet.py -> ensemble.py
#   -> local competition server -> submit.py -> the server's score.
# Everything goes under rehearsal/ (data, runs, submissions); run it again and the
# data, the finished training (same settings, same files) and the embeddings are reused
# from their caches. Extra arguments go to train_resnet.py (--retrain trains again).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1
PY=.venv/bin/python
OUT=${REHEARSAL_DIR:-rehearsal}
DATA=$OUT/data RUNS=$OUT/runs

[ -f "$DATA/test/ground_truth.json" ] || $PY -m utils.data.rehearsal_data --out "$DATA"

# A small ResNet from random weights at 64 px: about a minute on 2 CPU cores.
$PY train_resnet.py --data "$DATA" --runs "$RUNS" --model resnet18 --weights none \
    --img-size 64 --epochs 10 --batch-size 32 --lr 1e-3 "$@"
$PY ensemble.py --runs "$RUNS" --data "$DATA" --auto

# The local server on a free port; its first line says where.
log=$(mktemp)
$PY -m utils.submission.server --data "$DATA" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "serving on" "$log" && break; sleep 0.1; done
url=$(grep -o 'http://[^ ]*' "$log" | head -1)
[ -n "$url" ] || { cat "$log"; echo "error: the local server did not start" >&2; exit 1; }

$PY submit.py --run "$RUNS/ensemble" --url "$url" --group rehearsal --out "$OUT/submissions" \
    --data "$DATA" --preview 20

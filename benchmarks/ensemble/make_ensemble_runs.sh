#!/usr/bin/env bash
# The real runs that benchmarks/ensemble/bench_ensemble.py fuses on rehearsal data: three
# train_resnet.py models from random weights (about 10 minutes on 2 CPU cores), then
# the benchmark itself. Outputs go to benchmarks/out/ens/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1
PY=.venv/bin/python
D=benchmarks/out/ens/data R=benchmarks/out/ens/runs
[ -f "$D/test/ground_truth.json" ] || $PY -m utils.data.rehearsal_data --out "$D" --train-identities 150 --test-identities 250 --size 64
$PY train_resnet.py --data "$D" --runs "$R" --run-name resnet18 --model resnet18 --weights none --img-size 64 --epochs 6 --lr 1e-3
$PY train_resnet.py --data "$D" --runs "$R" --run-name regnetx --model regnetx_002 --weights none --img-size 64 --epochs 6 --lr 2e-3
$PY train_resnet.py --data "$D" --runs "$R" --run-name resnet18_s1 --model resnet18 --weights none --img-size 48 --epochs 5 --lr 1e-3 --aug-strength 0.5
$PY -m benchmarks.ensemble.bench_ensemble --runs "$R" --data "$D"

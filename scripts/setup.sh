#!/usr/bin/env bash
# Create .venv/ and install the pinned requirements. Safe to re-run: a venv whose
# requirements have not changed since the last install is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-nodeps.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
  # requirements-nodeps.txt: facenet-pytorch pins torch<2.3 and numpy<2; its code runs fine on the pinned set.
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --no-deps -e .  # the kit itself: utils/ and benchmarks/ import from anywhere
  echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# The README's test command: set up .venv (reused when requirements are unchanged),
# lint, then run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -m "" "$@"  # -m "": the slow tests too (plain pytest skips them)

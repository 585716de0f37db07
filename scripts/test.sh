#!/usr/bin/env bash
# Set up, then run the whole test suite (slow tests included: they guard promises).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Set up, then run the main job on the embedded default (in this process, local files, offline models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/mmembed demo "$@"

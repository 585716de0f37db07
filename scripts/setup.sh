#!/usr/bin/env bash
# Create or reuse .venv at the repository root with the verified stack, plus FFmpeg for torchcodec.
# Idempotent: a stamp of pyproject.toml + constraints.txt skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ffmpeg) >/dev/null
  else
    echo "setup: FFmpeg is missing (needed by torchcodec for audio/video): sudo apt-get install ffmpeg" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.mmembed-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: torchcodec only loads beside the torch it was built for.
  .venv/bin/python -m pip install -q -c constraints.txt torch torchvision torchcodec
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,demo,image,audio,video,nvimgcodec-cu13]"
  echo "$want" > "$stamp"
fi

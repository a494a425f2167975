#!/usr/bin/env bash
# Build txt_db/ and video_db/ (laid out like upstream's released folders) from a toy corpus,
# running the project's real preprocessing scripts; the step list and the layout are in
# scripts/toy/build_dbs.py (each step is printed as its equivalent command line).
# Usage: bash scripts/build_toy_dbs.sh RAW_DIR OUT_DIR     (PYTHON=... picks the interpreter)
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 RAW_DIR OUT_DIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m scripts.toy.build_dbs "$1" "$2"

#!/usr/bin/env bash
# Shared body of scripts/download_<dataset>.sh: download one upstream release (the file lists,
# resume, retries and skip-what-is-present behaviour are in scripts/download.py) into
# PATH_TO_STORAGE, in upstream's layout video_db/ txt_db/ pretrained/ finetune/.
# Usage: bash scripts/download_dataset.sh DATASET PATH_TO_STORAGE
#   HERO_DATA_URL=... fetches from a mirror; PYTHON=... picks the interpreter. Re-run to resume.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/download_${1:-DATASET}.sh PATH_TO_STORAGE" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m scripts.download "$1" "$2"

#!/usr/bin/env bash
# Download TVC's data and the pre-trained checkpoint (upstream's release) into PATH_TO_STORAGE,
# in upstream's layout video_db/ txt_db/ pretrained/ finetune/. The file list and the resume,
# retry and skip-what-is-present behaviour are in scripts/download.py.
# Usage: bash scripts/download_tvc.sh PATH_TO_STORAGE
#   HERO_DATA_URL=... fetches from a mirror; PYTHON=... picks the interpreter. Re-run to resume.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 PATH_TO_STORAGE" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m scripts.download tvc "$1"

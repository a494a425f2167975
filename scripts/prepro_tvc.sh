#!/usr/bin/env bash
# Build the TVC caption DBs from local raw files (data.md §5.4, §5.7).
#
# Usage: bash scripts/prepro_tvc.sh OUT_DIR ANN_DIR [TOKER_DIR]
#   ANN_DIR must already hold (nothing is downloaded):
#     tvc_train_release.jsonl tvc_val_release.jsonl tv_subtitles.jsonl
#   TOKER_DIR: local RoBERTa tokenizer folder (vocab.json + merges.txt); default $TOKER.
#   PYTHON overrides the interpreter (default: python).
# Writes tvc_{train,val}.db, the names the configs expect (upstream wrote tvc_*_new.db).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR ANN_DIR [TOKER_DIR]" >&2
    exit 2
fi
OUT=$1
ANN=$2
TOKER=${3:-${TOKER:-}}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ -z "$TOKER" ]; then
    echo "no tokenizer folder: pass TOKER_DIR or set TOKER" >&2
    exit 2
fi
for f in tvc_train_release.jsonl tvc_val_release.jsonl tv_subtitles.jsonl; do
    if [ ! -f "$ANN/$f" ]; then
        echo "missing raw file: $ANN/$f" >&2
        exit 1
    fi
done
mkdir -p "$OUT"

for SPLIT in train val; do
    echo "preprocessing tvc ${SPLIT} annotations..."
    "$PY" "$HERE/prepro_tvc.py" --annotation "$ANN/tvc_${SPLIT}_release.jsonl" \
        --subtitles "$ANN/tv_subtitles.jsonl" --output "$OUT/tvc_${SPLIT}.db" --toker "$TOKER"
done
echo "done"

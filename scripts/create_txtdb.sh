#!/usr/bin/env bash
# Build the TVR query DBs and the TV subtitle DB from local raw files (data.md §5.7).
#
# Usage: bash scripts/create_txtdb.sh OUT_DIR ANN_DIR [TOKER_DIR]
#   ANN_DIR must already hold (nothing is downloaded):
#     tvr_train_release.jsonl tvr_val_release.jsonl tvr_test_public_release.jsonl
#     tv_subtitles.jsonl (= tvqa_preprocessed_subtitles.jsonl) tv_vid2nframe.json
#     tvr_video2dur_idx.json
#   TOKER_DIR: local RoBERTa tokenizer folder (vocab.json + merges.txt); default $TOKER.
#   PYTHON overrides the interpreter (default: python).
# Unlike upstream, the scripts are called from scripts/ (upstream's script/ path was a typo).
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
for f in tvr_train_release.jsonl tvr_val_release.jsonl tvr_test_public_release.jsonl \
        tv_subtitles.jsonl tv_vid2nframe.json tvr_video2dur_idx.json; do
    if [ ! -f "$ANN/$f" ]; then
        echo "missing raw file: $ANN/$f" >&2
        exit 1
    fi
done
mkdir -p "$OUT"

for SPLIT in train val test_public; do
    echo "preprocessing tvr ${SPLIT} annotations..."
    "$PY" "$HERE/prepro_query.py" --annotation "$ANN/tvr_${SPLIT}_release.jsonl" \
        --output "$OUT/tvr_${SPLIT}.db" --toker "$TOKER" --task tvr
done

echo "preprocessing tv subtitles..."
"$PY" "$HERE/prepro_sub.py" --annotation "$ANN/tv_subtitles.jsonl" \
    --vid2nframe "$ANN/tv_vid2nframe.json" --frame_length 1.5 \
    --output "$OUT/tv_subtitles.db" --toker "$TOKER" --task tv
cp "$ANN/tvr_video2dur_idx.json" "$OUT/tv_subtitles.db/vid2dur_idx.json"
echo "done"

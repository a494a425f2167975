#!/usr/bin/env bash
# Build the TVC caption DBs (data.md §5.4, §5.7), invoked as upstream's script:
#
#   bash scripts/prepro_tvc.sh TXT_DB [ANN_DIR [TOKER]]
#
# TXT_DB is the txt_db folder (upstream's /txt): it gets tvc_train.db and tvc_val.db, the names
# config/train-tvc-8gpu.json expects (upstream wrote tvc_*_new.db); if one already exists the
# script stops before writing. ANN_DIR (default: TXT_DB itself, where the configs' val_ref
# /txt/tvc_val_release.jsonl lives) holds the raw files; a file missing there is downloaded
# into it with scripts/download.py (resumable), a present file is used as it is:
#   tvc_{train,val}_release.jsonl  $HERO_ANN_URL/TVCaption/master/data/
#   tv_subtitles.jsonl             $HERO_DATA_URL/ann/tvqa_preprocessed_subtitles.jsonl
# With another ANN_DIR, tvc_val_release.jsonl is also copied into TXT_DB (val_ref) if absent.
# TOKER: a Hugging Face model name read from the local cache or a local folder holding
# vocab.json + merges.txt (utils/tokenizer.py); default $TOKER, else roberta-base as upstream.
# Environment: PYTHON (interpreter, default python; no docker), HERO_DATA_URL (default
# https://convaisharables.blob.core.windows.net/hero), HERO_ANN_URL (the GitHub raw files;
# default https://raw.githubusercontent.com/jayleicn), HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 TXT_DB [ANN_DIR [TOKER]]   (e.g. \$PATH_TO_STORAGE/txt_db)" >&2
    exit 2
fi
OUT=$1
ANN=${2:-$1}
TOKER=${3:-${TOKER:-roberta-base}}
source "$(dirname "$0")/ann_fetch.sh"

for DB in tvc_train.db tvc_val.db; do
    if [ -e "$OUT/$DB" ]; then
        echo "$OUT/$DB already exists; remove it to rebuild it (nothing was written)" >&2
        exit 1
    fi
done
mkdir -p "$ANN" "$OUT"
for SPLIT in train val; do
    fetch "tvc_${SPLIT}_release.jsonl" \
        "${ANN_URL%/}/TVCaption/master/data/tvc_${SPLIT}_release.jsonl"
done
fetch tv_subtitles.jsonl "${DATA_URL%/}/ann/tvqa_preprocessed_subtitles.jsonl"

for SPLIT in train val; do
    echo "preprocessing tvc ${SPLIT} annotations..."
    "$PY" "$ROOT/scripts/prepro_tvc.py" --annotation "$ANN/tvc_${SPLIT}_release.jsonl" \
        --subtitles "$ANN/tv_subtitles.jsonl" --output "$OUT/tvc_${SPLIT}.db" --toker "$TOKER"
done
if [ ! -f "$OUT/tvc_val_release.jsonl" ]; then
    cp "$ANN/tvc_val_release.jsonl" "$OUT/tvc_val_release.jsonl"
fi
echo "done"

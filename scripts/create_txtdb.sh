#!/usr/bin/env bash
# Build the TVR query DBs and the TV subtitle DB (data.md §5.7), invoked as upstream's script:
#
#   bash scripts/create_txtdb.sh $PATH_TO_STORAGE/txt_db $PATH_TO_STORAGE/ann [TOKER]
#
# ANN_DIR (2nd argument) holds the raw annotations. A file missing there is downloaded into it
# with scripts/download.py (resumable); a present file is used as it is:
#   tvr_{train,val,test_public}_release.jsonl  $HERO_ANN_URL/TVRetrieval/master/data/
#   tv_subtitles.jsonl                         $HERO_DATA_URL/ann/tvqa_preprocessed_subtitles.jsonl
#   tv_vid2nframe.json tvr_video2dur_idx.json  $HERO_DATA_URL/ann/
# OUT_DIR (1st argument) gets tvr_{train,val,test_public}.db (test_public with video_ids.json,
# its videos in tvr_video2dur_idx.json) and tv_subtitles.db (with vid2dur_idx.json), the names
# config/train-tvr-8gpu.json expects; if one already exists the script stops before writing.
# TOKER: a Hugging Face model name read from the local cache or a local folder holding
# vocab.json + merges.txt (utils/tokenizer.py); default $TOKER, else roberta-base as upstream.
# Environment: PYTHON (interpreter, default python; no docker), HERO_DATA_URL (default
# https://convaisharables.blob.core.windows.net/hero), HERO_ANN_URL (the GitHub raw files;
# default https://raw.githubusercontent.com/jayleicn), HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE.
# Unlike upstream, the scripts are called from scripts/ (upstream's script/ path was a typo).
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 OUT_DIR ANN_DIR [TOKER]" \
         "(e.g. \$PATH_TO_STORAGE/txt_db \$PATH_TO_STORAGE/ann)" >&2
    exit 2
fi
OUT=$1
ANN=$2
TOKER=${3:-${TOKER:-roberta-base}}
source "$(dirname "$0")/ann_fetch.sh"

for DB in tvr_train.db tvr_val.db tvr_test_public.db tv_subtitles.db; do
    if [ -e "$OUT/$DB" ]; then
        echo "$OUT/$DB already exists; remove it to rebuild it (nothing was written)" >&2
        exit 1
    fi
done
mkdir -p "$ANN" "$OUT"
for SPLIT in train val test_public; do
    fetch "tvr_${SPLIT}_release.jsonl" \
        "${ANN_URL%/}/TVRetrieval/master/data/tvr_${SPLIT}_release.jsonl"
done
fetch tv_subtitles.jsonl "${DATA_URL%/}/ann/tvqa_preprocessed_subtitles.jsonl"
fetch tv_vid2nframe.json "${DATA_URL%/}/ann/tv_vid2nframe.json"
fetch tvr_video2dur_idx.json "${DATA_URL%/}/ann/tvr_video2dur_idx.json"

for SPLIT in train val test_public; do
    echo "preprocessing tvr ${SPLIT} annotations..."
    "$PY" "$ROOT/scripts/prepro_query.py" --annotation "$ANN/tvr_${SPLIT}_release.jsonl" \
        --output "$OUT/tvr_${SPLIT}.db" --toker "$TOKER" --task tvr
done

echo "preprocessing tv subtitles..."
"$PY" "$ROOT/scripts/prepro_sub.py" --annotation "$ANN/tv_subtitles.jsonl" \
    --vid2nframe "$ANN/tv_vid2nframe.json" --frame_length 1.5 \
    --output "$OUT/tv_subtitles.db" --toker "$TOKER" --task tv
cp "$ANN/tvr_video2dur_idx.json" "$OUT/tv_subtitles.db/vid2dur_idx.json"
# test_public queries carry no vid_name (empty query2video.json): the loaders read the test
# videos from video_ids.json instead (data.md pitfall 27)
"$PY" - "$ANN/tvr_video2dur_idx.json" "$OUT/tvr_test_public.db/video_ids.json" <<'PYEOF'
import json
import sys

with open(sys.argv[1]) as f:
    videos = sorted(json.load(f).get("test_public", {}))
with open(sys.argv[2], "w") as f:
    json.dump(videos, f)
PYEOF
echo "done"

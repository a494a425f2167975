# Sourced by create_txtdb.sh and prepro_tvc.sh (needs ANN set): the interpreter, the download
# addresses (HERO_DATA_URL for upstream's blob or a mirror, HERO_ANN_URL for the annotation
# jsonl of TVRetrieval/TVCaption) and `fetch FILE URL`, which downloads ANN/FILE through
# scripts/download.py (resumable, retried) unless it is already there.
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_URL=${HERO_DATA_URL:-https://convaisharables.blob.core.windows.net/hero}
ANN_URL=${HERO_ANN_URL:-https://raw.githubusercontent.com/jayleicn}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

fetch() {
    if [ -f "$ANN/$1" ]; then
        return
    fi
    echo "downloading $2 -> $ANN/$1"
    "$PY" -m scripts.download file "$2" "$ANN/$1" || {
        echo "could not download $ANN/$1 from $2; set HERO_DATA_URL / HERO_ANN_URL to a" \
             "mirror, or put the file there yourself" >&2
        exit 1
    }
}

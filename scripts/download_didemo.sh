#!/usr/bin/env bash
# Download DiDeMo's data and the pre-trained checkpoint (upstream's release) into
# PATH_TO_STORAGE, in upstream's layout video_db/ txt_db/ pretrained/ finetune/.
# Usage: bash scripts/download_didemo.sh PATH_TO_STORAGE (details: scripts/download_dataset.sh)
exec bash "$(dirname "$0")/download_dataset.sh" didemo "$@"

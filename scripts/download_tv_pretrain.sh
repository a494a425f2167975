#!/usr/bin/env bash
# Download the TV pre-training data and its initial weights (upstream's release) into
# PATH_TO_STORAGE, in upstream's layout video_db/ txt_db/ pretrained/ finetune/.
# Usage: bash scripts/download_tv_pretrain.sh PATH_TO_STORAGE (details: scripts/download_dataset.sh)
exec bash "$(dirname "$0")/download_dataset.sh" tv_pretrain "$@"

#!/usr/bin/env bash
# Download TVR's data, the pre-trained checkpoint and the fine-tuned tvr_default run (upstream's
# release) into PATH_TO_STORAGE, in upstream's layout video_db/ txt_db/ pretrained/ finetune/.
# Usage: bash scripts/download_tvr.sh PATH_TO_STORAGE (details: scripts/download_dataset.sh)
exec bash "$(dirname "$0")/download_dataset.sh" tvr "$@"

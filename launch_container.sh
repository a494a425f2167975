#!/usr/bin/env bash
# Start the hero container with upstream's mount layout:
#   source launch_container.sh TXT_DB VID_DIR OUTPUT PRETRAIN_DIR [--prepro]
# repo -> /src (rw), OUTPUT -> /storage (rw), PRETRAIN_DIR -> /pretrain (ro),
# TXT_DB -> /txt (ro; rw with --prepro), VID_DIR -> /video (ro).
# Respects CUDA_VISIBLE_DEVICES (default: all GPUs). Image: $HERO_IMAGE (default hero:latest,
# build it with `docker build -t hero:latest .`).
TXT_DB=$1
VID_DIR=$2
OUTPUT=$3
PRETRAIN_DIR=$4
if [ -z "$TXT_DB" ] || [ -z "$VID_DIR" ] || [ -z "$OUTPUT" ] || [ -z "$PRETRAIN_DIR" ]; then
    echo "usage: source launch_container.sh TXT_DB VID_DIR OUTPUT PRETRAIN_DIR [--prepro]" >&2
    return 1 2>/dev/null || exit 1
fi
if [ -z "$CUDA_VISIBLE_DEVICES" ]; then
    CUDA_VISIBLE_DEVICES=all
fi
TXT_MOUNT="src=$TXT_DB,dst=/txt,type=bind,readonly"
if [ "$5" == "--prepro" ]; then
    TXT_MOUNT="src=$TXT_DB,dst=/txt,type=bind"
fi
docker run --gpus "\"device=$CUDA_VISIBLE_DEVICES\"" --ipc=host --network=host --rm -it \
    --mount src="$(pwd)",dst=/src,type=bind \
    --mount src="$OUTPUT",dst=/storage,type=bind \
    --mount src="$PRETRAIN_DIR",dst=/pretrain,type=bind,readonly \
    --mount "$TXT_MOUNT" \
    --mount src="$VID_DIR",dst=/video,type=bind,readonly \
    -e NVIDIA_VISIBLE_DEVICES="$CUDA_VISIBLE_DEVICES" \
    -w /src "${HERO_IMAGE:-hero:latest}"

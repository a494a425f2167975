# hero: HERO on PyTorch 2.x. Replaces upstream's 2019 NGC image (apex, Horovod) with an
# official PyTorch CUDA runtime image; distribution is torchrun + NCCL, mixed precision torch.amp.
# Pick the tag whose CUDA version your driver supports; the torch in the image must be the
# version requirements.txt pins (pip keeps it and installs only what is missing).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
# Java runs the PTB tokenizer and METEOR inside pycocoevalcap (TVC caption metrics).
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless git \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# Source is mounted at /src by launch_container.sh so edits need no rebuild.
WORKDIR /src

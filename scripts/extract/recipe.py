"""Every preprocessing constant of the extractor, each with the reason for its value.

What is known about the released HERO features (data.md §4, upstream README): they were made by
the separate HERO_Video_Feature_Extractor project, one row per ``frame_interval`` seconds
(1.5 s TV/VIOLIN/DiDeMo, 2 s MSR-VTT); ResNet-152 (ImageNet) on frames decoded at
``1 / frame_interval`` fps, L2-normalised by default; SlowFast R50 8x8 (Kinetics-400) on
windows of ``frame_interval`` seconds; float16 ``.npz`` per clip under key ``features``.
Unknown, and chosen here: the exact frame of each window fed to ResNet, the frame rate and
placement of the SlowFast frames inside a window, resize/crop sizes and interpolation, and
whether the SlowFast rows were L2-normalised. ``--check_against`` measures how close a re-run is.
"""
from __future__ import annotations

# --- time grid ---------------------------------------------------------------------------------
# One feature row per interval: the released TV grid (data.md §1.2, frame t covers
# [t*fi, (t+1)*fi)). MSR-VTT used 2 s; pass --frame_interval 2 for it.
DEFAULT_FRAME_INTERVAL = 1.5
# A row exists when its window starts inside the video: rows = ceil(duration / interval). The
# tolerance keeps float round-off of "last frame time + frame duration" from adding a row whose
# window starts exactly at the video end (e.g. 90 frames at 30 fps, fi 1.5 -> 2 rows, not 3).
ROW_START_TOLERANCE_S = 1e-3
# ResNet sees one frame per row: the frame nearest to the window start, which is what sampling
# the video at 1/interval fps (ffmpeg's fps filter in the released extractor) picks.
RESNET_FRAME_OFFSET = 0.0  # fraction of the interval after the window start

# --- spatial preprocessing (both streams) ------------------------------------------------------
# Shorter side resized to FRAME_SIZE, then a centre FRAME_SIZE x FRAME_SIZE crop: the ImageNet
# / Kinetics test-time input of both networks (SlowFast's head pools a 7x7 map = 224 / 32), and
# the 224 frames of the released 2D extractor. One size for both streams lets a decoded frame
# be resized once and shared.
FRAME_SIZE = 224
# swscale bilinear: an area-aware downscale close to PIL's antialiased bilinear of torchvision.
RESIZE_INTERPOLATION = "BILINEAR"

# --- ResNet-152 (torchvision ImageNet weights) -------------------------------------------------
# torchvision's ImageNet normalisation, which its resnet152 checkpoints were trained with.
RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)
RESNET_DIM = 2048  # global-average-pooled layer4 output, the 2048 columns HERO reads first

# --- SlowFast R50 8x8 (pytorchvideo Kinetics-400 weights) --------------------------------------
# Kinetics normalisation of PySlowFast / pytorchvideo, which the slowfast_r50 weights expect.
SLOWFAST_MEAN = (0.45, 0.45, 0.45)
SLOWFAST_STD = (0.225, 0.225, 0.225)
# "8x8": the slow pathway sees 8 frames, the fast one ALPHA = 4 times more (32). The 32 fast
# frames are spread uniformly over the row's window (at the centres of 32 equal slots), so the
# window covers exactly [t*fi, (t+1)*fi) whatever the source frame rate.
SLOWFAST_ALPHA = 4
SLOWFAST_FAST_FRAMES = 32
SLOWFAST_SLOW_FRAMES = SLOWFAST_FAST_FRAMES // SLOWFAST_ALPHA
SLOWFAST_SLOW_DIM = 2048
SLOWFAST_FAST_DIM = 256
SLOWFAST_DIM = SLOWFAST_SLOW_DIM + SLOWFAST_FAST_DIM  # slow first, then fast: 2304

# --- outputs -----------------------------------------------------------------------------------
# Folder names and key read by scripts/collect_video_feature_paths.py (data.md §5.5).
STREAM_DIRS = {"resnet": "resnet_features", "slowfast": "slowfast_features"}
STREAM_DIMS = {"resnet": RESNET_DIM, "slowfast": SLOWFAST_DIM}
FEATURE_KEY = "features"
# The released per-clip files are float16; convert_videodb.py casts to float32.
FEATURE_DTYPE = "float16"
# The released extractor L2-normalises the ResNet rows by default; for SlowFast it is unknown,
# so it is off by default (cosine similarity in --check_against does not depend on it, the
# reported mean row norms show which convention the reference used).
DEFAULT_L2_NORMALIZE = ("resnet",)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")

"""Extract HERO video features from your own video files (issue 8).

Usage (from the repository root)::

    python scripts/extract_features.py --video_dir VIDEOS --output FEATS \
        --resnet_ckpt resnet152-b121ed2d.pth --slowfast_ckpt SLOWFAST_8x8_R50.pyth \
        [--frame_interval 1.5] [--check_against RELEASED_FEATS]
    python scripts/collect_video_feature_paths.py --feature_dir FEATS --output video_db \
        --dataset mine
    python scripts/convert_videodb.py --vfeat_info_file video_db/mine/video_feat_info.pkl \
        --output video_db --dataset mine --frame_length 1.5

Every mp4/mkv/webm/avi/mov under ``--video_dir`` (decoded with PyAV) becomes
``FEATS/resnet_features/<folder>/<vid>.npz`` (ResNet-152, 2048-d) and
``FEATS/slowfast_features/<folder>/<vid>.npz`` (SlowFast R50 8x8, 2304-d), key ``features``,
float16, one row per ``--frame_interval`` seconds. Checkpoints are local files (nothing is
downloaded): torchvision's ``resnet152-b121ed2d.pth`` and pytorchvideo's
``SLOWFAST_8x8_R50.pyth``. Re-running resumes (finished files are skipped); failures are listed
at the end and in ``FEATS/extract_failures.json``. ``--check_against DIR`` then compares every
extracted file with the file of the same clip in DIR (same layout) and prints per-stream cosine
similarity (mean, min) as JSON. Preprocessing constants and what is known about the released
features: ``scripts/extract/recipe.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from scripts.extract.pipeline import (  # noqa: E402
    ExtractConfig,
    check_against,
    extract,
    find_videos,
    plan_jobs,
)
from scripts.extract.recipe import (  # noqa: E402
    DEFAULT_FRAME_INTERVAL,
    DEFAULT_L2_NORMALIZE,
    FRAME_SIZE,
    STREAM_DIRS,
    VIDEO_EXTENSIONS,
)
from scripts.extract.weights import build_streams  # noqa: E402

LOGGER = logging.getLogger("extract_features")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video_dir", required=True, help="folder of video files (recursive)")
    parser.add_argument("--output", required=True, help="feature folder (FEATS)")
    parser.add_argument("--frame_interval", type=float, default=DEFAULT_FRAME_INTERVAL,
                        help="seconds per feature row (1.5 TV/VIOLIN/DiDeMo, 2 MSR-VTT)")
    parser.add_argument("--streams", nargs="+", choices=list(STREAM_DIRS),
                        default=list(STREAM_DIRS), help="which feature files to write")
    parser.add_argument("--resnet_ckpt", help="torchvision resnet152 state dict (.pth)")
    parser.add_argument("--slowfast_ckpt", help="pytorchvideo SLOWFAST_8x8_R50.pyth")
    parser.add_argument("--random_weights", action="store_true",
                        help="no checkpoint: random weights (smoke tests only)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --random_weights: one block per stage (smoke tests only)")
    parser.add_argument("--batch_size", type=int, default=16, help="feature rows per batch")
    parser.add_argument("--num_workers", type=int, default=4, help="decoding workers")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--l2_normalize", nargs="*", choices=list(STREAM_DIRS),
                        default=list(DEFAULT_L2_NORMALIZE),
                        help="streams whose rows are L2-normalised (none: pass no value)")
    parser.add_argument("--frame_size", type=int, default=FRAME_SIZE,
                        help="resize/crop size (224 for the real networks)")
    parser.add_argument("--extensions", nargs="+", default=list(VIDEO_EXTENSIONS))
    parser.add_argument("--check_against", default=None,
                        help="folder of reference features (same layout) to compare with")
    return parser.parse_args(argv)


def config_from(opts) -> ExtractConfig:
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = opts.precision or ("bf16" if device.startswith("cuda") else "fp32")
    return ExtractConfig(interval=opts.frame_interval, batch_size=opts.batch_size,
                         num_workers=opts.num_workers, device=device, precision=precision,
                         l2_normalize=tuple(opts.l2_normalize), frame_size=opts.frame_size)


def main(argv=None) -> dict:
    """Run the CLI; returns ``{"summary": Summary, "check": report or None}``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = parse_args(argv)
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}"
                       for e in opts.extensions)
    jobs, skipped = plan_jobs(find_videos(opts.video_dir, extensions), opts.output,
                              opts.streams)
    streams = build_streams(opts.streams, opts.resnet_ckpt, opts.slowfast_ckpt,
                            opts.random_weights, opts.tiny) if jobs else {}
    summary = extract(jobs, opts.output, streams, config_from(opts), skipped)
    report = None
    if opts.check_against:
        report = check_against(opts.output, opts.check_against)
        print(json.dumps(report, indent=1))
    return {"summary": summary, "check": report}


if __name__ == "__main__":
    main()

"""Full-corpus video retrieval (MSR-VTT) evaluation of a trained model.

Usage (from the repository root)::

    python eval_vr.py --query_txt_db /txt/msrvtt_val.db --split val --vfeat_db /video/msrvtt \
        --sub_txt_db /txt/msrvtt_subtitles.db --task msrvtt_video_sub \
        --output_dir /storage/msrvtt_default --checkpoint 4000 [--fp16] [--config FILE]

Scores are the max-over-frames cosine (no exp, training.md §5.6); metrics R@1/5/10/100. Writes
``{output_dir}/results_{split}/results_{checkpoint}_all.json`` and
``metrics_{checkpoint}_all.json`` beside it.
"""
from __future__ import annotations

from eval.retrieval import validate_full_vr  # noqa: F401 - upstream's import location
from eval.retrieval_cli import run
from utils.errors import run_main


def main(argv=None):
    return run("vr", argv)


if __name__ == "__main__":
    run_main(main)

"""Evaluate a fine-tuned TVQA / How2QA model (training.md §1.4, §5.7).

Usage (from the repository root)::

    python eval_videoQA.py --query_txt_db /txt/tvqa_val.db --split val \
        --sub_txt_db /txt/tv_subtitles.db --vfeat_db /video/tv \
        --output_dir /storage/tvqa_default --checkpoint 2000 [--save_logits] [--fp16]

Multi-GPU: ``torchrun --nproc_per_node N eval_videoQA.py ...`` (questions are sharded by rank and
the predictions gathered). Data settings come from ``{output_dir}/log/hps.json`` and the
architecture from ``log/model_config.json``. Rank 0 writes upstream's submission dict
``{qid: answer_index}`` to ``{output_dir}/results_{split}[_w_logit]/results_{ckpt}_all.json``,
``logits_{ckpt}_all.pkl`` (``{qid: [5 logits]}``) with ``--save_logits``, and the metrics
(accuracy, loss; none for an unlabelled test split) as ``metrics_{ckpt}_all.json``.
"""
from __future__ import annotations

from data.videoQA import VideoQaEvalDataset, video_qa_eval_collate
from eval.qa import build_qa_parser, parse_qa_args, run_qa_eval, validate_videoQA
from model.videoQA import HeroForVideoQA
from utils.errors import run_main

DEFAULTS = dict(sub_txt_db="/txt/tv_subtitles.db", vfeat_db="/video/tv",
                query_txt_db="/txt/tvqa_val.db/", split="val")


def parse_args(argv=None):
    parser = build_qa_parser("video QA evaluation (TVQA / How2QA)", DEFAULTS,
                             ["val", "test_public", "test"], ["tvqa", "how2qa"])
    return parse_qa_args(parser, argv)


def main(argv=None):
    """Returns ``(val_log, results, logits)`` (logits None without ``--save_logits``)."""
    opts = parse_args(argv)

    def validate(model, loader, save_logits, fp16, bf16):
        return validate_videoQA(model, loader, opts.task, save_logits, fp16, bf16)

    return run_qa_eval(opts, HeroForVideoQA, validate, opts.task, VideoQaEvalDataset,
                       video_qa_eval_collate)


if __name__ == "__main__":
    run_main(main)

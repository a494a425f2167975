"""Evaluate a fine-tuned VIOLIN model (training.md §1.4, §5.8).

Usage (from the repository root)::

    python eval_violin.py --query_txt_db /txt/violin_test.db --split test \
        --sub_txt_db /txt/violin_subtitles.db --vfeat_db /video/violin \
        --output_dir /storage/violin_default --checkpoint 6000 [--save_logits] [--fp16]

Multi-GPU: ``torchrun --nproc_per_node N eval_violin.py ...``. Data settings (including
``compressed_db``, true for VIOLIN) come from ``{output_dir}/log/hps.json``. Rank 0 writes
``{qid: 0/1}`` to ``{output_dir}/results_{split}[_w_logit]/results_{ckpt}_all.json``, the
logits (``{qid: [logit]}``) as ``logits_{ckpt}_all.pkl`` with ``--save_logits`` and
``valid/{split}_acc`` / ``_loss`` / ``_ex_per_s`` as ``metrics_{ckpt}_all.json``.

Open question 7: upstream reads ``sampled_by_q`` from hps.json, where no training option
defines it; here it defaults to True (one item per statement), the intended value.
"""
from __future__ import annotations

from data.violin import ViolinEvalDataset, violin_eval_collate
from eval.common import load_hps
from eval.qa import build_qa_parser, parse_qa_args, run_qa_eval, validate_violin
from model.violin import HeroForViolin
from utils.errors import run_main

DEFAULTS = dict(sub_txt_db="/txt/violin_subtitles.db", vfeat_db="/video/violin",
                query_txt_db="/txt/violin_test.db", split="test")


def parse_args(argv=None):
    return parse_qa_args(build_qa_parser("VIOLIN evaluation", DEFAULTS, ["val", "test"]), argv)


def main(argv=None):
    """Returns ``(val_log, results, logits)`` (logits None without ``--save_logits``)."""
    opts = parse_args(argv)

    def validate(model, loader, save_logits, fp16, bf16):
        return validate_violin(model, loader, opts.split, save_logits, fp16, bf16)

    sampled_by_q = getattr(load_hps(opts.output_dir), "sampled_by_q", True)
    return run_qa_eval(opts, HeroForViolin, validate, "violin", ViolinEvalDataset,
                       violin_eval_collate, sampled_by_q=sampled_by_q)


if __name__ == "__main__":
    run_main(main)

"""MSR-VTT video retrieval fine-tuning (training.md §4.3), video+subtitle and video-only.

    torchrun --nproc_per_node 4 train_vr.py --config config/train-msrvtt_video_only-4gpu.json
    python train_vr.py --config config/train-msrvtt_video_only-demo.json      # toy corpus, CPU

``train_vcmr`` with upstream's differences: the VCMR parser (so ``--task`` on the command line
only accepts VCMR names; the configs set ``msrvtt_video_sub``/``msrvtt_video_only`` through
JSON, which bypasses ``choices`` as upstream), ``HeroForVr`` (no span loss; a ranking weight
must be non-zero), loss = ``neg_ctx + neg_q`` with meters ``loss/{task}``,
``loss/{task}_neg_ctx``, ``loss/{task}_neg_q``. Validation: loss validation (no ``st_ed``
term), then full VR evaluation (:func:`eval.retrieval.validate_full_vr`: max-over-frames
cosine, R@1/5/10/100) of val and test, then the checkpoint. ``vr_eval_q_batch_size``,
``vr_eval_video_batch_size`` and ``max_vr_video`` are declared flags here (§8 question 8) with
the defaults the configs rely on.
"""
from __future__ import annotations

import sys

from config.config import ConfigError, SharedConfigs
from data.txt_db import VrQueryTokLmdb
from data.vr import (
    VrDataset,
    VrEvalDataset,
    VrFullEvalDataset,
    VrVideoOnlyDataset,
    VrVideoOnlyEvalDataset,
    VrVideoOnlyFullEvalDataset,
)
from eval.retrieval import validate_full_vr
from model.vr import VR_TASKS, HeroForVr
from train_vcmr import VcmrTask
from utils.entry import parse_task_args, run_training
from utils.errors import run_main


class VrTask(VcmrTask):
    """VCMR's wiring with the VR model, datasets, loss terms and evaluation."""

    model_cls = HeroForVr
    query_db_cls = VrQueryTokLmdb
    terms = ("neg_ctx", "neg_q")
    dataset_classes = {False: (VrDataset, VrEvalDataset, VrFullEvalDataset),
                       True: (VrVideoOnlyDataset, VrVideoOnlyEvalDataset,
                              VrVideoOnlyFullEvalDataset)}
    full_eval_batch_key = "vr_eval_q_batch_size"

    def __init__(self, opts):
        if opts.task not in VR_TASKS:
            raise ConfigError(f"train_vr.py: task {opts.task!r} is not a video retrieval task; "
                              f"set 'task' to one of {VR_TASKS} in the --config JSON")
        super().__init__(opts)

    def model_kwargs(self) -> dict:
        """HeroForVr forces span weight 0 and drop_svmr_prob 1; hard negatives start off."""
        kwargs = super().model_kwargs()
        del kwargs["lw_st_ed"], kwargs["drop_svmr_prob"]
        return kwargs

    def term_weights(self, model) -> tuple:
        return model.lw_neg_ctx, model.lw_neg_q

    def full_eval(self, model, loader, split):
        """As :meth:`VcmrTask.full_eval`, with MSR-VTT's VR evaluation."""
        return validate_full_vr(model, loader, split, self.opts,
                                ranks=self.validation_world().size)


def parse_args(argv=None):
    return parse_task_args("HERO video retrieval fine-tuning (MSR-VTT)",
                           SharedConfigs.get_vr_args, argv)


def main(argv=None):
    return run_training(VrTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

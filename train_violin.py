"""Fine-tune HERO on VIOLIN video-and-language inference (training.md §4.5, §5.8; model.md §9.4).

    torchrun --nproc_per_node 8 train_violin.py --config config/train-violin-8gpu.json
    python train_violin.py --config config/train-violin-demo.json         # toy corpus, CPU
    python train_violin.py --config config/train-violin-demo.json --checkpoint ''  # scratch

A training item is a statement and its pair (``...-0`` / ``...-1``) on the same video; the loss
is the mean binary cross-entropy of sigmoid(logit) against the 0/1 label. The wiring is
:class:`train_videoQA.VideoQaTask` with VIOLIN's datasets, model, loss and validation.
Engine flags (upstream's violin): ``lr_mul`` on ``violin_pool``/``violin_pred_head``, training
state saved before validation, ``model_step_N_final.pt`` always saved at the end.

``max_frm_seq_len`` is ``max(100, rows of the checkpoint's frame-position table)``; a shorter
table is zero-padded to 100 rows (``HeroForViolin.from_pretrained``), as upstream.
Validation every ``valid_steps`` on **both** val and test (VIOLIN's test split has labels):
TB keys ``valid_violin/violin_valid/{split}_{loss,acc,ex_per_s}``.

Decision (P8): upstream wrote the val and test predictions to the same file name, so test
overwrote val; here each split keeps its own file,
``results/{split}_results_{step}[_final]_all.json`` (rank 0, gathered from every rank).
"""
from __future__ import annotations

import sys

from config.config import SharedConfigs
from data.violin import ViolinDataset, ViolinEvalDataset, violin_collate, violin_eval_collate
from eval.qa import validate_violin
from model.model import VFEAT_DIM, max_frm_seq_len_from_state_dict
from model.violin import VIOLIN_MAX_FRM_SEQ_LEN, HeroForViolin
from train_videoQA import VideoQaTask, init_state_dict
from utils.entry import parse_task_args, run_training
from utils.errors import run_main


class ViolinTask(VideoQaTask):
    """VIOLIN wiring on top of the video QA task (same flags, inputs and cadence)."""

    train_dataset_cls, train_collate = ViolinDataset, staticmethod(violin_collate)
    eval_dataset_cls, eval_collate = ViolinEvalDataset, staticmethod(violin_eval_collate)

    def build_model(self):
        state = init_state_dict(self.opts.checkpoint)
        max_frm_seq_len = max(VIOLIN_MAX_FRM_SEQ_LEN, max_frm_seq_len_from_state_dict(state))
        return HeroForViolin.from_pretrained(self.opts.model_config, state, VFEAT_DIM,
                                             max_frm_seq_len)

    def compute_loss(self, model, task: str, batch):
        return model(batch, "violin", compute_loss=True), {}

    def validate_split(self, model, split: str, loader):
        return validate_violin(model, loader, split, fp16=self.opts.fp16,
                               bf16=getattr(self.opts, "bf16", False))

    def tb_key(self, split: str, key: str) -> str:
        return f"valid_violin/violin_{key}"


def parse_args(argv=None):
    return parse_task_args("HERO VIOLIN fine-tuning",
                           SharedConfigs.get_violin_args, argv, empty_checkpoint_is_none=True)


def main(argv=None):
    return run_training(ViolinTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

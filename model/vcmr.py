"""VCMR — TVR, How2R, DiDeMo (model.md §9.1): ``HeroForVcmr``.

Same modules and keys as pretraining; every VCMR task name routes to the VSM path. Training
batches hold one query per video (N_q = N_v), so local alignment runs in non-cross mode while the
global ranking compares every query with every (gathered) video. Inference goes through
:meth:`get_pred_from_raw_query` (inherited) on frame embeddings encoded separately.
"""
from __future__ import annotations

from model.pretrain import HeroForPretraining

VCMR_TASKS = ("tvr", "how2r", "didemo_video_sub", "didemo_video_only", "vsm")


class HeroForVcmr(HeroForPretraining):
    """``forward(batch, task='tvr', compute_loss=True)``: the weighted loss triple, or
    (video scores or None, st, ed) with ``compute_loss=False``. Only VCMR task names are
    accepted: MLM/MFM/FOM belong to :class:`HeroForPretraining`."""

    vsm_tasks = VCMR_TASKS

    def forward(self, batch, task="tvr", compute_loss=True):
        if task not in self.vsm_tasks:
            raise ValueError(f"{type(self).__name__} got unknown task {task!r}; expected one "
                             f"of {self.vsm_tasks}")
        return self.forward_vsm(batch, compute_loss)

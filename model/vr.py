"""VR — MSR-VTT video retrieval (model.md §9.2): ``HeroForVr``.

A VCMR model with the span part switched off for good: ``lw_st_ed = 0`` and
``drop_svmr_prob = 1.0`` are forced and cannot be set from outside (the constructor has no such
arguments, as upstream's VR flags drop them). At least one ranking weight must be non-zero. The
start/end predictor weights stay in the state dict but are never used.
"""
from __future__ import annotations

import logging

from model.vcmr import HeroForVcmr

logger = logging.getLogger(__name__)

VR_TASKS = ("msrvtt_video_sub", "msrvtt_video_only")


class HeroForVr(HeroForVcmr):
    """Training returns (lw_neg_ctx·L_ctx, lw_neg_q·L_q); inference returns the (N_q, N_v)
    max-over-frames cosine scores only."""

    vsm_tasks = VR_TASKS

    def __init__(self, config, vfeat_dim=4352, max_frm_seq_len=100, ranking_loss_type="hinge",
                 margin=0.1, lw_neg_ctx=0, lw_neg_q=0, use_hard_negative=False,
                 hard_pool_size=20, hard_neg_weight=10, use_all_neg=True):
        if lw_neg_ctx == 0 and lw_neg_q == 0:
            raise ValueError("HeroForVr needs a non-zero ranking weight: set --lw_neg_ctx "
                             "and/or --lw_neg_q (10 in the released MSR-VTT configs)")
        super().__init__(config, vfeat_dim, max_frm_seq_len,
                         ranking_loss_type=ranking_loss_type, margin=margin,
                         lw_neg_ctx=lw_neg_ctx, lw_neg_q=lw_neg_q, lw_st_ed=0,
                         drop_svmr_prob=1.0, use_hard_negative=use_hard_negative,
                         hard_pool_size=hard_pool_size, hard_neg_weight=hard_neg_weight,
                         use_all_neg=use_all_neg)

    def set_train_st_ed(self, lw_st_ed):
        """VR has no span loss: the weight stays 0; a non-zero request is logged once."""
        if lw_st_ed != 0 and not getattr(self, "_warned_st_ed", False):
            logger.warning("HeroForVr ignores set_train_st_ed(%s): VR trains no span loss",
                           lw_st_ed)
            self._warned_st_ed = True

    def forward(self, batch, task="msrvtt_video_sub", compute_loss=True):
        if task not in self.vsm_tasks:
            raise ValueError(f"HeroForVr got unknown task {task!r}; expected one of "
                             f"{self.vsm_tasks}")
        if compute_loss:
            _, loss_ctx, loss_q = self.forward_vsm(batch, compute_loss=True)
            return loss_ctx, loss_q
        frames = self.v_encoder(batch, "repr")
        return self.get_pred_from_raw_query(frames, batch["c_attn_masks"],
                                            batch["query_input_ids"], batch["query_pos_ids"],
                                            batch["query_attn_masks"])

    def get_pred_from_raw_query(self, frame_embeddings, c_attn_masks, query_input_ids,
                                query_pos_ids, query_attn_masks, cross=False,
                                val_gather_gpus=False):
        """(N_q, N_v) video scores (§8.4) of raw queries against encoded videos.

        Same signature as :meth:`HeroForVcmr.get_pred_from_raw_query` (interface.md), so code
        written for VCMR may pass ``cross`` positionally; it is ignored because VR computes no
        start/end logits.
        """
        query = self.encode_queries(query_input_ids, query_pos_ids, query_attn_masks)
        return self.get_video_scores(query, frame_embeddings, c_attn_masks,
                                     gather=val_gather_gpus)

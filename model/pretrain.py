"""HERO pretraining model: task dispatch and the VSM heads (model.md §8).

``HeroForPretraining`` adds ``video_query_linear``, ``video_st_predictor``,
``video_ed_predictor`` and ``q_feat_attn`` to the trunk, after the trunk is initialized, so the
heads keep PyTorch's default init (§10). VCMR and VR subclass it without new modules, which is
why the three state dicts have identical keys.

Decisions on unspecified details:
- ``random.random()`` (the ``drop_svmr_prob`` draw) is consumed only in train mode and only when
  ``lw_st_ed ≠ 0``; start/end logits are not computed when that draw skips the span loss.
- Loss terms that are not computed are zero tensors of shape (1) on the batch's device.
"""
from __future__ import annotations

import random

from torch import nn

from model.model import HeroModel
from model.query import QueryFeatEncoder
from model.vsm import (
    RANKING_LOSS_TYPES,
    gather_for_scoring,
    normalize,
    ranking_losses,
    span_conv,
    span_loss,
    st_ed_logits,
    video_scores,
)

V_ENCODER_TASKS = ("mffr", "mfm-nce", "fom")


class HeroForPretraining(HeroModel):
    """Trunk + VSM heads. ``forward(batch, task)`` for vsm / mlm* / mffr / mfm-nce / fom.

    The training loop switches schedules on the model with :meth:`set_train_st_ed` and
    :meth:`set_hard_negative` (training.md §3.8); scripts build it with ``lw_st_ed = 0``.
    """

    expected_missing_keys = ()
    vsm_tasks = ("vsm",)

    def __init__(self, config, vfeat_dim=4352, max_frm_seq_len=100, conv_stride=1,
                 conv_kernel_size=5, ranking_loss_type="hinge", margin=0.1, lw_neg_ctx=0,
                 lw_neg_q=0, lw_st_ed=0.01, drop_svmr_prob=0, use_hard_negative=False,
                 hard_pool_size=20, hard_neg_weight=10, use_all_neg=True):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        if ranking_loss_type not in RANKING_LOSS_TYPES:
            raise ValueError(f"--ranking_loss_type must be one of {RANKING_LOSS_TYPES}, "
                             f"got {ranking_loss_type!r}")
        if self.config.q_config is None:
            raise ValueError(f"{type(self).__name__} needs a 'q_config' in the model config "
                             "JSON (use config/hero_finetune.json)")
        hidden = self.config.f_config.hidden_size
        self.video_query_linear = nn.Linear(hidden, hidden)
        self.video_st_predictor = span_conv(conv_kernel_size, conv_stride)
        self.video_ed_predictor = span_conv(conv_kernel_size, conv_stride)
        self.q_feat_attn = QueryFeatEncoder(self.config.q_config, hidden)
        self.ranking_loss_type, self.margin = ranking_loss_type, margin
        self.lw_neg_ctx, self.lw_neg_q, self.lw_st_ed = lw_neg_ctx, lw_neg_q, lw_st_ed
        self.drop_svmr_prob = drop_svmr_prob
        self.use_hard_negative, self.hard_pool_size = use_hard_negative, hard_pool_size
        self.hard_neg_weight, self.use_all_neg = hard_neg_weight, use_all_neg
        self.gather_gpus = True

    # ------------------------------------------------------------------ schedule switches
    def set_hard_negative(self, use_hard_negative, hard_pool_size, hard_neg_weight):
        self.use_hard_negative = use_hard_negative
        self.hard_pool_size = hard_pool_size
        self.hard_neg_weight = hard_neg_weight

    def set_train_st_ed(self, lw_st_ed):
        self.lw_st_ed = lw_st_ed

    # ------------------------------------------------------------------ dispatch
    def forward(self, batch, task, compute_loss=True):
        if task in self.vsm_tasks:
            return self.forward_vsm(batch, compute_loss)
        if task.startswith("mlm") or task in V_ENCODER_TASKS:
            return self.v_encoder(batch, task, compute_loss)
        raise ValueError(f"{type(self).__name__} got unknown task {task!r}; expected one of "
                         f"{self.vsm_tasks + ('mlm*',) + V_ENCODER_TASKS}")

    def encode_queries(self, query_input_ids, query_pos_ids, query_attn_masks):
        """F-TRM text pass (type 1, no frames) then the modular query encoder -> (N, D)."""
        hidden = self.v_encoder.f_encoder.forward_txt(query_input_ids, query_pos_ids,
                                                      query_attn_masks)
        return self.q_feat_attn(hidden, query_attn_masks)

    @property
    def use_video_scores(self) -> bool:
        return self.lw_neg_ctx != 0 or self.lw_neg_q != 0

    def get_st_ed(self, query, frame_embeddings, c_attn_masks, cross=False):
        """Start/end logits (§8.3); cross when requested or when the counts differ."""
        return st_ed_logits(self.video_query_linear(query), frame_embeddings, c_attn_masks,
                            self.video_st_predictor, self.video_ed_predictor, cross)

    def get_video_scores(self, query, frame_embeddings, c_attn_masks, gather=False):
        """Max-over-frames cosine (§8.4) of the raw modular queries, optionally all-gathered."""
        q_norm, v_norm = normalize(query), normalize(frame_embeddings)
        if gather:
            q_norm, v_norm, c_attn_masks = gather_for_scoring(q_norm, v_norm, c_attn_masks)
        return video_scores(q_norm, v_norm, c_attn_masks)

    def get_pred_from_raw_query(self, frame_embeddings, c_attn_masks, query_input_ids,
                                query_pos_ids, query_attn_masks, cross=False,
                                val_gather_gpus=False):
        """(video scores or None, st, ed) for raw query tokens against encoded videos (§9.1).

        Video scores exist only when ``lw_neg_ctx`` or ``lw_neg_q`` ≠ 0; they are gathered
        across ranks only with ``val_gather_gpus``. Padded frame outputs are used as given.
        """
        query = self.encode_queries(query_input_ids, query_pos_ids, query_attn_masks)
        st, ed = self.get_st_ed(query, frame_embeddings, c_attn_masks, cross)
        scores = None
        if self.use_video_scores:
            scores = self.get_video_scores(query, frame_embeddings, c_attn_masks,
                                           gather=val_gather_gpus)
        return scores, st, ed

    def forward_vsm(self, batch, compute_loss=True):
        """Training/validation: the weighted triple (lw_st_ed·L_st_ed, lw_neg_ctx·L_ctx,
        lw_neg_q·L_q). ``compute_loss=False``: (video scores or None, st, ed), not gathered."""
        c_mask = batch["c_attn_masks"]
        q_args = (batch["query_input_ids"], batch["query_pos_ids"], batch["query_attn_masks"])
        if not compute_loss:
            return self.get_pred_from_raw_query(self.v_encoder(batch, "repr"), c_mask, *q_args)
        frames, query = self._frames_and_query(batch, q_args)
        zero = frames.new_zeros(1)
        loss_st_ed = zero
        if self._span_loss_active():
            st, ed = self.get_st_ed(query, frames, c_mask)
            loss_st_ed = span_loss(st, ed, batch["targets"], batch.get("q_vidx"), self.training)
        loss_ctx, loss_q = zero.clone(), zero.clone()
        if self.use_video_scores:
            scores = self.get_video_scores(query, frames, c_mask, gather=self.gather_gpus)
            loss_ctx, loss_q = ranking_losses(
                scores, self.ranking_loss_type, self.margin, self.use_all_neg,
                self.use_hard_negative, self.hard_pool_size, self.hard_neg_weight,
                self.training)
        return (self.lw_st_ed * loss_st_ed, self.lw_neg_ctx * loss_ctx,
                self.lw_neg_q * loss_q)

    def _frames_and_query(self, batch, q_args):
        """T-TRM frames and modular queries. Packed F-TRM rows: the subtitle and query rows
        share one embedding pass and one F-TRM call (issue 17); padded: upstream's order."""
        if not self.v_encoder.f_encoder.packs(batch["f_attn_masks"]):
            return self.v_encoder(batch, "repr"), self.encode_queries(*q_args)
        frames, hidden = self.v_encoder.forward_repr_query(batch, *q_args)
        return frames, self.q_feat_attn(hidden, q_args[2])

    def _span_loss_active(self) -> bool:
        """lw_st_ed ≠ 0, and in train mode only if random.random() > drop_svmr_prob."""
        if self.lw_st_ed == 0:
            return False
        return not self.training or random.random() > self.drop_svmr_prob

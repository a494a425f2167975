"""VIOLIN video-and-language inference (model.md §9.4): ``HeroForViolin``.

Same encoding as video QA (``</s> statement`` appended after the fused frames in the T-TRM), one
statement per video, attention pooling over frames and a single logit. The loss is the binary
cross-entropy of sigmoid(logit) (not the logits form), mean over the batch; inference returns
the raw (B, 1) logit.

``pad_frame_pos_table`` reproduces ``train_violin``'s checkpoint handling (training.md §3.3): the
model is always built with ``max_frm_seq_len = 100`` and a shorter frame-position table in the
checkpoint is zero-padded up to 100 rows before loading.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLPLayer
from .model import HeroModel, read_state_dict
from .videoQA import attention_pool, encode_frames_with_text

logger = logging.getLogger(__name__)

FRAME_POS_KEY = "v_encoder.f_encoder.img_embeddings.position_embeddings.weight"
VIOLIN_MAX_FRM_SEQ_LEN = 100


def pad_frame_pos_table(state_dict: dict, max_frm_seq_len: int = VIOLIN_MAX_FRM_SEQ_LEN) -> dict:
    """Return ``state_dict`` with the F-TRM frame-position table zero-padded to
    ``max_frm_seq_len`` rows; a table that is absent or already long enough is left as is.

    The input dict is not modified (a shallow copy is returned when padding happens).
    """
    table = state_dict.get(FRAME_POS_KEY)
    if table is None or table.size(0) >= max_frm_seq_len:
        return state_dict
    padded = table.new_zeros(max_frm_seq_len, table.size(1))
    padded[:table.size(0)] = table
    logger.info("zero-padded checkpoint key %s from %d to %d rows", FRAME_POS_KEY,
                table.size(0), max_frm_seq_len)
    return {**state_dict, FRAME_POS_KEY: padded}


def violin_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of sigmoid(logit) against 0/1 targets, always in fp32.

    Autocast is switched off here because CUDA autocast refuses ``binary_cross_entropy`` on
    probabilities (upstream's apex O2 did not autocast); the fp32 numbers are unchanged.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        return F.binary_cross_entropy(torch.sigmoid(logits), targets.view_as(logits).float())


class HeroForViolin(HeroModel):
    """HERO trunk + VIOLIN head (``violin_pool``, ``violin_pred_head``)."""

    expected_missing_keys = ("violin_pool.", "violin_pred_head.")

    def __init__(self, config, vfeat_dim: int = 4352,
                 max_frm_seq_len: int = VIOLIN_MAX_FRM_SEQ_LEN):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        hidden = self.config.c_config.hidden_size
        self.violin_pool = nn.Linear(hidden, 1, bias=False)
        self.violin_pred_head = MLPLayer(hidden, 1)

    @classmethod
    def from_pretrained(cls, config, state_dict, vfeat_dim: int = 4352,
                        max_frm_seq_len: int = VIOLIN_MAX_FRM_SEQ_LEN, **kwargs):
        """As :meth:`HeroModel.from_pretrained`, after zero-padding a frame-position table
        shorter than ``max_frm_seq_len`` rows (``train_violin``'s handling)."""
        state_dict = pad_frame_pos_table(read_state_dict(state_dict), max_frm_seq_len)
        return super().from_pretrained(config, state_dict, vfeat_dim, max_frm_seq_len, **kwargs)

    def forward(self, batch: dict, task: str = "violin", compute_loss: bool = True):
        frames = encode_frames_with_text(self, batch, batch["q_input_ids"], batch["q_pos_ids"],
                                         batch["q_attn_masks"])
        pooled = attention_pool(self.violin_pool, frames, batch["c_attn_masks"], 1)
        logits = self.violin_pred_head(pooled)
        if not compute_loss:
            return logits
        return violin_loss(logits, batch["targets"])

"""Video QA — TVQA / How2QA (model.md §9.3): ``HeroForVideoQA``.

Every question is expanded to 5 "videos" (one per answer, grouped per question in answer order).
The fused frames X (before the T-TRM) are embedded with the T-TRM frame embeddings, the
``</s> q </s> a`` text with the F-TRM text embeddings, and only the T-TRM encoder layers run over
the concatenation. Frame outputs feed two heads: answer logits (attention pooling over frames)
and start/end logits (attention pooling over the 5 answers).

Decisions: ``forward`` returns ``(qa_loss, temporal_loss)`` (the loop adds
``qa_loss + lw_st_ed · temporal_loss``) with ``compute_loss=True`` and the (Q, 5) answer logits
otherwise. Both losses are plain CE means with ignore index −1, as upstream, so a batch whose
targets are all −1 gives NaN for that term. Losses are computed on fp32 logits, also under
autocast.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLPLayer, mask_logits
from .model import HeroModel

NUM_ANSWERS = 5
IGNORE_INDEX = -1


def encode_frames_with_text(model: HeroModel, batch: dict, txt_ids, txt_pos, txt_mask):
    """T-TRM encoder layers over [c_encoder.embeddings(X) ; F-TRM text embeddings].

    Returns the frame part (B, L, D) of the output. Text positions start at 0 and use token type
    1 (the F-TRM embedding default); the T-TRM frame embedding is not applied to the text.
    """
    v_encoder = model.v_encoder
    fused = v_encoder.forward_repr(batch, encode_clip=False)
    frame_emb = v_encoder.c_encoder.embeddings(fused)
    text_emb = v_encoder.f_encoder.embeddings(txt_ids, txt_pos)
    frame_mask = batch["c_attn_masks"]
    mask = torch.cat([frame_mask, txt_mask.to(frame_mask.dtype)], dim=1)
    out = v_encoder.c_encoder.encoder(torch.cat([frame_emb, text_emb], dim=1), mask)
    return out[:, :frame_emb.size(1)]


def attention_pool(pool: nn.Linear, hidden, mask, dim: int) -> torch.Tensor:
    """Σ softmax_dim(mask_logits(pool(h), m)) · h, summing over ``dim`` (mask_logits §4.10)."""
    scores = mask_logits(pool(hidden), mask.unsqueeze(-1))
    weights = torch.softmax(scores, dim=dim)
    return (weights * hidden).sum(dim=dim)


def _ce(logits, targets):
    """Mean CE, ignore −1, on fp32 logits (also under autocast)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


class HeroForVideoQA(HeroModel):
    """HERO trunk + QA heads; ``st_ed_pool`` starts as a deep copy of ``qa_pool``."""

    expected_missing_keys = ("qa_pool.", "qa_pred_head.", "st_ed_pool.", "st_ed_pred_head.")

    def __init__(self, config, vfeat_dim: int = 4352, max_frm_seq_len: int = 100):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        hidden = self.config.c_config.hidden_size
        self.qa_pool = nn.Linear(hidden, 1, bias=False)
        self.qa_pred_head = MLPLayer(hidden, 1)
        self.st_ed_pool = copy.deepcopy(self.qa_pool)
        self.st_ed_pred_head = MLPLayer(hidden, 2)

    def predict(self, batch: dict, task: str = "tvqa"):
        """(answer logits (Q, 5), start logits (Q, L), end logits (Q, L)).

        Start/end are masked with the frame mask of answer 0 of each question.
        """
        frames = encode_frames_with_text(self, batch, batch["qa_input_ids"],
                                         batch["qa_pos_ids"], batch["qa_attn_masks"])
        n_vid, length, hidden = frames.shape
        if n_vid % NUM_ANSWERS:
            raise ValueError(f"task {task!r}: batch has {n_vid} videos, not a multiple of "
                             f"{NUM_ANSWERS} answer candidates per question")
        frames = frames.view(n_vid // NUM_ANSWERS, NUM_ANSWERS, length, hidden)
        mask = batch["c_attn_masks"].view(n_vid // NUM_ANSWERS, NUM_ANSWERS, length)
        logits = self.qa_pred_head(attention_pool(self.qa_pool, frames, mask, 2)).squeeze(-1)
        st_ed = self.st_ed_pred_head(attention_pool(self.st_ed_pool, frames, mask, 1))
        st = mask_logits(st_ed[..., 0], mask[:, 0])
        ed = mask_logits(st_ed[..., 1], mask[:, 0])
        return logits, st, ed

    def forward(self, batch: dict, task: str = "tvqa", compute_loss: bool = True):
        logits, st, ed = self.predict(batch, task)
        if not compute_loss:
            return logits
        ts = batch["ts_targets"]
        qa_loss = _ce(logits, batch["targets"].view(-1))
        temporal_loss = (_ce(st, ts[:, 0]) + _ce(ed, ts[:, 1])) / 2
        return qa_loss, temporal_loss

"""Modularized query encoder ``q_feat_attn`` (model.md §8.2).

It runs on top of the F-TRM text pass (done by the task model, see ``encode_queries``):
projection → own position table → one self-attention block (no FFN) → masked attention pooling
into a single 768-d vector. ``q_config.num_hidden_layers`` (0 in every JSON) is ignored on
purpose: upstream always builds exactly one attention block (pitfall 11).
"""
from __future__ import annotations

import torch
from torch import nn

from model.embeddings import TemporalFrameEmbeddings
from model.layers import (
    BertAttention,
    LinearLayer,
    extended_attention_mask,
    mask_logits,
)


class QueryFeatEncoder(nn.Module):
    """F-TRM query token states (N, T, in) + 0/1 mask (N, T) -> modular query (N, D).

    Keys: ``query_input_proj``, ``query_pos_embed``, ``query_self_attention``,
    ``modular_vector_mapping`` (Linear D→1 without bias). The mask is cast to the parameter
    dtype, as upstream does, before it builds the additive −10000 attention mask and the
    multiplicative pooling mask. No normalization is applied to the output.
    """

    def __init__(self, config, input_size: int = 768):
        super().__init__()
        self.query_input_proj = LinearLayer(input_size, config.hidden_size,
                                            dropout=config.hidden_dropout_prob)
        # same layout and maths as the T-TRM frame embeddings (§5.4): own 514-row table, LN 1e-5,
        # positions always 0..T−1 (a passed query_pos_ids is ignored)
        self.query_pos_embed = TemporalFrameEmbeddings(config)
        self.query_self_attention = BertAttention(config)
        self.modular_vector_mapping = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, query_feat: torch.Tensor, query_attn_mask: torch.Tensor) -> torch.Tensor:
        dtype = self.modular_vector_mapping.weight.dtype
        mask = query_attn_mask.to(dtype)
        x = self.query_pos_embed(self.query_input_proj(query_feat))
        x = self.query_self_attention(x, extended_attention_mask(mask, dtype))
        scores = mask_logits(self.modular_vector_mapping(x).squeeze(-1), mask)
        weights = torch.softmax(scores, dim=-1)
        return torch.einsum("nt,ntd->nd", weights, x)

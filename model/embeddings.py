"""Embedding layers of the HERO trunk (model.md §5).

Attribute names are upstream's because they are state-dict keys.  Every LayerNorm here uses
eps 1e-5 (``EMB_LN_EPS``), unlike the 1e-12 inside the transformer layers.
"""
from __future__ import annotations

import torch
from torch import nn

from model.layers import EMB_LN_EPS

TEXT_PAD_ID = 1
TOKEN_TYPE_ID = 1  # HERO reads row 1 of the type table for text and frames alike (model.md §14.5)


def token_type_lookup(table: nn.Embedding, like: torch.Tensor) -> torch.Tensor:
    """The single type-1 row as a (1, 1, D) tensor, broadcast by callers (model.md §5.1).

    Raises a clear error for a 1-row table: that only happens with ``hero_pretrain.json`` before
    :func:`model.model.load_roberta` has grown the table to 2 rows.
    """
    if table.num_embeddings <= TOKEN_TYPE_ID:
        raise ValueError(
            f"token_type_embeddings has {table.num_embeddings} row(s) but HERO reads type id "
            f"{TOKEN_TYPE_ID}; use a config with type_vocab_size >= 2 (hero_finetune.json), or "
            "initialise from RoBERTa with load_roberta() when using hero_pretrain.json")
    ids = torch.full((1, 1), TOKEN_TYPE_ID, dtype=torch.long, device=like.device)
    return table(ids)


class RobertaTextEmbeddings(nn.Module):
    """word + position + type, then LN(1e-5) and dropout (model.md §5.1)."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=TEXT_PAD_ID)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=EMB_LN_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @staticmethod
    def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
        """RoBERTa-style fallback (pads keep position 1); no HERO path uses it."""
        not_pad = input_ids.ne(TEXT_PAD_ID).long()
        return torch.cumsum(not_pad, dim=1) * not_pad + TEXT_PAD_ID

    def forward(self, input_ids, position_ids=None, token_type_ids=None):
        """Positions are passed in (plain 0..T−1, no +2 offset); type id defaults to 1."""
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        if token_type_ids is None:
            types = token_type_lookup(self.token_type_embeddings, input_ids)
        else:
            types = self.token_type_embeddings(token_type_ids)
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + types
        return self.dropout(self.LayerNorm(emb))


class FrameEmbeddings(nn.Module):
    """F-TRM frame embeddings (``img_embeddings``, model.md §5.2).

    The MFM mask embedding is added to the raw feature before ``img_LayerNorm``; row 0 of its
    table is used as stored (random and frozen by ``padding_idx``), as upstream does.
    """

    def __init__(self, config, img_dim: int, max_frm_seq_len: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_LayerNorm = nn.LayerNorm(img_dim, eps=EMB_LN_EPS)
        self.position_embeddings = nn.Embedding(max_frm_seq_len, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=EMB_LN_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_ids, type_embeddings, img_masks=None):
        """img_feat (R, F, Dv); positions index frames within a segment (default arange(F))."""
        if img_pos_ids is None:
            img_pos_ids = torch.arange(img_feat.size(1), device=img_feat.device).unsqueeze(0)
        if img_masks is not None:
            img_feat = img_feat + self.mask_embedding(img_masks.long())
        x = self.img_linear(self.img_LayerNorm(img_feat))
        x = x + self.position_embeddings(img_pos_ids) + type_embeddings
        return self.dropout(self.LayerNorm(x))


class TemporalFrameEmbeddings(nn.Module):
    """T-TRM input embeddings (``c_encoder.embeddings``, model.md §5.3).

    Positions are always arange(L) over the padded clip; the batch's ``c_pos_ids`` is ignored,
    as upstream ignores it.  There are no token types.
    """

    def __init__(self, config):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=EMB_LN_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x):
        positions = torch.arange(x.size(1), device=x.device).unsqueeze(0)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(positions)))

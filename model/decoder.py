"""TVC caption decoder (model.md §9.5): post-LN transformer decoder layers over the clip memory.

Module names follow upstream because they are state-dict keys: ``decoder.layer.{i}.
self_attention``, ``add_norm_1``, ``dec_enc_attention``, ``add_norm_2``, ``intermidiate`` (sic)
and ``add_norm_3``, plus the persistent causal-mask buffer ``decoder.tri_mask`` (1024×1024,
whatever ``max_position_embeddings`` says).

Beyond upstream, every layer accepts an optional key/value cache (one dict per layer, see
:meth:`TransformerDecoder.init_cache`): self-attention keys/values of the positions already
decoded and the cross-attention keys/values of the encoder memory, which are computed once. With
the causal mask, position t only sees positions ≤ t, so feeding the new tokens one step at a time
gives the same hidden states as re-running the full prefix.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import (
    ATTN_MASK_VALUE,
    BertIntermediate,
    BertOutput,
    BertSelfAttention,
    BertSelfOutput,
    extended_attention_mask,
)

TRI_MASK_SIZE = 1024


def causal_mask(size: int = TRI_MASK_SIZE) -> torch.Tensor:
    """Additive causal mask: 0 where column ≤ row, −10000 above the diagonal.

    Built as (1 − tril(1))·(−10000), so the allowed entries are −0.0 (model.md §3.4).
    """
    return (1.0 - torch.tril(torch.ones(size, size))) * ATTN_MASK_VALUE


class DecoderLayer(nn.Module):
    """Causal self-attention → cross-attention to the memory → GELU FFN, each post-LN.

    ``add_norm_{1,2}`` are dense + dropout + residual + LayerNorm (eps from the config, 1e-12);
    ``add_norm_3`` is the FFN output projection with the same residual form.
    """

    def __init__(self, config):
        super().__init__()
        self.self_attention = BertSelfAttention(config)
        self.add_norm_1 = BertSelfOutput(config)
        self.dec_enc_attention = BertSelfAttention(config)
        self.add_norm_2 = BertSelfOutput(config)
        self.intermidiate = BertIntermediate(config)
        self.add_norm_3 = BertOutput(config)

    def _self_attend(self, x, self_mask, cache):
        sa = self.self_attention
        if cache is None:
            return sa(x, self_mask)
        k, v = sa.split_heads(sa.key(x)), sa.split_heads(sa.value(x))
        if "self_k" in cache:
            k = torch.cat([cache["self_k"], k], dim=2)
            v = torch.cat([cache["self_v"], v], dim=2)
        cache["self_k"], cache["self_v"] = k, v
        return sa.attend(sa.split_heads(sa.query(x)), k, v, self_mask)

    def _cross_attend(self, x, enc, enc_mask, cache):
        da = self.dec_enc_attention
        if cache is None:
            return da(x, enc_mask, kv_hidden=enc)
        if "enc_k" not in cache:
            cache["enc_k"] = da.split_heads(da.key(enc))
            cache["enc_v"] = da.split_heads(da.value(enc))
        return da.attend(da.split_heads(da.query(x)), cache["enc_k"], cache["enc_v"], enc_mask)

    def forward(self, x, enc, self_mask, enc_mask, cache=None):
        x1 = self.add_norm_1(self._self_attend(x, self_mask, cache), x)
        x2 = self.add_norm_2(self._cross_attend(x1, enc, enc_mask, cache), x1)
        return self.add_norm_3(self.intermidiate(x2), x2)


class TransformerDecoder(nn.Module):
    """Stack of ``d_config.num_hidden_layers`` decoder layers (2 in ``hero_tvc.json``)."""

    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.register_buffer("tri_mask", causal_mask(), persistent=True)

    def init_cache(self) -> list[dict]:
        """An empty key/value cache: one dict per layer, filled by :meth:`forward`."""
        return [{} for _ in self.layer]

    @staticmethod
    def cache_len(cache) -> int:
        """Number of positions already stored in ``cache`` (0 when empty or ``None``)."""
        if not cache or "self_k" not in cache[0]:
            return 0
        return cache[0]["self_k"].size(2)

    def forward(self, hidden, enc, enc_mask, cache=None):
        """Decode ``hidden`` (N, T, D) against memory ``enc`` (N, Ls, D).

        ``enc_mask`` is the 0/1 memory mask (N, Ls); it becomes (1 − m)·(−10000) in the hidden
        dtype, as does the causal mask (model.md §13). There is no key-padding mask on the
        caption side. With ``cache``, ``hidden`` holds only the new positions, which continue
        after the cached ones.
        """
        past, length = self.cache_len(cache), hidden.size(1)
        if past + length > self.tri_mask.size(0):
            raise ValueError(f"decoder input reaches position {past + length}, beyond the "
                             f"{self.tri_mask.size(0)}-row causal mask `decoder.tri_mask`")
        self_mask = self.tri_mask[past:past + length, :past + length].to(hidden.dtype)
        ext_enc_mask = extended_attention_mask(enc_mask, hidden.dtype)
        for i, layer in enumerate(self.layer):
            hidden = layer(hidden, enc, self_mask, ext_enc_mask,
                           None if cache is None else cache[i])
        return hidden

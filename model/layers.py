"""Transformer building blocks shared by every HERO module (model.md §4).

Module and attribute names follow upstream exactly, because they become state-dict keys.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` by default; the plain
math path (explicit matmul, additive mask, softmax, dropout) is kept beside it as the numerical
reference and is selected per module with ``attn_impl = "math"`` (see :func:`set_attn_impl`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTN_MASK_VALUE = -10000.0  # additive attention mask (exact in fp16 and bf16)
MASK_LOGITS_VALUE = -1e4  # value written by mask_logits (replaces, does not add)
EMB_LN_EPS = 1e-5  # LayerNorm eps of embeddings, projections and heads (model.md §1)
ATTN_IMPLS = ("sdpa", "math")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact erf GELU (not the tanh approximation)."""
    return F.gelu(x)


def mask_logits(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x·m + (1 − m)·(−1e4): masked entries become exactly −1e4 (model.md §4.10)."""
    mask = mask.to(target.dtype)
    return target * mask + (1 - mask) * MASK_LOGITS_VALUE


def extended_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 0/1 key mask -> additive (N, 1, 1, L) mask in ``dtype`` (model.md §4.4)."""
    ext = mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * ATTN_MASK_VALUE


def attention(q, k, v, mask=None, dropout_p: float = 0.0, impl: str = "sdpa"):
    """Scaled dot-product attention over (N, H, L, d) tensors with an additive mask.

    ``impl="math"`` is the reference: S = QKᵀ / √d (divided after the matmul, as upstream),
    S += M, softmax over keys, dropout, P·V. ``impl="sdpa"`` computes the same with the fused
    kernel; the mask is cast to the query dtype because SDPA requires matching dtypes.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    if impl == "sdpa":
        if mask is not None:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              scale=scale)
    if impl != "math":
        raise ValueError(f"unknown attn_impl {impl!r}; expected one of {ATTN_IMPLS}")
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


class BertSelfAttention(nn.Module):
    """Q/K/V projections + multi-head attention; no output projection (model.md §4.1).

    ``dropout`` is an ``nn.Dropout`` module so that setting ``module.p`` (as the training scripts
    do for every dropout) also changes the attention-probability dropout.
    """

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attn_impl = getattr(config, "attn_impl", "sdpa")

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> (N, H, L, d): head j holds channels [j·d, (j+1)·d)."""
        n, length, _ = x.shape
        return x.view(n, length, self.num_attention_heads,
                      self.attention_head_size).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        n, h, length, d = x.shape
        return x.transpose(1, 2).reshape(n, length, h * d)

    def attend(self, q, k, v, mask=None) -> torch.Tensor:
        """Attention over already split heads; returns merged (N, Lq, D)."""
        p = self.dropout.p if self.training else 0.0
        return self.merge_heads(attention(q, k, v, mask, p, self.attn_impl))

    def forward(self, hidden, attention_mask=None, kv_hidden=None):
        if attention_mask is not None and not torch.is_tensor(attention_mask):
            return self.forward_packed(hidden, attention_mask)
        kv_hidden = hidden if kv_hidden is None else kv_hidden
        q = self.split_heads(self.query(hidden))
        k = self.split_heads(self.key(kv_hidden))
        v = self.split_heads(self.value(kv_hidden))
        return self.attend(q, k, v, attention_mask)

    def forward_packed(self, hidden, packing):
        """Packed rows (T, D) with a :class:`model.packing.Packing` in place of the mask:
        the projections see only valid tokens, attention stays inside each row (issue 17)."""
        p = self.dropout.p if self.training else 0.0
        q_hidden = hidden if packing.query_index is None else hidden[packing.query_index]
        return packing.attend(self.query(q_hidden), self.key(hidden), self.value(hidden),
                              self.num_attention_heads, p, self.attn_impl)


class BertSelfOutput(nn.Module):
    """out = LN(dropout(dense(a)) + residual), LN eps from the config (1e-12)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    """Self-attention block with residual and post-LN (model.md §4.2)."""

    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, attention_mask=None):
        """With a packing whose ``query_index`` is set, only those tokens come out."""
        residual = hidden
        query_index = getattr(attention_mask, "query_index", None)
        if query_index is not None:
            residual = hidden[query_index]
        return self.output(self.self(hidden, attention_mask), residual)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden):
        return gelu(self.dense(hidden))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    """Post-LN transformer layer: attention block then GELU FFN (model.md §4.3)."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, attention_mask=None):
        attn = self.attention(hidden, attention_mask)
        return self.output(self.intermediate(attn), attn)


class BertEncoder(nn.Module):
    """Stack of ``num_hidden_layers`` layers; returns the last hidden states (model.md §4.4).

    ``forward`` takes the 0/1 key mask (N, L) and converts it once to the additive mask in the
    dtype of the stack's parameters, as upstream does. With ``gradient_checkpointing`` set in
    the config, each layer's activations are recomputed in backward (long videos).
    """

    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = bool(getattr(config, "gradient_checkpointing", False))

    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, hidden, attention_mask, last_mask=None):
        """``attention_mask`` is the (N, L) 0/1 mask, or a :class:`model.packing.Packing` for
        packed (T, D) rows (every layer op but attention is per token, model.md §4.3);
        ``last_mask`` (a packing from :meth:`~model.packing.Packing.reading`) replaces it in
        the last layer, which then computes only the tokens read."""
        ext = attention_mask
        if torch.is_tensor(attention_mask):
            ext = extended_attention_mask(attention_mask, self.param_dtype())
        for i, layer in enumerate(self.layer):
            if last_mask is not None and i == len(self.layer) - 1:
                ext = last_mask
            if self.gradient_checkpointing and self.training and hidden.requires_grad:
                hidden = checkpoint(layer, hidden, ext, use_reentrant=False)
            else:
                hidden = layer(hidden, ext)
        return hidden


class BertPooler(nn.Module):
    """tanh(dense(h[:, 0])); computed by upstream but read by no task (model.md §4.5)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


class LinearLayer(nn.Module):
    """ReLU(Linear(Dropout(LN_1e-5(x)))): keys ``LayerNorm.*`` and ``net.1.*`` (§4.7)."""

    def __init__(self, in_hsz: int, out_hsz: int, dropout: float = 0.1):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_hsz, eps=EMB_LN_EPS)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_hsz, out_hsz), nn.ReLU())

    def forward(self, x):
        return self.net(self.LayerNorm(x))


class MLPLayer(nn.Module):
    """linear_2(LN_1e-5(gelu(linear_1(x)))) with a 2×in hidden width, no dropout (§4.8)."""

    def __init__(self, in_hsz: int, out_hsz: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_hsz, in_hsz * 2)
        self.LayerNorm = nn.LayerNorm(in_hsz * 2, eps=EMB_LN_EPS)
        self.linear_2 = nn.Linear(in_hsz * 2, out_hsz)

    def forward(self, x):
        return self.linear_2(self.LayerNorm(gelu(self.linear_1(x))))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Upstream's BERT init rule (model.md §10): N(0, std) for Linear/Embedding weights
    (padding rows included), zero Linear biases, LayerNorm weight 1 / bias 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def set_attn_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention module of ``model`` between ``"sdpa"`` and ``"math"``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {impl!r}; expected one of {ATTN_IMPLS}")
    for mod in model.modules():
        if hasattr(mod, "attn_impl"):
            mod.attn_impl = impl
    return model


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Write ``p`` into every ``nn.Dropout`` (upstream's ``--dropout`` behaviour)."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
    return model

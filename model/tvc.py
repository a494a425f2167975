"""TVC video captioning (model.md §9.5, training.md §5.9): ``HeroForTvc``.

The clip memory is a slice of the T-TRM output per caption (``clip_ranges``, end exclusive),
decoded by a 2-layer transformer decoder whose output goes through the shared F-TRM LM head
(tied to the word table). Training uses a label-smoothed KL over the full padded vocabulary.

Decisions on points the spec leaves open:
- ``lsr`` defaults to 0.1, the released value, so a default-built model has the 246-entry
  state dict (with ``loss_func.one_hot``).
- ``forward`` returns the per-token losses (reduction none; the loop takes the mean) with
  ``compute_loss=True`` and the full (N_cap, T, V) logits otherwise.
- ``decode`` returns one list of token ids per clip, already cut before the first EOS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import TransformerDecoder
from .layers import EMB_LN_EPS
from .model import HeroModel

BOS_ID = 0
EOS_ID = 2
IGNORE_INDEX = -1
MAX_GEN_STEP = 30


class LabelSmoothingLoss(nn.Module):
    """Per-token KL(q ‖ softmax(logits)) with q = 1 − lsr on the gold id, lsr/(V − 1) elsewhere.

    The smoothing spreads over every other class of the full vocabulary (pad-vocab ids
    included). Rows whose target is ``ignore_index`` are dropped, so the result has one entry per
    kept token (reduction none). ``lsr = 0`` gives plain cross-entropy and no ``one_hot`` buffer.
    """

    def __init__(self, lsr: float, vocab_size: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if not 0.0 <= lsr <= 1.0:
            raise ValueError(f"label smoothing `lsr` must be in [0, 1], got {lsr}")
        self.lsr = lsr
        self.confidence = 1.0 - lsr
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        if lsr > 0:
            self.register_buffer("one_hot", torch.full((1, vocab_size), lsr / (vocab_size - 1)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(-1, logits.size(-1))
        target = target.reshape(-1)
        keep = target != self.ignore_index
        logits, target = logits[keep], target[keep]
        if self.lsr == 0:
            return F.cross_entropy(logits, target, reduction="none")
        if logits.size(-1) != self.vocab_size:
            raise ValueError(f"logits have {logits.size(-1)} classes but `loss_func` was built "
                             f"for vocab_size {self.vocab_size}")
        log_probs = F.log_softmax(logits, dim=-1)
        q = self.one_hot.to(log_probs.dtype).expand(target.size(0), -1).clone()
        q.scatter_(1, target.unsqueeze(1), self.confidence)
        return F.kl_div(log_probs, q, reduction="none").sum(dim=-1)


def cut_before_eos(ids: torch.Tensor, eos: int = EOS_ID) -> list[list[int]]:
    """(N, T) token ids -> one list per row, ending before its first ``eos`` (all kept if none)."""
    out = []
    for row in ids.tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


class HeroForTvc(HeroModel):
    """HERO trunk + caption decoder. ``task`` may be omitted in ``forward`` (upstream's TVC
    model has no task argument); a bool passed positionally there is read as ``compute_loss``."""

    expected_missing_keys = ("position_embeddings.", "emb_LayerNorm.", "decoder.", "loss_func.")

    def __init__(self, config, vfeat_dim: int = 4352, max_frm_seq_len: int = 100,
                 lsr: float = 0.1):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        d_config = self.config.d_config
        if d_config is None:
            raise KeyError("HeroForTvc needs a 'd_config' (decoder) section in the model config "
                           "JSON; use config/hero_tvc.json")
        self.position_embeddings = nn.Embedding(d_config.max_position_embeddings,
                                                d_config.hidden_size)
        self.emb_LayerNorm = nn.LayerNorm(d_config.hidden_size, eps=EMB_LN_EPS)
        self.decoder = TransformerDecoder(d_config)
        self.loss_func = LabelSmoothingLoss(lsr, self.config.f_config.vocab_size)
        self.v_encoder.initialize()

    @property
    def lm_head(self) -> nn.Module:
        return self.v_encoder.f_encoder.lm_head

    def embed_caption(self, input_ids: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        """LN_1e-5(shared word table[ids] + decoder position table[pos]): no type, no dropout."""
        words = self.v_encoder.f_encoder.embeddings.word_embeddings(input_ids)
        return self.emb_LayerNorm(words + self.position_embeddings(pos_ids))

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """T-TRM output sliced per caption: (memory (N_cap, L_seg, D), 0/1 mask (N_cap, L_seg)).

        Segments are zero-padded to the width of ``cap_attn_mask``.
        """
        frames = self.v_encoder(batch, "repr")
        mask = batch["cap_attn_mask"]
        ranges = [(i, st, ed) for i, clips in enumerate(batch["clip_ranges"]) for st, ed in clips]
        if len(ranges) != mask.size(0):
            raise ValueError(f"batch has {len(ranges)} clip_ranges but cap_attn_mask has "
                             f"{mask.size(0)} rows")
        memory = frames.new_zeros(len(ranges), mask.size(1), frames.size(-1))
        for row, (i, st, ed) in enumerate(ranges):
            if ed - st > mask.size(1):
                raise ValueError(f"clip range ({st}, {ed}) of video {i} is longer than "
                                 f"cap_attn_mask width {mask.size(1)}")
            memory[row, :ed - st] = frames[i, st:ed]
        return memory, mask

    def forward(self, batch: dict, task="tvc", compute_loss: bool = True):
        if isinstance(task, bool):
            task, compute_loss = "tvc", task
        if task != "tvc":
            raise ValueError(f"HeroForTvc only supports task 'tvc', got {task!r}")
        memory, mask = self.encode(batch)
        x = self.embed_caption(batch["cap_input_ids"], batch["cap_pos_ids"])
        hidden = self.decoder(x, memory, mask)
        if not compute_loss:
            return self.lm_head(hidden)
        targets = batch["cap_tgt_ids"]
        keep = targets != IGNORE_INDEX
        return self.loss_func(self.lm_head(hidden[keep]), targets[keep])

    @torch.no_grad()
    def decode(self, batch: dict, max_step: int = MAX_GEN_STEP) -> list[list[int]]:
        """Greedy captions (one id list per clip, cut before the first EOS), using
        :meth:`greedy_ids` with the key/value cache."""
        return cut_before_eos(self.greedy_ids(batch, max_step, use_cache=True))

    @torch.no_grad()
    def decode_full_recompute(self, batch: dict, max_step: int = MAX_GEN_STEP) -> list[list[int]]:
        """Upstream's greedy decoding (full decoder re-run per step), the reference for
        :meth:`decode`."""
        return cut_before_eos(self.greedy_ids(batch, max_step, use_cache=False))

    @torch.no_grad()
    def greedy_ids(self, batch: dict, max_step: int = MAX_GEN_STEP,
                   use_cache: bool = True) -> torch.Tensor:
        """Raw greedy ids (N_cap, max_step) before the EOS cut; each video is encoded once.

        Without cache (upstream): every step re-runs the decoder on the whole prefix
        (positions 0..t, causal mask) and appends the argmax of the last position; the output
        is the argmax of the final pass at every position. No early stop.
        With cache: each step feeds only the newest token. Because of the causal mask its
        output equals the last position of the full re-run, so the token chosen at step t is
        the final pass's argmax at position t.
        """
        memory, mask = self.encode(batch)
        return self.greedy_from_memory(memory, mask, max_step, use_cache)

    @torch.no_grad()
    def greedy_from_memory(self, memory: torch.Tensor, mask: torch.Tensor,
                           max_step: int = MAX_GEN_STEP, use_cache: bool = True) -> torch.Tensor:
        """The decoding loop of :meth:`greedy_ids` on an already encoded clip memory."""
        ids = memory.new_full((memory.size(0), 1), BOS_ID, dtype=torch.long)
        if max_step <= 0:
            return ids[:, :0]
        step_fn = self._step_cached if use_cache else self._step_full
        state = self.decoder.init_cache() if use_cache else None
        for step in range(max_step):
            logits = step_fn(ids, step, memory, mask, state)
            ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        if use_cache:
            return ids[:, 1:]
        return logits.argmax(dim=-1)

    def _step_cached(self, ids, step, memory, mask, cache):
        pos = torch.full((1, 1), step, dtype=torch.long, device=ids.device)
        hidden = self.decoder(self.embed_caption(ids[:, -1:], pos), memory, mask, cache)
        return self.lm_head(hidden)

    def _step_full(self, ids, step, memory, mask, _state):
        pos = torch.arange(step + 1, device=ids.device).unsqueeze(0)
        return self.lm_head(self.decoder(self.embed_caption(ids, pos), memory, mask))

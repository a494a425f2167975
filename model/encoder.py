"""The HERO trunk: cross-modal F-TRM, temporal T-TRM and the hierarchical video encoder
(model.md §6–§7).

Decisions on open points of the spec:
- The "pad-layer-unpad" helper (§4.11) is skipped: the layers act row by row, so applying them
  directly is identical; the ``pad`` buffers are still registered (persistent) for state-dict
  compatibility.
- MFM does not modify the caller's ``c_v_feats`` in place (upstream zeroes the masked frames in
  place); the numbers are the same.
- Losses (MLM CE, MFM-NCE, FOM CE) are computed on fp32 logits, also under autocast.
- FOM keeps upstream's plain mean CE: a batch with no selected frame gives NaN (data.md §10.3).
- F-TRM rows are packed by default (issue 17, :mod:`model.packing`): the embeddings and the
  layers see only the valid tokens (§6.1 masks), the VCMR/VSM query rows share the subtitle
  rows' embedding pass and encoder call, and the last layer computes only the slots a task
  reads (collected frames, query tokens, MLM targets). ``row_layout="padded"`` is upstream's
  computation; tests hold the two equal (fp32 relative error <= 1e-5, outputs and gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.embeddings import (
    FrameEmbeddings,
    RobertaTextEmbeddings,
    TemporalFrameEmbeddings,
    token_type_lookup,
)
from model.layers import EMB_LN_EPS, BertEncoder, BertPooler, LinearLayer, MLPLayer, gelu
from model.layers import init_weights as _init_weights
from model.packing import PACKED_ATTN, Packing

ROW_LAYOUTS = ("packed", "padded")

PAD_ROWS = 8  # rows of the (functionally unused) ``pad`` buffers
MAX_CLIP_LEN = 100  # FOM classes; never overridden upstream
NCE_TEMP = 1.0


def init_weights_fn(std: float):
    """``module.apply`` callable for upstream's BERT init with the config's std."""
    return lambda module: _init_weights(module, std)


class LMHead(nn.Module):
    """dense -> erf GELU -> LN(1e-5) -> tied decoder (no bias) + ``bias`` (model.md §4.6).

    ``decoder.weight`` *is* the word-embedding parameter, so both keys appear in state dicts.
    Callable on any (..., D) hidden states (the TVC decoder reuses it).
    """

    def __init__(self, config, word_embedding_weight: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=EMB_LN_EPS)
        self.decoder = nn.Linear(word_embedding_weight.size(1), word_embedding_weight.size(0),
                                 bias=False)
        self.decoder.weight = word_embedding_weight
        self.bias = nn.Parameter(torch.zeros(word_embedding_weight.size(0)))

    def forward(self, hidden):
        return self.decoder(self.LayerNorm(gelu(self.dense(hidden)))) + self.bias


class FrameFeatureRegression(nn.Module):
    """net.3(LN_1e-5(gelu(net.0(x)))): hidden -> raw frame feature (model.md §4.9)."""

    def __init__(self, hidden_size: int, feat_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.LayerNorm(hidden_size, eps=EMB_LN_EPS),
                                 nn.Linear(hidden_size, feat_dim))

    def forward(self, x):
        return self.net(x)


def gather_compact(img_emb, txt_emb, gather_index):
    """[frames; text] along the sequence axis, then per-row gather (frames first, §6.1)."""
    emb = torch.cat([img_emb, txt_emb], dim=1)
    index = gather_index.unsqueeze(-1).expand(-1, -1, emb.size(-1))
    return torch.gather(emb, 1, index)


def _compact_sources(packing, gather_index, num_frames: int, num_text: int):
    """Where the packed tokens of compact rows (the first input of ``packing``) come from:
    (flat frame indices (R·F), their positions in the row, flat text indices (R·Lt), is-frame
    flag per such token), via ``gather_index`` (frames first, §6.1)."""
    width = gather_index.size(1)
    slots = packing.index[:sum(packing.lengths[:gather_index.size(0)])]
    rows = torch.div(slots, width, rounding_mode="floor")
    src = gather_index.reshape(-1)[slots]
    is_frame = src < num_frames
    frame_pos = src[is_frame]
    text_rows = (rows * num_text + src - num_frames)[~is_frame]
    return rows[is_frame] * num_frames + frame_pos, frame_pos, text_rows, is_frame


class CrossModalTrm(nn.Module):
    """F-TRM (``v_encoder.f_encoder``, model.md §6): one row per subtitle segment.

    ``vocab_pad`` is 0 except after :func:`model.model.load_roberta` padded the vocabulary; the
    MLM logits then drop their last ``vocab_pad`` columns.

    ``row_layout`` (config key, default ``"packed"``): the encoder layers run on the valid
    tokens only (:mod:`model.packing`, issue 17); ``"padded"`` is upstream's computation, kept
    as the reference. Padding slots of the packed output are 0 (no task reads them). ``packed_attn``
    picks the row-wise attention (``None``: ``"jagged"`` on CUDA, ``"bucket"`` elsewhere).
    """

    def __init__(self, config, vfeat_dim: int, max_frm_seq_len: int):
        super().__init__()
        self.config = config
        self.encoder = BertEncoder(config)
        self.embeddings = RobertaTextEmbeddings(config)
        self.img_embeddings = FrameEmbeddings(config, vfeat_dim, max_frm_seq_len)
        self.pooler = BertPooler(config)
        self.apply(init_weights_fn(config.initializer_range))
        self.lm_head = LMHead(config, self.embeddings.word_embeddings.weight)
        self.register_buffer("pad", torch.zeros(PAD_ROWS, config.hidden_size))
        self.vocab_pad = 0
        self.row_layout = getattr(config, "row_layout", "packed")
        self.packed_attn = getattr(config, "packed_attn", None)

    def packs(self, like: torch.Tensor) -> bool:
        """Whether rows are packed: ``row_layout`` says so and ``like`` has values (meta
        tensors have none to find the valid slots with, so they take the padded path)."""
        if self.row_layout not in ROW_LAYOUTS:
            raise ValueError(f"unknown row_layout {self.row_layout!r}; expected {ROW_LAYOUTS}")
        return self.row_layout == "packed" and like.device.type != "meta"

    def run_encoder(self, emb, attn_masks):
        """Encoder stack over (R, L, D) rows with a 0/1 (R, L) mask -> (R, L, D)."""
        if not self.packs(emb):
            return self.encoder(emb, attn_masks)
        packing = self.new_packing([attn_masks], emb)
        return self.encode_packed(packing.pack(emb), packing)[0]

    def embed(self, txt_ids, txt_pos, img_feat, img_pos, gather_index, img_masks=None,
              txt_emb=None):
        """Compact frames-then-text embeddings; text-only or frames-only when one is None.
        ``txt_emb`` passes text embeddings already computed (see :meth:`forward_frames`)."""
        if txt_emb is None and txt_ids is not None:
            txt_emb = self.embeddings(txt_ids, txt_pos)
        if img_feat is None:
            return txt_emb
        types = token_type_lookup(self.embeddings.token_type_embeddings, img_feat)
        img_emb = self.img_embeddings(img_feat, img_pos, types, img_masks)
        if txt_emb is None:
            return img_emb
        return gather_compact(img_emb, txt_emb, gather_index)

    def encode(self, emb, attn_masks):
        """Encoder stack + pooler: (sequence, pooled)."""
        seq = self.run_encoder(emb, attn_masks)
        return seq, self.pooler(seq)

    def embed_packed(self, packing, sub, query=None, img_masks=None):
        """The packed (T, D) input of ``packing`` (compact subtitle rows, then the ``query``
        (ids, positions) rows) embedded at valid slots only, so LayerNorm, dropout and the
        frame linear see no padding (issue 17, item 1); per token it is :meth:`embed`.
        ``sub`` = (ids, positions, frame features, frame positions, gather_index) (§6.1)."""
        ids, pos, feats, img_pos, gather_index = sub
        if ids is None or feats is None:
            return packing.pack(self.embed(*sub, img_masks=img_masks),
                                *([] if query is None else [self.embeddings(*query[:2])]))
        frame_rows, frame_pos, text_rows, is_frame = _compact_sources(
            packing, gather_index, feats.size(1), ids.size(1))
        texts = [(ids, pos, text_rows)]
        if query is not None:
            rows = packing.index[is_frame.numel():] - gather_index.numel()
            texts.append((query[0], query[1], rows))
        txt_emb = self._embed_text_tokens(texts)
        if img_pos is not None:
            frame_pos = img_pos.expand(gather_index.size(0), -1).reshape(-1)[frame_rows]
        masks = None if img_masks is None else img_masks.reshape(-1)[frame_rows][None]
        types = token_type_lookup(self.embeddings.token_type_embeddings, feats)
        img_emb = self.img_embeddings(feats.reshape(-1, feats.size(-1))[frame_rows][None],
                                      frame_pos[None], types, masks)[0]
        is_frame = F.pad(is_frame, (0, packing.num_tokens - is_frame.numel()))
        order = torch.where(is_frame, is_frame.cumsum(0) - 1,
                            img_emb.size(0) + (~is_frame).cumsum(0) - 1)
        return torch.cat([img_emb, txt_emb])[order]

    def _embed_text_tokens(self, texts):
        """Text embeddings (n, D) of the tokens ``rows`` (flat) of each (ids, positions, rows),
        with one word-table lookup: its dense gradient is built once (issue 17, item 3)."""
        all_ids, all_pos = [], []
        for ids, pos, rows in texts:
            pos = self.embeddings.default_position_ids(ids) if pos is None else pos
            all_ids.append(ids.reshape(-1)[rows])
            all_pos.append(pos.expand_as(ids).reshape(-1)[rows])
        return self.embeddings(torch.cat(all_ids)[None], torch.cat(all_pos)[None])[0]

    def forward_repr(self, batch, img_masks=None):
        sub = (batch["f_sub_input_ids"], batch["f_sub_pos_ids"], batch["f_v_feats"],
               batch.get("f_v_pos_ids"), batch["f_gather_index"])
        masks = batch["f_attn_masks"]
        if not self.packs(masks):
            return self.encode(self.embed(*sub, img_masks), masks)
        packing = self.new_packing([masks], masks)
        seq = self.encode_packed(self.embed_packed(packing, sub, img_masks=img_masks),
                                 packing)[0]
        return seq, self.pooler(seq)

    def forward_frames(self, batch, img_masks, read_index, query=None):
        """(segment rows (R, L, D), query hidden (N, T, D) or None) for the T-TRM and VSM.

        Packed layout: one embedding pass and one encoder call over the subtitle rows and the
        ``query`` (ids, positions, mask) rows; the last layer computes only the segment slots
        in ``read_index`` (rows, cols: what the collect reads, model.md §7.1) and the query
        tokens, other slots are 0. Padded layout: upstream's two separate passes.
        """
        if not self.packs(batch["f_attn_masks"]):
            rows = self.forward_repr(batch, img_masks)[0]
            return rows, None if query is None else self.forward_txt(*query)
        masks = [batch["f_attn_masks"]] + ([] if query is None else [query[2]])
        packing = self.new_packing(masks, masks[0])
        sub = (batch["f_sub_input_ids"], batch["f_sub_pos_ids"], batch["f_v_feats"],
               batch.get("f_v_pos_ids"), batch["f_gather_index"])
        read = torch.zeros(masks[0].shape, dtype=torch.bool, device=masks[0].device)
        read[read_index] = True
        outs = self.encode_packed(self.embed_packed(packing, sub, query, img_masks), packing,
                                  [read] + masks[1:])
        return outs[0], outs[1] if query is not None else None

    def new_packing(self, masks, like):
        """A :class:`Packing` of ``masks`` with this module's attention choice."""
        return Packing(masks, self.packed_attn or ("jagged" if like.is_cuda else "bucket"))

    def encode_packed(self, packed, packing, read_masks=None):
        """Encoder over packed (T, D) tokens; ``read_masks`` (one per input of ``packing``)
        restricts the last layer to those slots (issue 17 items 1-3). Returns padded outputs."""
        last, slots = (None, None) if read_masks is None else packing.reading(read_masks)
        return packing.unpack(self.encoder(packed, packing, last), slots)

    def forward_txt(self, input_ids, position_ids, attn_masks):
        """Text-only pass (type id 1, no frames): sequence output (N, T, D)."""
        return self.run_encoder(self.embeddings(input_ids, position_ids), attn_masks)

    def forward_mlm(self, batch, compute_loss=True):
        """LM logits at ``txt_mask_tgt`` positions (row-major); per-token CE if asked."""
        sub = (batch["input_ids"], batch["position_ids"], batch["v_feat"],
               batch.get("f_pos_ids"), batch["gather_index"])
        masks, targets = batch["attn_masks"], batch["txt_mask_tgt"]
        if not self.packs(masks):
            seq = self.encoder(self.embed(*sub), masks)
        else:                                  # the last layer computes the masked tokens only
            packing = self.new_packing([masks], masks)
            seq = self.encode_packed(self.embed_packed(packing, sub), packing, [targets])[0]
        logits = self.lm_head(seq[targets])
        if self.vocab_pad:
            logits = logits[:, :-self.vocab_pad]
        if not compute_loss:
            return logits
        return F.cross_entropy(logits.float(), batch["txt_labels"], reduction="none")

    def forward(self, batch, task="repr", compute_loss=True):
        if task == "repr":
            return self.forward_repr(batch, batch.get("f_v_masks"))
        if task == "txt":
            return self.encode(self.embeddings(batch["input_ids"], batch["pos_ids"]),
                               batch["attn_masks"])
        if task.startswith("mlm"):
            return self.forward_mlm(batch, compute_loss)
        raise ValueError(f"CrossModalTrm: unknown task {task!r} (expected repr, txt or mlm*)")


def set_row_layout(model: nn.Module, layout: str, packed_attn: str | None = None) -> nn.Module:
    """Switch every F-TRM of ``model`` between ``"packed"`` rows and the ``"padded"`` reference."""
    if layout not in ROW_LAYOUTS or packed_attn not in (None,) + PACKED_ATTN:
        raise ValueError(f"unknown row layout {layout!r} / packed_attn {packed_attn!r}; "
                         f"expected {ROW_LAYOUTS} / {PACKED_ATTN}")
    for mod in model.modules():
        if isinstance(mod, CrossModalTrm):
            mod.row_layout, mod.packed_attn = layout, packed_attn
    return model


class TemporalTrm(nn.Module):
    """T-TRM (``v_encoder.c_encoder``, model.md §7.1 step 4): frame positions + encoder."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = TemporalFrameEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(init_weights_fn(config.initializer_range))

    def forward(self, clip_feat, attn_masks, pool=False):
        """(B, L, D) -> (B, L, D); padded positions keep their (non-zero) outputs."""
        seq = self.encoder(self.embeddings(clip_feat), attn_masks)
        return (seq, self.pooler(seq)) if pool else seq


def mfm_nce_logits(predictions, targets, negatives):
    """fp32 [P·targetsᵀ ‖ P·Nᵀ] (model.md §7.2 step 5); shared by the loss and by pre-training
    validation, which gets only upstream's pair (P, N) from the model."""
    return torch.cat([predictions @ targets.to(predictions.dtype).t(),
                      predictions @ negatives.to(predictions.dtype).t()], dim=1).float()


def mfm_nce_loss(predictions, targets, negatives, nce_temp: float = NCE_TEMP):
    """MFM-NCE (model.md §7.2 step 5): returns (per-frame CE, fp32 logits).

    Row i's positive is column i of P·targetsᵀ; the other targets and every predicted
    negative are its negatives.
    """
    logits = mfm_nce_logits(predictions, targets, negatives)
    labels = torch.arange(logits.size(0), device=logits.device)
    return F.cross_entropy(logits / nce_temp, labels, reduction="none"), logits


def shuffle_frames(x, shuffled_orders):
    """FOM scatter along time: out[b, orders[b, i]] = x[b, i] (model.md §7.3 step 2)."""
    index = shuffled_orders.unsqueeze(-1).expand_as(x)
    return torch.zeros_like(x).scatter(1, index, x)


class HierarchicalVlModel(nn.Module):
    """``v_encoder``: F-TRM per segment, collect onto clip frames, fuse, T-TRM (model.md §7).

    Task dispatch (§7.4): ``repr`` -> T-TRM output (B, L, D); ``mlm*`` -> F-TRM MLM;
    ``mffr`` / ``mfm-nce`` -> MFM; ``fom`` -> frame order modelling.  With
    ``compute_loss=False``: mlm -> logits (M, V); mffr -> predictions (n_m, Dv);
    mfm-nce -> upstream's pair (predictions of the masked frames (n_m, Dv), predictions of
    every unmasked position, padding included (B·L − n_m, Dv)); fom -> logits (B·L, 100).
    """

    def __init__(self, config, vfeat_dim: int, max_frm_seq_len: int,
                 max_clip_len: int = MAX_CLIP_LEN, nce_temp: float = NCE_TEMP):
        super().__init__()
        f_cfg, c_cfg = config.f_config, config.c_config
        if f_cfg.hidden_size != c_cfg.hidden_size:
            raise ValueError(f"f_config.hidden_size ({f_cfg.hidden_size}) must equal "
                             f"c_config.hidden_size ({c_cfg.hidden_size})")
        hidden = c_cfg.hidden_size
        self.initializer_range = config.initializer_range
        self.f_encoder = CrossModalTrm(f_cfg, vfeat_dim, max_frm_seq_len)
        self.frame_transform = LinearLayer(vfeat_dim, hidden, c_cfg.hidden_dropout_prob)
        self.c_encoder = TemporalTrm(c_cfg)
        self.feat_regress = FrameFeatureRegression(hidden, vfeat_dim)
        self.mask_embedding = nn.Embedding(2, vfeat_dim, padding_idx=0)
        self.fom_output = MLPLayer(hidden, max_clip_len)
        self.register_buffer("pad", torch.zeros(PAD_ROWS, hidden))
        self.nce_temp = nce_temp

    def initialize(self):
        """Upstream order (§10): whole v_encoder, then F-TRM and T-TRM again."""
        fn = init_weights_fn(self.initializer_range)
        self.apply(fn)
        self.f_encoder.apply(fn)
        self.c_encoder.apply(fn)

    @staticmethod
    def _collect_index(f_shape, num_subs, sub_idx2frame_idx, clip_len):
        """Flat (source row, source position, destination b·L+f) lists for the collect, given
        the (rows, width) of the F-TRM output."""
        if len(num_subs) != len(sub_idx2frame_idx) or sum(num_subs) != f_shape[0]:
            raise ValueError(f"batch mismatch: num_subs {list(num_subs)} (sum {sum(num_subs)}) "
                             f"vs {f_shape[0]} F-TRM rows and {len(sub_idx2frame_idx)} "
                             "sub_idx2frame_idx entries")
        rows, cols, dest, offset = [], [], [], 0
        for b, (n_sub, pairs) in enumerate(zip(num_subs, sub_idx2frame_idx)):
            for sub_idx, frames in pairs:
                if sub_idx >= n_sub or len(frames) > f_shape[1] or (
                        frames and max(frames) >= clip_len):
                    raise IndexError(
                        f"sub_idx2frame_idx[{b}] pair ({sub_idx}, {list(frames)}) does not fit "
                        f"{n_sub} segments / {clip_len} clip frames; check that the video DB's "
                        "id2nframe is >= vid2len and sub indices are contiguous (data.md §13)")
                rows += [offset + sub_idx] * len(frames)
                cols += range(len(frames))
                dest += [b * clip_len + f for f in frames]
            offset += n_sub
        return rows, cols, dest

    def collect_frames(self, f_out, num_subs, sub_idx2frame_idx, clip_len):
        """Scatter-add segment frame outputs onto clip frames, rows addressed by sub_idx."""
        index = self._collect_index(f_out.shape, num_subs, sub_idx2frame_idx, clip_len)
        return self._collect(f_out, index, len(num_subs), clip_len)

    @staticmethod
    def _collect(f_out, index, num_videos, clip_len):
        rows, cols, dest = index
        out = f_out.new_zeros(num_videos * clip_len, f_out.size(-1))
        if dest:
            dev = f_out.device
            src = f_out[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
            out = out.index_add(0, torch.tensor(dest, device=dev), src)
        return out.view(num_videos, clip_len, f_out.size(-1))

    def _repr(self, batch, c_v_feats, f_v_masks=None, encode_clip=True, query=None):
        """Fused frames X or the T-TRM output; with ``query`` also its F-TRM text hidden."""
        clip_len, num_subs = c_v_feats.size(1), batch["num_subs"]
        index = self._collect_index(batch["f_attn_masks"].shape, num_subs,
                                    batch["sub_idx2frame_idx"], clip_len)
        dev = c_v_feats.device
        read = (torch.tensor(index[0], dtype=torch.long, device=dev),
                torch.tensor(index[1], dtype=torch.long, device=dev))
        f_out, q_out = self.f_encoder.forward_frames(batch, f_v_masks, read, query)
        fused = self.frame_transform(c_v_feats) + self._collect(f_out, index, len(num_subs),
                                                                clip_len)
        out = self.c_encoder(fused, batch["c_attn_masks"]) if encode_clip else fused
        return out if query is None else (out, q_out)

    def forward_repr(self, batch, encode_clip=True):
        """T-TRM output (B, L, D); with ``encode_clip=False`` the fused frames X before it."""
        return self._repr(batch, batch["c_v_feats"], None, encode_clip)

    def forward_repr_query(self, batch, query_input_ids, query_pos_ids, query_attn_masks):
        """(T-TRM output, F-TRM text hidden of the queries) from one F-TRM call when packed."""
        return self._repr(batch, batch["c_v_feats"],
                          query=(query_input_ids, query_pos_ids, query_attn_masks))

    def forward_mfm(self, batch, task="mfm-nce", compute_loss=True):
        """MFM (§7.2): masked clip frames get mask_embedding row 1, all others row 0."""
        c_masks = batch["c_v_masks"]
        feats = batch["c_v_feats"].masked_fill(c_masks.unsqueeze(-1), 0)
        feats = feats + self.mask_embedding(c_masks.long())
        out = self._repr(batch, feats, batch["f_v_masks"])
        preds = self.feat_regress(out[c_masks])
        targets = batch["feat_targets"]
        if task == "mffr":
            if not compute_loss:
                return preds
            return F.mse_loss(preds.float(), targets.float(), reduction="none")
        negatives = self.feat_regress(out[~c_masks])
        if not compute_loss:
            return preds, negatives
        return mfm_nce_loss(preds, targets, negatives, self.nce_temp)[0]

    def forward_fom(self, batch, compute_loss=True):
        """FOM (§7.3): shuffle fused frames, T-TRM, 100-way classification, mean CE."""
        fused = self.forward_repr(batch, encode_clip=False)
        out = self.c_encoder(shuffle_frames(fused, batch["shuffled_orders"]),
                             batch["c_attn_masks"])
        logits = self.fom_output(out.reshape(-1, out.size(-1)))
        if not compute_loss:
            return logits
        return F.cross_entropy(logits.float(), batch["targets"].reshape(-1), ignore_index=-1)

    def forward(self, batch, task="repr", compute_loss=True):
        if task == "repr":
            return self.forward_repr(batch)
        if task.startswith("mlm"):
            return self.f_encoder.forward_mlm(batch, compute_loss)
        if task in ("mffr", "mfm-nce"):
            return self.forward_mfm(batch, task, compute_loss)
        if task == "fom":
            return self.forward_fom(batch, compute_loss)
        raise ValueError(f"v_encoder: unknown task {task!r} "
                         "(expected repr, mlm*, mffr, mfm-nce or fom)")

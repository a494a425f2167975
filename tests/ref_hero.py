"""An independent functional HERO, written line by line from model.md, for fidelity tests.

It reads nothing but a state dict ``P`` (key -> tensor) and the batch, and uses plain
torch ops (explicit attention, loops over rows and videos, python-level ranking losses), so a
wrong key, LayerNorm eps, mask convention, gather order or reduction in ``model/`` shows up as a
numerical difference. Eval semantics (no dropout) throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG = -10000.0


class Ref:
    def __init__(self, model, heads: int):
        self.P = {k: v.detach() for k, v in model.state_dict().items()}
        self.h = heads

    # ------------------------------------------------------------------ blocks (§4)
    def lin(self, x, name):
        b = self.P.get(name + ".bias")
        return x @ self.P[name + ".weight"].t() + (0 if b is None else b)

    def ln(self, x, name, eps):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * self.P[name + ".weight"] + self.P[name + ".bias"]

    def attn(self, x, kv, name, add_mask):
        """§4.1: heads = contiguous 64-channel blocks, S = QKᵀ / √d + M, softmax, ·V."""
        n, lq, d = x.shape
        dh = d // self.h

        def split(t):
            return t.view(n, t.size(1), self.h, dh).permute(0, 2, 1, 3)
        q, k, v = (split(self.lin(t, f"{name}.{w}"))
                   for t, w in ((x, "query"), (kv, "key"), (kv, "value")))
        s = q @ k.transpose(-1, -2) / math.sqrt(dh) + add_mask
        return (torch.softmax(s, -1) @ v).permute(0, 2, 1, 3).reshape(n, lq, d)

    def add_norm(self, a, res, dense, norm):
        return self.ln(self.lin(a, dense) + res, norm, 1e-12)

    def layer(self, x, name, m):
        y = self.add_norm(self.attn(x, x, f"{name}.attention.self", m), x,
                          f"{name}.attention.output.dense", f"{name}.attention.output.LayerNorm")
        f = F.gelu(self.lin(y, f"{name}.intermediate.dense"))
        return self.add_norm(f, y, f"{name}.output.dense", f"{name}.output.LayerNorm")

    def encoder(self, x, mask01, name):
        m = (1.0 - mask01.float())[:, None, None, :] * NEG
        i = 0
        while f"{name}.layer.{i}.output.dense.weight" in self.P:
            x = self.layer(x, f"{name}.layer.{i}", m)
            i += 1
        return x

    @staticmethod
    def mask_logits(x, m):
        m = m.float()
        return x * m + (1 - m) * -1e4

    # ------------------------------------------------------------------ F-TRM (§5–§6)
    F_ = "v_encoder.f_encoder"

    def type1(self):
        return self.P[f"{self.F_}.embeddings.token_type_embeddings.weight"][1]

    def txt_emb(self, ids, pos):
        e = f"{self.F_}.embeddings"
        x = (self.P[f"{e}.word_embeddings.weight"][ids]
             + self.P[f"{e}.position_embeddings.weight"][pos] + self.type1())
        return self.ln(x, f"{e}.LayerNorm", 1e-5)

    def img_emb(self, feats, masks=None):
        e = f"{self.F_}.img_embeddings"
        if masks is not None:
            feats = feats + self.P[f"{e}.mask_embedding.weight"][masks.long()]
        x = self.lin(self.ln(feats, f"{e}.img_LayerNorm", 1e-5), f"{e}.img_linear")
        x = x + self.P[f"{e}.position_embeddings.weight"][:feats.size(1)] + self.type1()
        return self.ln(x, f"{e}.LayerNorm", 1e-5)

    def f_out(self, ids, pos, feats, gather, mask, f_masks=None):
        cat = torch.cat([self.img_emb(feats, f_masks), self.txt_emb(ids, pos)], 1)
        compact = torch.stack([cat[r, gather[r]] for r in range(cat.size(0))])
        return self.encoder(compact, mask, f"{self.F_}.encoder")

    def lm_head(self, h):
        e = f"{self.F_}.lm_head"
        z = self.ln(F.gelu(self.lin(h, f"{e}.dense")), f"{e}.LayerNorm", 1e-5)
        return z @ self.P[f"{self.F_}.embeddings.word_embeddings.weight"].t() + self.P[f"{e}.bias"]

    # ------------------------------------------------------------------ v_encoder (§7)
    def fused(self, b, c_feats=None, f_masks=None):
        c_feats = b["c_v_feats"] if c_feats is None else c_feats
        hf = self.f_out(b["f_sub_input_ids"], b["f_sub_pos_ids"][0], b["f_v_feats"],
                        b["f_gather_index"], b["f_attn_masks"], f_masks)
        m, off = torch.zeros(c_feats.shape[:2] + (hf.size(-1),)), 0
        for v, (n_sub, pairs) in enumerate(zip(b["num_subs"], b["sub_idx2frame_idx"])):
            for s, frames in pairs:
                for j, fr in enumerate(frames):
                    m[v, fr] += hf[off + s, j]
            off += n_sub
        ft = self.lin(self.ln(c_feats, "v_encoder.frame_transform.LayerNorm", 1e-5),
                      "v_encoder.frame_transform.net.1")
        return F.relu(ft) + m

    def c_emb(self, x):
        e = "v_encoder.c_encoder.embeddings"
        return self.ln(x + self.P[f"{e}.position_embeddings.weight"][:x.size(1)],
                       f"{e}.LayerNorm", 1e-5)

    def t_trm(self, x, mask):
        return self.encoder(self.c_emb(x), mask, "v_encoder.c_encoder.encoder")

    def repr(self, b):
        return self.t_trm(self.fused(b), b["c_attn_masks"])

    def mlm_logits(self, b):
        h = self.f_out(b["input_ids"], b["position_ids"][0], b["v_feat"], b["gather_index"],
                       b["attn_masks"])
        return self.lm_head(h[b["txt_mask_tgt"]])

    def feat_regress(self, x):
        r = "v_encoder.feat_regress.net"
        return self.lin(self.ln(F.gelu(self.lin(x, f"{r}.0")), f"{r}.2", 1e-5), f"{r}.3")

    def mfm(self, b):
        cm = b["c_v_masks"]
        feats = b["c_v_feats"].clone()
        feats[cm] = 0
        feats = feats + self.P["v_encoder.mask_embedding.weight"][cm.long()]
        out = self.t_trm(self.fused(b, feats, b["f_v_masks"]), b["c_attn_masks"])
        preds, negs = self.feat_regress(out[cm]), self.feat_regress(out[~cm])
        logits = torch.cat([preds @ b["feat_targets"].t(), preds @ negs.t()], 1)
        nce = F.cross_entropy(logits, torch.arange(len(preds)), reduction="none")
        return preds, nce, (preds - b["feat_targets"]) ** 2

    def mlp(self, x, name):
        return self.lin(self.ln(F.gelu(self.lin(x, f"{name}.linear_1")), f"{name}.LayerNorm",
                                1e-5), f"{name}.linear_2")

    def fom_logits(self, b):
        x = self.fused(b)
        shuf = torch.zeros_like(x)
        for v in range(x.size(0)):
            for i in range(x.size(1)):
                shuf[v, b["shuffled_orders"][v, i]] = x[v, i]
        out = self.t_trm(shuf, b["c_attn_masks"])
        return self.mlp(out.reshape(-1, out.size(-1)), "v_encoder.fom_output")

    # ------------------------------------------------------------------ VSM heads (§8)
    def query(self, ids, pos, mask):
        h = self.encoder(self.txt_emb(ids, pos[0]), mask, f"{self.F_}.encoder")
        q = "q_feat_attn"
        x = F.relu(self.lin(self.ln(h, f"{q}.query_input_proj.LayerNorm", 1e-5),
                            f"{q}.query_input_proj.net.1"))
        x = self.ln(x + self.P[f"{q}.query_pos_embed.position_embeddings.weight"][:x.size(1)],
                    f"{q}.query_pos_embed.LayerNorm", 1e-5)
        a = f"{q}.query_self_attention"
        m = (1.0 - mask.float())[:, None, None, :] * NEG
        x = self.add_norm(self.attn(x, x, f"{a}.self", m), x, f"{a}.output.dense",
                          f"{a}.output.LayerNorm")
        s = self.mask_logits((x @ self.P[f"{q}.modular_vector_mapping.weight"].t())[..., 0],
                             mask)
        return (torch.softmax(s, -1)[..., None] * x).sum(1)

    def conv(self, sig, name):
        """Zero-padded cross-correlation, kernel 5, no flip, no bias."""
        w = self.P[name + ".weight"].flatten()
        k = len(w) // 2
        padded = F.pad(sig, (k, k))
        return sum(w[i] * padded[..., i:i + sig.size(-1)] for i in range(len(w)))

    def st_ed(self, q, frames, mask, cross):
        qp = self.lin(q, "video_query_linear")
        if cross:
            s = torch.stack([torch.stack([frames[j] @ qp[i] for j in range(len(frames))])
                             for i in range(len(qp))])
            mask = mask[None]
        else:
            s = torch.stack([frames[i] @ qp[i] for i in range(len(qp))])
        return (self.mask_logits(self.conv(s, "video_st_predictor"), mask),
                self.mask_logits(self.conv(s, "video_ed_predictor"), mask))

    def scores(self, q, frames, mask):
        qn = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-5)
        vn = frames / frames.norm(dim=-1, keepdim=True).clamp(min=1e-5)
        out = torch.zeros(len(q), len(frames))
        for i in range(len(q)):
            for j in range(len(frames)):
                out[i, j] = self.mask_logits(vn[j] @ qn[i], mask[j]).max()
        return out

    @staticmethod
    def ranking(S, margin=0.1, hard=None, training=True):
        """§8.5 with use_all_neg, hinge; ``hard`` = (pool, weight) or None."""
        n_q, n_v = S.shape
        k = n_q // n_v
        sm = S.clone()
        for i in range(n_q):
            sm[i, i // k] = 999.0

        def weigh(vals):
            if hard is None:
                return vals
            return [v * (hard[1] if c < hard[0] else 0.1) for c, v in enumerate(vals)]
        ctx, qq = [], []
        for i in range(n_q):
            pos = S[i, i // k]
            negs = sorted(sm[i].tolist(), reverse=True)[1:]
            ctx.append(sum(weigh([max(0.0, margin + n - pos) for n in negs])) / len(negs))
        for v in range(n_v):
            negs = sorted(sm[:, v].tolist(), reverse=True)[k:]
            for a in range(k):
                pos = S[v * k + a, v]
                qq.append(sum(weigh([max(0.0, margin + n - pos) for n in negs])) / len(negs))
        ctx, qq = torch.tensor(ctx), torch.tensor(qq)
        return (ctx.mean(), qq.mean()) if training else (ctx, qq)

    # ------------------------------------------------------------------ QA / VIOLIN (§9.3–4)
    def frames_with_text(self, b, ids, pos, tmask):
        x = torch.cat([self.c_emb(self.fused(b)), self.txt_emb(ids, pos[0])], 1)
        m = torch.cat([b["c_attn_masks"], tmask], 1)
        return self.encoder(x, m, "v_encoder.c_encoder.encoder")[:, :b["c_attn_masks"].size(1)]

    def pool(self, y, mask, name, dim):
        s = self.mask_logits(y @ self.P[name + ".weight"].t(), mask[..., None])
        return (torch.softmax(s, dim) * y).sum(dim)

    def qa(self, b):
        y = self.frames_with_text(b, b["qa_input_ids"], b["qa_pos_ids"], b["qa_attn_masks"])
        y = y.view(-1, 5, *y.shape[1:])
        m = b["c_attn_masks"].view(-1, 5, y.size(2))
        logits = self.mlp(self.pool(y, m, "qa_pool", 2), "qa_pred_head")[..., 0]
        se = self.mlp(self.pool(y, m, "st_ed_pool", 1), "st_ed_pred_head")
        return (logits, self.mask_logits(se[..., 0], m[:, 0]),
                self.mask_logits(se[..., 1], m[:, 0]))

    def violin(self, b):
        y = self.frames_with_text(b, b["q_input_ids"], b["q_pos_ids"], b["q_attn_masks"])
        return self.mlp(self.pool(y, b["c_attn_masks"], "violin_pool", 1), "violin_pred_head")

    # ------------------------------------------------------------------ TVC (§9.5)
    def tvc_memory(self, b):
        v = self.repr(b)
        segs = [v[i, st:ed] for i, clips in enumerate(b["clip_ranges"]) for st, ed in clips]
        mem = torch.zeros(len(segs), max(len(s) for s in segs), v.size(-1))
        for i, s in enumerate(segs):
            mem[i, :len(s)] = s
        return mem

    def tvc_logits(self, mem, cap_mask, ids):
        t = ids.size(1)
        x = self.ln(self.P[f"{self.F_}.embeddings.word_embeddings.weight"][ids]
                    + self.P["position_embeddings.weight"][:t], "emb_LayerNorm", 1e-5)
        causal = torch.triu(torch.full((t, t), NEG), diagonal=1)
        enc_m = (1.0 - cap_mask.float())[:, None, None, :] * NEG
        i = 0
        while f"decoder.layer.{i}.add_norm_3.dense.weight" in self.P:
            L = f"decoder.layer.{i}"
            x = self.add_norm(self.attn(x, x, f"{L}.self_attention", causal), x,
                              f"{L}.add_norm_1.dense", f"{L}.add_norm_1.LayerNorm")
            x = self.add_norm(self.attn(x, mem, f"{L}.dec_enc_attention", enc_m), x,
                              f"{L}.add_norm_2.dense", f"{L}.add_norm_2.LayerNorm")
            f = F.gelu(self.lin(x, f"{L}.intermidiate.dense"))
            x = self.add_norm(f, x, f"{L}.add_norm_3.dense", f"{L}.add_norm_3.LayerNorm")
            i += 1
        return self.lm_head(x)

    @staticmethod
    def smoothed_loss(logits, targets, lsr=0.1):
        keep = targets != -1
        lp = torch.log_softmax(logits[keep], -1)
        v = lp.size(-1)
        q = torch.full_like(lp, lsr / (v - 1))
        q[torch.arange(len(q)), targets[keep]] = 1 - lsr
        return (q * (q.log() - lp)).sum(-1)

    def greedy(self, mem, cap_mask, steps=30):
        ids = torch.zeros(len(mem), 1, dtype=torch.long)
        for _ in range(steps):
            logits = self.tvc_logits(mem, cap_mask, ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return logits.argmax(-1)

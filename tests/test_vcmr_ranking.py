"""Full-corpus ranking (eval/vcmr_ranking.py) against an independent loop reference written
here from training.md §5.1-§5.2, its own ``impl="reference"``, and corpus encoding.

Tie order (the rule the fast path documents and the loop reference implements on its own):
equal video scores keep the lower local video index; equal VCMR span scores keep the lower
(video rank k, i, j), k being the video's position in the VR list; equal SVMR scores keep the
lower (i, j). Only spans inside the length window are candidates (the list is shorter instead of
padded with out-of-window zeros, a documented deviation).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eval.nms import nms_vcmr_predictions
from eval.vcmr_ranking import (
    encode_video_corpus,
    rank_batch,
    span_pairs,
    topk_stable,
    window_mask,
)

TVR = dict(k_videos=100, min_l=2, max_l=16, max_before_nms=200, use_exp=True, alpha=20.0)


def cfg(**kw):
    return SimpleNamespace(**{**TVR, **kw})


def random_inputs(n_q, n_v, length, seed, valid_frac=0.75):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.softmax(torch.randn(n_q, n_v, length, generator=gen) * 4, -1) for _ in range(2)]
    cut = max(1, int(length * valid_frac))
    for t in p:
        t[..., cut:] = 0  # padded frames: probability exactly 0 -> many tied scores
    scores = torch.rand(n_q, n_v, generator=gen) * 2 - 1
    scores[:, -1] = scores[:, 0]  # tied video scores
    gt = torch.randint(-1, n_v, (n_q,), generator=gen)
    return scores, p[0], p[1], gt


def test_topk_stable_equals_stable_sort_with_ties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 50), generator=gen).float()
    for k in (1, 7, 50, 80):
        vals, idx = topk_stable(x, k)
        ref = torch.sort(x, dim=1, descending=True, stable=True)
        assert torch.equal(vals, ref.values[:, :k]) and torch.equal(idx, ref.indices[:, :k])
    with pytest.raises(ValueError, match="NaN"):
        topk_stable(torch.tensor([[1.0, float("nan")]]), 1)


@pytest.mark.parametrize("n_q,n_v,length,k_videos,seed", [
    (5, 40, 30, 10, 0),  # top-10 of 40 videos
    (4, 3, 12, 100, 1),  # corpus smaller than max_vcmr_video (P4)
    (3, 5, 2, 100, 2),  # L <= min_pred_l: no span at all
    (6, 120, 100, 100, 3),  # TVR sizes
])
def test_fast_equals_reference(n_q, n_v, length, k_videos, seed):
    scores, p_st, p_ed, gt = random_inputs(n_q, n_v, length, seed)
    c = cfg(k_videos=k_videos)
    fast = rank_batch(c, scores, p_st, p_ed, gt, "fast")
    ref = rank_batch(c, scores, p_st, p_ed, gt, "reference")
    assert fast == ref
    assert len(fast["VR"][0]) == min(k_videos, n_v)
    n_pairs = len(span_pairs(length, 2, 16)[0])
    assert len(fast["VCMR"][0]) == min(200, n_pairs * min(k_videos, n_v))
    for q, rows in enumerate(fast["SVMR"]):
        assert len(rows) == (0 if gt[q] < 0 else min(200, n_pairs))


def test_vr_only_uses_raw_scores():
    scores, *_ = random_inputs(3, 8, 5, 4)
    out = rank_batch(cfg(use_exp=False, k_videos=4), scores)
    assert set(out) == {"VR"}
    ref = torch.sort(scores, dim=1, descending=True, stable=True)
    assert out["VR"] == [list(zip(i[:4], v[:4])) for i, v in
                         zip(ref.indices.tolist(), ref.values.tolist())]


def test_known_answer_and_window():
    """One query, 3 videos of L=6: video 2 has the best score and a peaked span (1, 4)."""
    length = 6
    p_st = torch.full((1, 3, length), 0.1)
    p_ed = torch.full((1, 3, length), 0.1)
    p_st[0, 2, 1], p_ed[0, 2, 4] = 0.5, 0.5
    p_st[0, 2, 4], p_ed[0, 2, 1] = 0.9, 0.9  # j < i: outside the window, never returned
    scores = torch.tensor([[0.1, 0.2, 0.5]])
    c = cfg(min_l=2, max_l=4, max_before_nms=5)
    out = rank_batch(c, scores, p_st, p_ed, torch.tensor([1]))
    v, i, j, s = out["VCMR"][0][0]
    assert (v, i, j) == (2, 1, 4)  # j - i = 3 < max_l = 4; decoded with the real L = 6
    assert s == pytest.approx(0.5 * torch.exp(torch.tensor(20 * 0.5)).item() * 0.5, rel=1e-6)
    assert [r[0] for r in out["VR"][0]] == [2, 1, 0]
    assert all(2 <= j - i < 4 for _, i, j, _ in out["VCMR"][0])
    i, j, s = out["SVMR"][0][0]
    assert 2 <= j - i < 4 and s == pytest.approx(0.01)
    assert window_mask(6, 2, 4).sum() == len(span_pairs(6, 2, 4)[0]) == 7


def test_unknown_impl():
    with pytest.raises(ValueError, match="unknown ranking impl"):
        rank_batch(cfg(), torch.zeros(1, 2), impl="slow")


# ------------------------------------------------------------------------------- encoding
class FakeEncoder(torch.nn.Module):
    """``repr`` output = batch position + 1 everywhere, padding included (like the T-TRM)."""

    def forward(self, batch, task):
        b, length = batch["c_attn_masks"].shape
        return (torch.arange(b, dtype=torch.float)[:, None, None] + 1).expand(b, length, 2)


def corpus_loader(lengths, batch_size):
    vids = sorted(lengths)
    batches = []
    for s in range(0, len(vids), batch_size):
        names = vids[s:s + batch_size]
        width = max(lengths[n] for n in names)
        mask = torch.stack([(torch.arange(width) < lengths[n]).long() for n in names])
        batches.append({"vids": names, "c_attn_masks": mask})
    return vids, batches


class ListLoader(list):
    """Batches in a list, with the ``dataset.vids`` a corpus loader exposes."""

    def __init__(self, batches, vids):
        super().__init__(batches)
        self.dataset = SimpleNamespace(vids=vids)


def test_encode_video_corpus_keeps_padding_and_trims():
    lengths = {"a": 2, "b": 4, "c": 3}
    vids, batches = corpus_loader(lengths, batch_size=2)
    model = SimpleNamespace(v_encoder=FakeEncoder())
    frames, masks, order = encode_video_corpus(model, ListLoader(batches, vids),
                                               torch.device("cpu"), max_clip_len=10)
    assert order == ["a", "b", "c"] and frames.shape == (3, 4, 2)  # trimmed to max L_b = 4
    assert frames[0, :, 0].tolist() == [1, 1, 1, 1]  # a: padded positions keep outputs (P5)
    assert frames[2, :, 0].tolist() == [1, 1, 1, 0]  # c: batch of one, zero beyond L_b
    assert masks.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_encode_video_corpus_errors():
    model = SimpleNamespace(v_encoder=FakeEncoder())
    with pytest.raises(ValueError, match="empty video corpus"):
        encode_video_corpus(model, ListLoader([], []), torch.device("cpu"), 10)
    vids, batches = corpus_loader({"a": 2, "b": 4}, batch_size=1)
    with pytest.raises(RuntimeError, match="sorted order"):
        encode_video_corpus(model, ListLoader(batches[::-1], vids), torch.device("cpu"), 10)
    with pytest.raises(ValueError, match="max_clip_len"):
        encode_video_corpus(model, ListLoader(batches, vids), torch.device("cpu"), 3)


# ------------------------------------------------------------------ independent loop reference
def f32(x: float) -> float:
    """Round a Python float to float32 (round to nearest even), as fp32 arithmetic does. The
    product of two float32 values is exact in float64, so ``f32(a * b)`` is fp32's a·b."""
    return float(np.float32(x))


def ref_exp(s: float, alpha: float) -> float:
    """e = exp(α·s) in fp32 (§5.1 B5), with Python's exp rounded to float32."""
    return f32(math.exp(f32(alpha * s)))


def loop_reference(c, scores, p_st, p_ed, gt):
    """VR / VCMR / SVMR lists of every query with nothing but Python loops and sorts."""
    out = {"VR": [], "VCMR": [], "SVMR": []}
    for q in range(len(p_st)):
        n_v, length = len(p_st[q]), len(p_st[q][0])
        e = [ref_exp(s, c.alpha) if c.use_exp else s for s in scores[q]]
        videos = sorted(range(n_v), key=lambda v: (-e[v], v))[:c.k_videos]
        out["VR"].append([(v, e[v]) for v in videos])
        cands = []
        for k, v in enumerate(videos):
            for i in range(length):
                st_e = f32(p_st[q][v][i] * e[v])  # (p_st · e) · p_ed, left to right
                for j in range(i + c.min_l, min(i + c.max_l, length)):
                    cands.append((f32(st_e * p_ed[q][v][j]), k, i, j, v))
        cands.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
        out["VCMR"].append([(v, i, j, sc) for sc, _, i, j, v in cands[:c.max_before_nms]])
        spans = []
        if gt[q] >= 0:
            st, ed = p_st[q][gt[q]], p_ed[q][gt[q]]
            spans = sorted(((f32(st[i] * ed[j]), i, j) for i in range(length)
                            for j in range(i + c.min_l, min(i + c.max_l, length))),
                           key=lambda t: (-t[0], t[1], t[2]))
        out["SVMR"].append([(i, j, sc) for sc, i, j in spans[:c.max_before_nms]])
    return out


def loop_vcmr_nms(preds, thd, max_after=100):
    """§5.2 VCMR NMS on ``[v, st, ed, score]`` rows: per video in order of first appearance,
    greedy suppression of IoU > thd, then all survivors by score (ties keep their order)."""
    def iou(a, b):
        hull = max(a[1], b[1]) - min(a[0], b[0])
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / hull if hull > 0 else 0.0

    order, groups = [], {}
    for row in preds:
        if row[0] not in groups:
            order.append(row[0])
        groups.setdefault(row[0], []).append(row)
    kept = []
    for vid in order:
        rest = sorted(groups[vid], key=lambda r: -r[3])
        if len(rest) == 1:
            kept += rest
            continue
        mine = []
        while len(rest) > 1 and len(mine) < max_after:
            best, rest = rest[0], [r for r in rest[1:] if iou(rest[0][1:3], r[1:3]) <= thd]
            mine.append(best)
        kept += mine + (rest if len(rest) == 1 and len(mine) < max_after else [])
    return sorted(kept, key=lambda r: -r[3])[:max_after]


def exp_exact_scores(n_q, n_v, gen, alpha):
    """Video scores on which torch's fp32 exp equals the correctly rounded one.

    torch's float32 exp is off by one ulp on ~1% of inputs; such an e would reorder two
    near-equal spans and the comparison would test exp, not the ranking. Those draws are
    skipped; the values stay random.
    """
    draws = torch.rand(4 * n_q * n_v, generator=gen) * 2 - 1
    ok = [float(s) for s, e in zip(draws, torch.exp(alpha * draws))
          if ref_exp(float(s), alpha) == float(e)]
    return torch.tensor(ok[:n_q * n_v]).view(n_q, n_v)


def tied_inputs(n_q, n_v, length, k_videos, seed, alpha=20.0, grid=32):
    """Random inputs full of exact ties: probabilities on a 1/grid grid (repeated values and
    products inside a video), zero-probability padded frames, a twin of each query's best
    video (its whole span list ties across two videos), equal video scores at the top-k
    boundary (the lower video index gets in)."""
    gen = torch.Generator().manual_seed(seed)
    p_st, p_ed = (torch.randint(0, grid // 2, (n_q, n_v, length), generator=gen).float() / grid
                  for _ in range(2))
    scores = exp_exact_scores(n_q, n_v, gen, alpha)
    lengths = torch.randint(1, length + 1, (n_q, n_v), generator=gen)
    lengths[torch.arange(n_q), scores.argmax(1)] = length
    frame_ok = (torch.arange(length) < lengths[..., None]).float()
    p_st, p_ed = p_st * frame_ok, p_ed * frame_ok
    for q in range(n_q):
        top, twin = int(scores[q].argmax()), int(scores[q].argmin())
        for t in (scores, p_st, p_ed):
            t[q, twin] = t[q, top]
        order = torch.sort(scores[q], descending=True).indices
        if k_videos < n_v:
            scores[q, order[k_videos]] = scores[q, order[k_videos - 1]]
    gt = torch.randint(-1, n_v, (n_q,), generator=gen)
    return scores, p_st, p_ed, gt


@pytest.mark.parametrize("n_q,n_v,length,k_videos,min_l,max_l,nms_cut,seed", [
    (4, 30, 24, 8, 2, 16, 40, 0),  # top-8 of 30 with a tie at the 8th place
    (3, 5, 12, 100, 2, 16, 200, 1),  # corpus < max_vcmr_video; L < max_pred_l
    (2, 4, 2, 100, 2, 16, 200, 2),  # L <= min_pred_l: no span at all
    (3, 12, 20, 6, 3, 6, 30, 3),  # DiDeMo VO window
    (2, 100, 100, 100, 2, 16, 200, 4),  # TVR sizes
])
def test_fast_path_equals_loop_reference_with_ties(n_q, n_v, length, k_videos, min_l, max_l,
                                                   nms_cut, seed):
    c = cfg(k_videos=k_videos, min_l=min_l, max_l=max_l, max_before_nms=nms_cut)
    scores, p_st, p_ed, gt = tied_inputs(n_q, n_v, length, k_videos, seed)
    fast = rank_batch(c, scores, p_st, p_ed, gt, "fast")
    ref = loop_reference(c, scores.tolist(), p_st.tolist(), p_ed.tolist(), gt.tolist())
    assert fast == ref
    for q, rows in enumerate(fast["VCMR"]):  # the ties are really there
        videos_of = {}
        for v, _, _, score in rows:
            videos_of.setdefault(score, set()).add(v)
        assert length <= min_l or max(map(len, videos_of.values())) > 1  # across videos
        assert length <= min_l or len({(r[0], r[3]) for r in rows}) < len(rows)  # and within
        if k_videos < n_v:
            kept = dict(fast["VR"][q])
            last_v, last_e = fast["VR"][q][-1]
            cut = [v for v in range(n_v) if v not in kept
                   and ref_exp(float(scores[q, v]), c.alpha) == last_e]
            assert cut and min(cut) > last_v  # tie at the cut: the lower index got in
    for rows in fast["VCMR"]:
        preds = [[v, i * 1.5, (j + 1) * 1.5, sc] for v, i, j, sc in rows][:100]
        assert nms_vcmr_predictions(preds, 0.5, 200) == loop_vcmr_nms(preds, 0.5)


def test_loop_reference_vr_without_exp():
    scores, p_st, p_ed, gt = tied_inputs(3, 9, 6, 4, 5)
    c = cfg(use_exp=False, k_videos=4)
    assert rank_batch(c, scores)["VR"] == loop_reference(c, scores.tolist(), p_st.tolist(),
                                                         p_ed.tolist(), gt.tolist())["VR"]

"""Vectorised vs reference full-corpus ranking (eval/vcmr_ranking.py) and corpus encoding."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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

"""Pre-training datasets and collates: MLM, MFM, FOM, VSM (data.md §10).

Random draws are scripted where exact answers are checked (the answer is derived by hand from
the draws); the masking split is checked statistically with the real ``random``. Datasets run
on small LMDBs written with the project's own writers and read by the project's readers.
"""
from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.data import load_video_sub_dataset
from data.db import TxtLmdbWriter, VideoLmdbWriter, write_json, write_meta
from data.fom import (
    FomDataset,
    FomEvalDataset,
    fom_collate,
    fom_eval_collate,
    pairwise_order_targets,
    random_reorder,
)
from data.mfm import MfmDataset, clip_frame_mask, mfm_collate, segment_frame_masks
from data.mlm import VideoMlmDataset, context_text, mlm_collate, mlm_row, random_word
from data.vsm import VsmDataset, build_queries, sample_queries, vsm_collate

D = 4352
MASK, CLS, SEP = 50264, 0, 2
V_RANGE = [4, 50261]


def _feats(n, start=0.0):
    """(n, D) features whose row t is filled with ``start + t``."""
    return (torch.arange(n, dtype=torch.float32) + start).unsqueeze(1).repeat(1, D)


def _script(monkeypatch, randoms=(), randranges=(), choices=(), shuffles=(), samples=()):
    """Replace the ``random`` functions the datasets call by scripted answers."""
    it_random, it_range = iter(randoms), iter(randranges)
    it_choice, it_shuffle, it_sample = iter(choices), iter(shuffles), iter(samples)
    monkeypatch.setattr(random, "random", lambda: next(it_random))
    monkeypatch.setattr(random, "randrange", lambda *a: next(it_range))
    monkeypatch.setattr(random, "choice", lambda seq: seq[next(it_choice)])

    def shuffle(lst):
        lst[:] = [lst[i] for i in next(it_shuffle)]

    monkeypatch.setattr(random, "shuffle", shuffle)
    monkeypatch.setattr(random, "sample", lambda pop, k: [pop[i] for i in next(it_sample)])


# ---------------------------------------------------------------------------------------------
# MLM
# ---------------------------------------------------------------------------------------------
def test_random_word_80_10_10_from_scripted_draws(monkeypatch):
    # u/p: .333 -> MASK, keep (u >= p), .867 -> random id, .933 -> kept but labelled, keep
    _script(monkeypatch, randoms=[0.05, 0.5, 0.13, 0.14, 0.9], randranges=[777])
    tokens, labels = random_word([10, 11, 12, 13, 14], V_RANGE, MASK)
    assert tokens == [MASK, 11, 777, 13, 14]
    assert labels == [10, -1, 12, 13, -1]


def test_random_word_forces_first_token_when_none_selected(monkeypatch):
    _script(monkeypatch, randoms=[0.5, 0.2, 0.99])
    tokens, labels = random_word([10, 11, 12], V_RANGE, MASK)
    assert tokens == [MASK, 11, 12]
    assert labels == [10, -1, -1]


def test_random_word_rejects_empty_text():
    with pytest.raises(ValueError, match="empty"):
        random_word([], V_RANGE, MASK)


def test_random_word_statistics_and_random_id_range():
    random.seed(1234)
    n = 60000
    tokens, labels = random_word([100] * n, [4, 8], MASK)
    selected = [i for i, lab in enumerate(labels) if lab != -1]
    assert all(labels[i] == 100 for i in selected)
    assert abs(len(selected) / n - 0.15) < 0.01
    masked = sum(tokens[i] == MASK for i in selected) / len(selected)
    replaced = [tokens[i] for i in selected if tokens[i] not in (MASK, 100)]
    kept = sum(tokens[i] == 100 for i in selected) / len(selected)
    assert abs(masked - 0.8) < 0.02
    assert abs(len(replaced) / len(selected) - 0.1) < 0.015
    assert abs(kept - 0.1) < 0.015
    assert set(replaced) == {4, 5, 6, 7}  # half-open [v_range[0], v_range[1])
    assert all(tokens[i] == 100 for i, lab in enumerate(labels) if lab == -1)


def test_context_text_truncates_each_subtitle_and_drops():
    sub_ids = [[1, 2, 3], [4, 5, 6], [7]]
    assert context_text(sub_ids, 1, 1, 2) == [1, 2, 4, 5]
    assert context_text(sub_ids, 0, 1, 2) == [1, 2]
    assert context_text(sub_ids, 2, 2, 60) == [1, 2, 3, 4, 5, 6, 7]
    assert context_text(sub_ids, 2, 2, 60, drop={1}) == [1, 2, 3, 7]
    assert context_text(sub_ids, 1, 0, 60, drop={1}) == []


def test_mlm_row_with_frames_and_with_dummy_frame(monkeypatch):
    _script(monkeypatch, randoms=[0.5, 0.01, 0.5, 0.5])
    ids, feats, mask, tgt, labels = mlm_row([20, 21], _feats(2, 5), CLS, V_RANGE, MASK)
    assert ids.tolist() == [CLS, 20, MASK]
    assert labels.tolist() == [-1, -1, 21]
    assert feats[:, 0].tolist() == [5, 6]
    assert mask.tolist() == [1] * 5
    assert tgt.tolist() == [False, False, False, False, True]
    ids, feats, mask, tgt, labels = mlm_row([30, 31], torch.zeros(0, D), CLS, V_RANGE, MASK)
    assert ids.tolist() == [CLS, MASK, 31]  # nothing drawn: first token forced
    assert feats.shape == (1, D) and feats.abs().sum() == 0
    assert mask.tolist() == [0, 1, 1, 1]
    assert tgt.tolist() == [False, False, True, False]


def _mlm_rows():
    torch.manual_seed(0)
    row_a = (torch.tensor([CLS, MASK, 11]), _feats(2), torch.ones(5, dtype=torch.long),
             torch.tensor([False, False, False, True, False]), torch.tensor([-1, 10, -1]))
    row_b = (torch.tensor([CLS, 20, MASK, 22, 777]), torch.zeros(1, D),
             torch.tensor([0, 1, 1, 1, 1, 1]),
             torch.tensor([False, False, False, True, False, True]),
             torch.tensor([-1, -1, 21, -1, 23]))
    row_c = (torch.tensor([CLS, MASK]), _feats(3, 10), torch.ones(5, dtype=torch.long),
             torch.tensor([False, False, False, False, True]), torch.tensor([-1, 30]))
    return [[row_a, row_b], [row_c]]


def test_mlm_collate_keys_shapes_and_label_order():
    b = mlm_collate(_mlm_rows())
    assert b["input_ids"].tolist() == [[CLS, MASK, 11, 1, 1], [CLS, 20, MASK, 22, 777],
                                       [CLS, MASK, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert b["v_feat"].shape == (3, 3, D) and b["v_feat"].dtype == torch.float32
    assert b["v_feat"][:, :, 0].tolist() == [[0, 1, 0], [0, 0, 0], [10, 11, 12]]
    assert b["attn_masks"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1],
                                        [1, 1, 1, 1, 1, 0]]
    assert b["txt_mask_tgt"].dtype == torch.bool and b["txt_mask_tgt"].shape == (3, 6)
    assert b["txt_labels"].tolist() == [10, 21, 23, 30]
    for key in ("input_ids", "position_ids", "attn_masks", "gather_index", "txt_labels"):
        assert b[key].dtype == torch.int64, key
    # Model side: gather [frames, text] and select with txt_mask_tgt -> the labelled tokens
    seq = torch.cat([b["v_feat"][:, :, 0] + 1000, b["input_ids"].float()], dim=1)
    compact = torch.gather(seq, 1, b["gather_index"])
    assert compact[b["txt_mask_tgt"]].tolist() == [MASK, MASK, 777, MASK]
    assert compact[0, :5].tolist() == [1000, 1001, CLS, MASK, 11]


# ---------------------------------------------------------------------------------------------
# MFM
# ---------------------------------------------------------------------------------------------
def test_clip_frame_mask_forces_one_frame(monkeypatch):
    _script(monkeypatch, randoms=[0.5, 0.3, 0.9, 0.2, 0.1, 0.14, 0.16], choices=[2])
    assert clip_frame_mask(4) == [False, False, True, False]  # nothing drawn: choice -> 2
    assert clip_frame_mask(3) == [True, True, False]


def test_segment_frame_masks_and_out_of_range_error():
    masks = segment_frame_masks([False, True, True, False], [(0, [0, 1]), (1, []), (2, [3])])
    assert [m.tolist() for m in masks] == [[False, True], [False], [False]]
    with pytest.raises(IndexError, match="vid_x"):
        segment_frame_masks([True, False], [(0, [1, 2])], "vid_x")


def _mfm_inputs():
    clip_a, clip_b = _feats(3, 1), _feats(2, 10)
    video_a = ([torch.tensor([SEP, 5]), torch.tensor([SEP])], [clip_a[[0, 2]], torch.zeros(1, D)],
               [torch.ones(4, dtype=torch.long), torch.tensor([0, 1])],
               clip_a, torch.ones(3, dtype=torch.long), 2, [(0, [0, 2]), (1, [])])
    video_b = ([torch.tensor([SEP, 6, 7])], [clip_b], [torch.ones(5, dtype=torch.long)],
               clip_b, torch.ones(2, dtype=torch.long), 1, [(0, [0, 1])])
    mask_a = torch.tensor([False, True, True])
    mask_b = torch.tensor([True, False])
    return [(video_a, segment_frame_masks(mask_a.tolist(), video_a[6]), mask_a),
            (video_b, segment_frame_masks(mask_b.tolist(), video_b[6]), mask_b)]


def test_mfm_collate_masks_targets_and_zeroing():
    b = mfm_collate(_mfm_inputs())
    assert b["f_v_masks"].tolist() == [[False, True], [False, False], [True, False]]
    assert b["c_v_masks"].tolist() == [[False, True, True], [True, False, False]]
    assert b["f_v_masks"].dtype == torch.bool and b["c_v_masks"].dtype == torch.bool
    # unmasked clip features of the masked frames, (video, frame) row-major
    assert b["feat_targets"].shape == (3, D) and b["feat_targets"].dtype == torch.float32
    assert b["feat_targets"][:, 0].tolist() == [2, 3, 10]
    assert b["c_v_feats"][:, :, 0].tolist() == [[1, 0, 0], [0, 11, 0]]
    assert b["f_v_feats"][:, :, 0].tolist() == [[1, 0], [0, 0], [0, 11]]
    assert b["c_v_feats"].abs().sum(-1)[1, 0] == 0  # every column zeroed, not just the first
    assert b["f_sub_input_ids"].tolist() == [[SEP, 5, 1], [SEP, 1, 1], [SEP, 6, 7]]


# ---------------------------------------------------------------------------------------------
# FOM
# ---------------------------------------------------------------------------------------------
def test_random_reorder_from_scripted_draws(monkeypatch):
    # positions 0, 2, 4 selected; shuffle gives [4, 0, 2]
    _script(monkeypatch, randoms=[0.1, 0.5, 0.1, 0.5, 0.1, 0.5], shuffles=[[2, 0, 1]])
    order, target = random_reorder(6)
    assert order == [4, 1, 0, 3, 2, 5]
    assert target == [2, -1, 4, -1, 0, -1]


def test_random_reorder_is_consistent_with_the_model_scatter():
    random.seed(7)
    for n in (1, 5, 40, 100):
        order, target = random_reorder(n)
        assert sorted(order) == list(range(n))
        shuffled = [None] * n
        for i, slot in enumerate(order):  # X_shuf[order[i]] = X[i]
            shuffled[slot] = i
        for slot, tgt in enumerate(target):
            assert tgt == -1 or shuffled[slot] == tgt
            assert tgt != -1 or order[slot] == slot
    random.seed(3)
    labelled = sum(t != -1 for _ in range(200) for t in random_reorder(100)[1])
    assert abs(labelled / 20000 - 0.15) < 0.01


def test_pairwise_order_targets_by_hand():
    idx, binary = pairwise_order_targets([[2, -1, 4, -1, 0, -1], [1, 0]], 8)
    assert idx.tolist() == [0, 2, 2, 0, 0, 4, 4, 0, 2, 4, 4, 2, 8, 9, 9, 8]
    assert binary.tolist() == [1, 0, 0, 1, 0, 1, 0, 1]
    idx, binary = pairwise_order_targets([[-1, -1]], 2)
    assert idx.dtype == torch.int64 and idx.numel() == 0 and binary.numel() == 0


def _video(n, start=0.0):
    clip = _feats(n, start)
    return ([torch.tensor([SEP, 9])], [clip], [torch.ones(n + 2, dtype=torch.long)], clip,
            torch.ones(n, dtype=torch.long), 1, [(0, list(range(n)))])


def test_fom_collate_pads_identity_and_minus_one():
    b = fom_collate([(_video(3), [1, 0, 2], [1, 0, -1]), (_video(5), [0, 1, 2, 4, 3],
                                                           [-1, -1, -1, 4, 3])])
    assert b["shuffled_orders"].tolist() == [[1, 0, 2, 3, 4], [0, 1, 2, 4, 3]]
    assert b["targets"].tolist() == [[1, 0, -1, -1, -1], [-1, -1, -1, 4, 3]]
    assert b["reordered_frame_idx"].tolist() == [0, 1, 1, 0, 8, 9, 9, 8]
    assert b["binary_targets"].tolist() == [0, 1, 0, 1]  # 1>0, then 4>3
    assert b["shuffled_orders"].dtype == torch.int64 and b["targets"].dtype == torch.int64
    assert b["c_v_feats"].shape == (2, 5, D)


# ---------------------------------------------------------------------------------------------
# VSM
# ---------------------------------------------------------------------------------------------
def test_sample_queries_only_frame_owners_in_subtitle_order(monkeypatch):
    pairs = [(0, [0]), (1, []), (2, [3, 4]), (3, [6])]
    _script(monkeypatch, samples=[[2, 0]])
    assert sample_queries(pairs) == [(0, [0]), (3, [6])]
    random.seed(0)
    monkeypatch.undo()
    assert sample_queries(pairs) == [(0, [0]), (2, [3, 4]), (3, [6])]  # min(5, 3) candidates


def test_build_queries_targets_truncation_and_padding():
    sub_ids = [[5, 6], [7], list(range(100, 180))]
    queries = build_queries([(0, [0]), (2, [3, 4, 5])], sub_ids, CLS, 10, "v1", 60)
    assert len(queries) == 5
    assert queries[0][0].tolist() == [CLS, 5, 6] and queries[0][1].tolist() == [1, 1, 1]
    assert queries[0][2] == "v1" and queries[0][3].tolist() == [0, 1]
    assert queries[1][0].tolist() == [CLS] + list(range(100, 160))
    assert queries[1][3].tolist() == [3, 5]
    for copy_ in queries[2:]:
        assert copy_[0].tolist() == queries[1][0].tolist()
        assert copy_[3].tolist() == [3, 5]
        assert copy_[0] is not queries[1][0]  # deep copies
    capped = build_queries([(0, [9])], sub_ids, CLS, 10, "v1", 60)
    assert capped[0][3].tolist() == [9, 9]
    with pytest.raises(ValueError, match="v9"):
        build_queries([], sub_ids, CLS, 10, "v9", 60)


def test_vsm_collate_keys_and_shapes():
    def queries(vid, lens):
        return [(torch.tensor([CLS] + [7] * n), torch.ones(n + 1, dtype=torch.long), vid,
                 torch.tensor([n, n + 1])) for n in lens]

    b = vsm_collate([(_video(3), "a", queries("a", [1, 2, 2, 2, 2])),
                     (_video(4), "b", queries("b", [3, 1, 1, 1, 1]))])
    assert b["q_vidx"].tolist() == [0] * 5 + [1] * 5
    assert b["query_input_ids"].shape == (10, 4)
    assert b["query_input_ids"][0].tolist() == [CLS, 7, 1, 1]
    assert b["query_attn_masks"][0].tolist() == [1, 1, 0, 0]
    assert b["query_pos_ids"].tolist() == [[0, 1, 2, 3]]
    assert b["targets"].shape == (10, 2) and b["targets"].dtype == torch.int64
    assert b["targets"][5].tolist() == [3, 4]
    assert b["vids"] == ["a", "b"]
    assert b["c_v_feats"].shape == (2, 4, D) and b["num_subs"] == [1, 1]


# ---------------------------------------------------------------------------------------------
# datasets over real LMDBs
# ---------------------------------------------------------------------------------------------
META = {"BOS": 0, "CLS": CLS, "PAD": 1, "EOS": 2, "SEP": SEP, "UNK": 3, "MASK": MASK,
        "v_range": V_RANGE}
# vid -> (n_frames, subtitle tokens, unique_sub2frames)
VIDEOS = {
    "v_a": (6, [[11, 12], [13], [14, 15, 16]], [[0, [0, 1]], [1, []], [2, [2, 3, 4]]]),
    "v_b": (4, [[21], [22, 23]], [[0, [0]], [1, [1, 2, 3]]]),
    "v_c": (3, [[31, 32]], [[0, []]]),  # no subtitle owns a frame: VSM must drop it
}


@pytest.fixture(scope="module")
def vid_sub_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_dbs")
    sub_dir, img_dir = root / "tv_subtitles.db", root / "tv"
    with TxtLmdbWriter(str(sub_dir)) as writer:
        for vid, (n, toks, s2f) in VIDEOS.items():
            owned = {f for _, frames in s2f for f in frames}
            writer[vid] = {"vid_name": vid, "input_ids": toks, "unique_sub2frames": s2f,
                           "sub2frames": s2f, "duration": n, "v_id": vid,
                           "unmatched_frames": [t for t in range(n) if t not in owned]}
    write_meta(str(sub_dir), META)
    write_json(str(sub_dir / "vid2len.json"), {v: spec[0] for v, spec in VIDEOS.items()})
    write_json(str(sub_dir / "vid2max_frame_sub_len.json"), {v: 5 for v in VIDEOS})
    img_dir.mkdir()
    with VideoLmdbWriter(str(img_dir / "resnet_slowfast_1.5")) as writer:
        for i, (vid, (n, _, _)) in enumerate(VIDEOS.items()):
            writer[vid] = _feats(n, 100 * i).numpy().astype(np.float32)
    write_json(str(img_dir / "id2nframe.json"), {v: spec[0] for v, spec in VIDEOS.items()})
    opts = SimpleNamespace(max_clip_len=100, sub_ctx_len=0, vfeat_version="resnet_slowfast",
                           compressed_db=False, task="pretrain")
    return load_video_sub_dataset(str(img_dir), str(sub_dir), 1.5, opts)


def test_mlm_dataset_rows_on_lmdb(vid_sub_db):
    random.seed(5)
    ds = VideoMlmDataset(["v_a", "v_b"], vid_sub_db, 0.15)
    assert len(ds) == 2
    rows = ds[0]
    assert len(rows) == 3
    for (ids, feats, mask, tgt, labels), orig, nf in zip(rows, VIDEOS["v_a"][1], [2, 0, 3]):
        assert ids[0].item() == CLS and len(ids) == len(orig) + 1
        unmasked = [i.item() if lab == -1 else lab.item() for i, lab in zip(ids[1:], labels[1:])]
        assert unmasked == orig and (labels != -1).any()
        assert mask.tolist() == ([0] if nf == 0 else [1] * nf) + [1] * len(ids)
        assert tgt[:max(nf, 1)].sum() == 0 and feats.shape == (max(nf, 1), D)
    assert rows[2][1][:, 0].tolist() == [2, 3, 4]
    b = mlm_collate([ds[0], ds[1]])
    assert b["input_ids"].shape == (5, 4) and b["v_feat"].shape == (5, 3, D)
    assert b["txt_labels"].numel() == int(b["txt_mask_tgt"].sum())


def test_mlm_dataset_empty_subtitle_names_video(vid_sub_db, monkeypatch):
    ds = VideoMlmDataset(["v_b"], vid_sub_db)
    real_get = vid_sub_db.txt_db.__class__.__getitem__
    monkeypatch.setattr(vid_sub_db.txt_db.__class__, "__getitem__",
                        lambda self, k: {**real_get(self, k), "input_ids": [[], [22]]})
    with pytest.raises(ValueError, match="'v_b' subtitle 0"):
        ds[0]


def test_mfm_dataset_on_lmdb(vid_sub_db):
    random.seed(11)
    ds = MfmDataset(["v_a", "v_b"], vid_sub_db, 0.15)
    items = [ds[0], ds[1]]
    video, seg_masks, clip_mask = items[0]
    assert clip_mask.shape == (6,) and clip_mask.any()
    assert [m.tolist() for m in seg_masks] == [clip_mask[[0, 1]].tolist(), [False],
                                               clip_mask[[2, 3, 4]].tolist()]
    b = mfm_collate(items)
    assert b["feat_targets"].shape[0] == int(b["c_v_masks"].sum())
    expected = [100 * i + t for i, m in enumerate([items[0][2], items[1][2]])
                for t in range(len(m)) if m[t]]
    assert b["feat_targets"][:, 0].tolist() == expected


def test_fom_datasets_on_lmdb(vid_sub_db):
    random.seed(2)
    ds = FomDataset(["v_a", "v_b"], vid_sub_db, 0.5)
    video, order, target = ds[0]
    assert len(order) == 6 and sorted(order) == list(range(6))
    b = fom_collate([ds[0], ds[1]])
    assert b["shuffled_orders"].shape == (2, 6) and b["shuffled_orders"][1, 4:].tolist() == [4, 5]
    eval_ds = FomEvalDataset(["v_a", "v_b"], vid_sub_db, 0.5)
    assert eval_ds[1][0] == "v_b"
    b = fom_eval_collate([eval_ds[0], eval_ds[1]])
    assert b["vids"] == ["v_a", "v_b"] and b["targets"].shape == (2, 6)


def test_vsm_dataset_on_lmdb(vid_sub_db, caplog):
    with caplog.at_level(logging.WARNING, logger="data.vsm"):
        ds = VsmDataset(["v_a", "v_b", "v_c"], vid_sub_db)
    assert ds.ids == ["v_a", "v_b"]
    assert "dropped 1 of 3" in caplog.text and "v_c" in caplog.text
    video, vid, queries = ds[0]
    assert vid == "v_a" and len(queries) == 5
    # both frame-owning subtitles (0 and 2) are queries: their text is removed everywhere
    assert [t.tolist() for t in video[0]] == [[SEP], [SEP, 13], [SEP]]
    assert [q[0].tolist() for q in queries] == [[CLS, 11, 12]] + [[CLS, 14, 15, 16]] * 4
    assert [q[3].tolist() for q in queries] == [[0, 1]] + [[2, 4]] * 4
    assert [m.tolist() for m in video[2]] == [[1, 1, 1], [0, 1, 1], [1, 1, 1, 1]]
    assert video[5] == 3 and video[6] == [(0, [0, 1]), (1, []), (2, [2, 3, 4])]
    b = vsm_collate([ds[0], ds[1]])
    assert b["q_vidx"].tolist() == [0] * 5 + [1] * 5 and b["targets"].shape == (10, 2)
    assert b["targets"][5:].tolist() == [[0, 1]] + [[1, 3]] * 4


def test_datasets_shard_by_rank(vid_sub_db, monkeypatch):
    import utils.distributed as dist_utils
    monkeypatch.setattr(dist_utils, "get_rank", lambda: 1)
    monkeypatch.setattr(dist_utils, "get_world_size", lambda: 2)
    vids = ["v_a", "v_b", "v_c", "v_a"]
    for cls in (VideoMlmDataset, MfmDataset, FomDataset, FomEvalDataset, VsmDataset):
        assert cls(vids, vid_sub_db).ids == ["v_b", "v_a"], cls.__name__

"""Video item assembly, video_collate and span helpers (data.md §7, §8, pitfall 5)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.data import (
    VideoFeatDataset,
    VideoFeatSubTokDataset,
    _video_reader,
    exclusive_span,
    inclusive_span,
    load_video_only_dataset,
    load_video_sub_dataset,
    segment_frames,
    ts_string_span,
    txt_input_collate,
    video_collate,
    vsm_span,
)
from data.db import TxtLmdbWriter, VideoLmdbWriter, write_json, write_jsonl, write_meta
from data.txt_db import SubTokLmdb
from data.video_db import VideoFeatLmdb

D = 4352
META = {"BOS": 0, "CLS": 0, "PAD": 1, "EOS": 2, "SEP": 2, "UNK": 3, "MASK": 50264,
        "v_range": [4, 50261]}
# vA is the worked example of data.md §5.3/§7 (fl 1.5, N 10); vB has a frame-less subtitle;
# vC has no subtitle (one pseudo-subtitle block of empty text).
SUBS = {
    "vA": ([[11], [21, 22], [31], [41, 42, 43]],
           [[0, [0]], [1, [1, 2]], [2, [3, 4, 5]], [3, [8]]], [6, 7, 9], 10),
    "vB": ([[51, 52], [61]], [[0, [0, 1]], [1, []]], [2, 3], 4),
    "vC": ([[]], [[0, [0, 1, 2]]], [], 3),
}
CODE = {"vA": 100, "vB": 200, "vC": 300, "vD": 400}


# ---------------------------------------------------------------------------------------------
# builders of small real databases, written with the project's writers (shared with
# test_data_vcmr.py)
# ---------------------------------------------------------------------------------------------
def video_feats(vid, n):
    """(n, D) float32 array whose row t is filled with ``CODE[vid] + t``."""
    rows = np.arange(n, dtype=np.float32) + CODE[vid]
    return np.repeat(rows[:, None], D, axis=1)


def build_video_db(root, id2nframe, stored=None, interval=1.5):
    """``{root}/video`` with id2nframe.json and ``resnet_slowfast_{interval}``."""
    img_dir = os.path.join(root, "video")
    os.makedirs(img_dir)
    write_json(os.path.join(img_dir, "id2nframe.json"), id2nframe)
    stored = stored or id2nframe
    with VideoLmdbWriter(os.path.join(img_dir, f"resnet_slowfast_{interval}")) as writer:
        for vid, n in stored.items():
            writer[vid] = video_feats(vid, n)
    return img_dir


def build_sub_db(root, subs=SUBS, vid2dur_idx=None):
    """A subtitle DB with the fields SubTokLmdb reads (data.md §3.6)."""
    db_dir = os.path.join(root, "sub.db")
    with TxtLmdbWriter(db_dir) as writer:
        for vid, (ids, u_s2f, unmatched, n) in subs.items():
            writer[vid] = {"vid_name": vid, "v_id": vid, "input_ids": ids,
                           "unique_sub2frames": u_s2f, "sub2frames": u_s2f,
                           "unmatched_frames": unmatched, "duration": n}
    write_meta(db_dir, META)
    write_json(os.path.join(db_dir, "vid2len.json"), {v: s[3] for v, s in subs.items()})
    write_json(os.path.join(db_dir, "vid2max_frame_sub_len.json"), {v: 10 for v in subs})
    if vid2dur_idx is not None:
        write_json(os.path.join(db_dir, "vid2dur_idx.json"), vid2dur_idx)
    return db_dir


def build_query_db(root, name, queries, query2video=True, video_ids=None):
    """A query DB as prepro_query writes it; ``queries`` = raw lines plus ``input_ids``."""
    db_dir = os.path.join(root, name)
    with TxtLmdbWriter(db_dir) as writer:
        for q in queries:
            rec = dict(q, qid=str(q["desc_id"]), target=q.get("ts"))
            if "vid_name" in q:
                rec["vid"] = q["vid_name"]
            writer[str(q["desc_id"])] = rec
    write_meta(db_dir, META)
    write_json(os.path.join(db_dir, "id2len.json"),
               {str(q["desc_id"]): len(q["input_ids"]) for q in queries})
    if query2video:
        write_json(os.path.join(db_dir, "query2video.json"),
                   {str(q["desc_id"]): q["vid_name"] for q in queries if "vid_name" in q})
    if video_ids is not None:
        write_json(os.path.join(db_dir, "video_ids.json"), video_ids)
    write_jsonl(os.path.join(db_dir, "query_data.jsonl"),
                [{k: v for k, v in q.items() if k != "input_ids"} for q in queries])
    return db_dir


def opts(**kw):
    base = dict(vfeat_version="resnet_slowfast", compressed_db=False, max_clip_len=100,
                sub_ctx_len=0, task="tvr")
    return SimpleNamespace(**dict(base, **kw))


@pytest.fixture
def tv_dbs(tmp_path):
    """(video dir, subtitle dir) for vA, vB, vC with matching frame counts."""
    img_dir = build_video_db(str(tmp_path), {"vA": 10, "vB": 4, "vC": 3})
    return img_dir, build_sub_db(str(tmp_path))


def _feats(n, start=0.0):
    """(n, D) features whose row t is filled with the value ``start + t``."""
    return (torch.arange(n, dtype=torch.float32) + start).unsqueeze(1).repeat(1, D)


def _hand_batch():
    """Two videos: A (3 frames, K=2, second segment frame-less), B (4 frames, K=1)."""
    clip_a, clip_b = _feats(3), _feats(4, start=10)
    video_a = ([torch.tensor([2, 10, 11]), torch.tensor([2])],
               [clip_a[[0, 1]], torch.zeros(1, D)],
               [torch.ones(5, dtype=torch.long), torch.tensor([0, 1])],
               clip_a, torch.ones(3, dtype=torch.long), 2, [(0, [0, 1]), (1, [])])
    video_b = ([torch.tensor([2, 20, 21, 22, 23])], [clip_b[[0, 1, 2]]],
               [torch.ones(8, dtype=torch.long)],
               clip_b, torch.ones(4, dtype=torch.long), 1, [(0, [0, 1, 2])])
    return video_collate([video_a, video_b])


def test_video_collate_keys_shapes_padding():
    b = _hand_batch()
    assert b["f_sub_input_ids"].tolist() == [[2, 10, 11, 1, 1], [2, 1, 1, 1, 1],
                                             [2, 20, 21, 22, 23]]
    assert b["f_sub_pos_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert b["f_v_pos_ids"].tolist() == [[0, 1, 2]]
    assert b["f_v_feats"].shape == (3, 3, D) and b["f_v_feats"].dtype == torch.float32
    assert b["f_v_feats"][:, :, 0].tolist() == [[0, 1, 0], [0, 0, 0], [10, 11, 12]]
    assert b["f_attn_masks"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0],
                                          [1] * 8]
    assert b["f_sub_input_attn_masks"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert b["c_v_feats"].shape == (2, 4, D)
    assert b["c_v_feats"][:, :, 0].tolist() == [[0, 1, 2, 0], [10, 11, 12, 13]]
    assert b["c_attn_masks"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["c_pos_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert b["num_subs"] == [2, 1]
    assert b["sub_idx2frame_idx"] == [[(0, [0, 1]), (1, [])], [(0, [0, 1, 2])]]
    for key in ("f_sub_input_ids", "f_attn_masks", "f_gather_index", "c_attn_masks"):
        assert b[key].dtype == torch.int64, key


def test_gather_index_compacts_frames_then_text():
    b = _hand_batch()
    assert b["f_gather_index"].tolist() == [[0, 1, 3, 4, 5, 5, 6, 7],
                                            [0, 3, 2, 3, 4, 5, 6, 7],
                                            [0, 1, 2, 3, 4, 5, 6, 7]]
    # Model side: embed frames by their first feature value + 100, text by token id, concatenate
    # (frames first) and gather; the unmasked part must be [segment frames, segment text].
    frames = b["f_v_feats"][:, :, 0] + 100
    seq = torch.cat([frames, b["f_sub_input_ids"].float()], dim=1)
    compact = torch.gather(seq, 1, b["f_gather_index"])
    kept = [row[mask.bool()].tolist() for row, mask in zip(compact, b["f_attn_masks"])]
    assert kept == [[100, 101, 2, 10, 11], [2], [110, 111, 112, 2, 20, 21, 22, 23]]


def test_text_positions_clamped_at_511():
    long_text = torch.full((600,), 5, dtype=torch.long)
    video = ([long_text], [_feats(1)], [torch.ones(601, dtype=torch.long)], _feats(1),
             torch.ones(1, dtype=torch.long), 1, [(0, [0])])
    pos = video_collate([video])["f_sub_pos_ids"]
    assert pos.shape == (1, 600)
    assert pos[0, 510].item() == 510 and pos[0, 511].item() == 511 and pos[0, -1].item() == 511
    ids, pos, _ = txt_input_collate([long_text], [torch.ones(600, dtype=torch.long)])
    assert pos.max().item() == 511 and pos[0, 300].item() == 300


def test_txt_input_collate_pads_with_one_and_zero():
    ids, pos, masks = txt_input_collate([torch.tensor([5, 6, 7]), torch.tensor([8])],
                                        [torch.ones(3, dtype=torch.long),
                                         torch.ones(1, dtype=torch.long)])
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert pos.tolist() == [[0, 1, 2]]
    assert masks.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_inclusive_span_vcmr_convention():
    assert inclusive_span(0.862, 1.862, 1.5, 10) == (0, 1)
    assert inclusive_span(3.0, 3.5, 1.5, 10) == (2, 3)  # one frame widened to two
    assert inclusive_span(2.0, 5.5, 1.5, 10) == (1, 3)
    assert inclusive_span(14.0, 20.0, 1.5, 10) == (9, 9)  # both capped at n-1
    assert inclusive_span(16.0, 20.0, 1.5, 10) == (9, 9)


def test_exclusive_span_tvc_convention():
    assert exclusive_span(3.0, 4.6, 1.5, 10) == (2, 3)
    assert exclusive_span(3.0, 3.1, 1.5, 10) == (2, 3)  # at least one frame
    assert exclusive_span(0.0, 3.75, 1.5, 10) == (0, 2)  # round(2.5) == 2 (half to even)
    assert exclusive_span(0.0, 5.25, 1.5, 10) == (0, 4)  # round(3.5) == 4
    assert exclusive_span(20.0, 25.0, 1.5, 10) == (10, 10)  # starts after the clip: empty


def test_vsm_span_and_errors():
    assert vsm_span([3, 4, 5], 10) == (3, 5)
    assert vsm_span([7], 10) == (7, 8)
    assert vsm_span([9], 10) == (9, 9)
    with pytest.raises(ValueError, match="12"):
        vsm_span([12], 10)


def test_ts_string_span_failures_give_minus_one():
    assert ts_string_span("2.0-5.5", 1.5, 10) == (1, 3)
    assert ts_string_span("NaN-NaN", 1.5, 10) == (-1, -1)
    assert ts_string_span(None, 1.5, 10) == (-1, -1)
    assert ts_string_span("60.3", 1.5, 10) == (-1, -1)


def reference_segment_frames(clip_feats, frames, txt_len):
    """The plain per-segment definition: frames below n, else one masked zero row."""
    frames = [f for f in frames if f < clip_feats.size(0)]
    if not frames:
        mask = torch.ones(1 + txt_len, dtype=torch.long)
        mask[0] = 0
        return clip_feats.new_zeros(1, clip_feats.size(1)), mask
    return clip_feats[frames], torch.ones(len(frames) + txt_len, dtype=torch.long)


@pytest.mark.parametrize("seed", range(20))
def test_segment_frames_equals_per_segment_reference(seed):
    rng = np.random.default_rng(seed)
    n = seed % 11  # 0 (every segment empty) included
    dtype = (torch.float32, torch.float16)[seed % 2]
    clip = torch.from_numpy(rng.standard_normal((n, 5))).to(dtype)
    frame_lists = [rng.integers(0, 15, size=rng.integers(0, 6)).tolist()
                   for _ in range(rng.integers(0, 9))]
    txt_lens = rng.integers(1, 7, size=len(frame_lists)).tolist()
    feats, masks = segment_frames(clip, frame_lists, txt_lens)
    assert len(feats) == len(masks) == len(frame_lists)
    for frames, tl, f, m in zip(frame_lists, txt_lens, feats, masks):
        ref_f, ref_m = reference_segment_frames(clip, frames, tl)
        assert f.dtype == ref_f.dtype and m.dtype == ref_m.dtype
        assert torch.equal(f, ref_f) and torch.equal(m, ref_m)


# ---------------------------------------------------------------------------------------------
# VideoFeatSubTokDataset / VideoFeatDataset on real LMDBs
# ---------------------------------------------------------------------------------------------
def test_worked_example_segments(tv_dbs):
    ds = load_video_sub_dataset(*tv_dbs, 1.5, opts())
    assert ds.max_txt_len == 60 and ds.sub_ctx_len == 0 and ds.frame_interval == 1.5
    texts, feats, masks, clip, clip_mask, k, pairs = ds["vA"]
    assert [t.tolist() for t in texts] == [[2, 11], [2, 21, 22], [2, 31], [2, 41, 42, 43]]
    assert [f[:, 0].tolist() for f in feats] == [[100], [101, 102], [103, 104, 105], [108]]
    assert [m.tolist() for m in masks] == [[1] * 3, [1] * 5, [1] * 5, [1] * 5]
    assert clip.shape == (10, D) and clip.dtype == torch.float32
    assert clip[:, 0].tolist() == [100 + t for t in range(10)]  # unmatched 6, 7, 9 included
    assert clip_mask.tolist() == [1] * 10 and k == 4
    assert pairs == [(0, [0]), (1, [1, 2]), (2, [3, 4, 5]), (3, [8])]
    assert all(t.dtype == torch.int64 for t in texts + masks)


def test_sub_context_is_backward_only(tv_dbs):
    texts = load_video_sub_dataset(*tv_dbs, 1.5, opts(sub_ctx_len=1))["vA"][0]
    assert [t.tolist() for t in texts] == [[2, 11], [2, 11, 21, 22], [2, 21, 22, 31],
                                           [2, 31, 41, 42, 43]]


def test_frameless_subtitle_gets_masked_zero_row(tv_dbs):
    texts, feats, masks, clip, _, k, pairs = load_video_sub_dataset(*tv_dbs, 1.5, opts())["vB"]
    assert [t.tolist() for t in texts] == [[2, 51, 52], [2, 61]]
    assert feats[1].shape == (1, D) and feats[1].abs().sum().item() == 0
    assert [m.tolist() for m in masks] == [[1] * 5, [0, 1, 1]]
    assert k == 2 and pairs == [(0, [0, 1]), (1, [])]


def test_pseudo_subtitle_video(tv_dbs):
    texts, feats, masks, _, _, k, _ = load_video_sub_dataset(*tv_dbs, 1.5, opts())["vC"]
    assert [t.tolist() for t in texts] == [[2]] and k == 1
    assert feats[0][:, 0].tolist() == [300, 301, 302] and masks[0].tolist() == [1] * 4


def test_max_clip_len_truncates_subtitles_and_clip(tv_dbs):
    texts, feats, _, clip, clip_mask, k, pairs = load_video_sub_dataset(
        *tv_dbs, 1.5, opts(max_clip_len=5))["vA"]
    assert pairs == [(0, [0]), (1, [1, 2]), (2, [3, 4])] and k == 3
    assert feats[2][:, 0].tolist() == [103, 104]
    assert clip.shape == (5, D) and clip_mask.tolist() == [1] * 5


def test_max_clip_len_mismatch_raises(tv_dbs):
    img_db = VideoFeatLmdb(tv_dbs[0], "resnet_slowfast", 1.5, False, 100)
    with pytest.raises(ValueError, match="max_clip_len"):
        VideoFeatSubTokDataset(SubTokLmdb(tv_dbs[1], 50), img_db)


def test_fewer_video_frames_than_subtitle_grid(tmp_path):
    """Pitfall 10: the loader refuses; the raw dataset filters frames but returns raw pairs."""
    img_dir = build_video_db(str(tmp_path), {"vA": 8, "vB": 4, "vC": 3})
    sub_dir = build_sub_db(str(tmp_path))
    with pytest.raises(ValueError, match="id2nframe.json"):
        load_video_sub_dataset(img_dir, sub_dir, 1.5, opts())
    ds = VideoFeatSubTokDataset(SubTokLmdb(sub_dir, 100),
                                VideoFeatLmdb(img_dir, "resnet_slowfast", 1.5, False, 100))
    _, feats, masks, clip, _, _, pairs = ds["vA"]
    assert clip.shape == (8, D)
    assert feats[3].abs().sum().item() == 0 and masks[3].tolist() == [0, 1, 1, 1, 1]
    assert pairs[3] == (3, [8])


def test_video_only_dataset(tmp_path):
    img_dir = build_video_db(str(tmp_path), {"vB": 4, "vA": 10, "vC": 3})
    query_dir = build_query_db(str(tmp_path), "didemo_val.db",
                               [{"desc_id": 1, "vid_name": "vB", "input_ids": [5]}])
    ds = load_video_only_dataset(img_dir, query_dir, 1.5, opts(max_clip_len=5))
    assert isinstance(ds, VideoFeatDataset)
    assert ds.vids == ["vA", "vB", "vC"] and ds.vid2idx == {"vA": 0, "vB": 1, "vC": 2}
    assert ds.vid2dur == {"vB": 4, "vA": 10, "vC": 3}
    texts, feats, masks, clip, clip_mask, k, pairs = ds["vA"]
    assert [t.tolist() for t in texts] == [[0]] and k == 1  # CLS, not SEP
    assert feats[0][:, 0].tolist() == [100, 101, 102, 103, 104]
    assert masks[0].tolist() == [1] * 6 and clip_mask.tolist() == [1] * 5
    assert pairs == [(0, [0, 1, 2, 3, 4])]


def test_collate_real_items_through_dataloader(tv_dbs):
    ds = load_video_sub_dataset(*tv_dbs, 1.5, opts())
    loader = DataLoader(["vA", "vB"], batch_size=2, collate_fn=lambda vids: video_collate(
        [ds[v] for v in vids]))
    b = next(iter(loader))
    assert b["f_sub_input_ids"].shape == (6, 4) and b["f_v_feats"].shape == (6, 3, D)
    assert b["f_attn_masks"].shape == (6, 5) and b["c_v_feats"].shape == (2, 10, D)
    assert b["f_gather_index"][5].tolist() == [0, 3, 4, 3, 4]  # vB's frame-less segment
    assert b["f_attn_masks"][5].tolist() == [0, 1, 1, 0, 0]
    assert b["c_attn_masks"][1].tolist() == [1] * 4 + [0] * 6
    assert b["num_subs"] == [4, 2]


def test_pipeline_reader_refuses_features_that_are_not_4352_wide(tmp_path):
    root = tmp_path / "tv"
    root.mkdir()
    with VideoLmdbWriter(str(root / "resnet_slowfast_1.5"), compress=False) as writer:
        writer["v"] = np.zeros((3, 10), np.float32)
    write_json(str(root / "id2nframe.json"), {"v": 3})
    reader = _video_reader(str(root), 1.5, SimpleNamespace(max_clip_len=100))
    with pytest.raises(ValueError, match=r"resnet_slowfast_1.5\['v'\].*4352"):
        reader["v"]

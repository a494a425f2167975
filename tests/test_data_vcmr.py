"""VCMR / VR datasets and collates on real LMDBs (data.md §9.1, §9.2, §11.2)."""
from __future__ import annotations

import random

import pytest
import torch
from test_data_video import (
    build_query_db,
    build_sub_db,
    build_video_db,
    opts,
)
from torch.utils.data import DataLoader

import utils.distributed as dist_utils
from data.data import load_video_only_dataset, load_video_sub_dataset
from data.txt_db import QueryTokLmdb, VrQueryTokLmdb
from data.vcmr import (
    VcmrDataset,
    VcmrEvalDataset,
    VcmrFullEvalDataset,
    VcmrVideoOnlyDataset,
    VideoCorpusDataset,
    get_video_ids,
    split_video2idx,
    vcmr_collate,
    vcmr_eval_collate,
    vcmr_full_eval_collate,
    video_corpus_collate,
)
from data.vr import VrDataset, VrFullEvalDataset, VrVideoOnlyFullEvalDataset, vr_collate

# Targets by hand (fi 1.5): q1 vA n=10 [0.862, 1.862] -> (0, 1); q2 vB n=4 [3.0, 3.5] -> (2, 3);
# q3 vA [12, 13] -> (8, 9); q4 vC n=3 [0, 10] -> (0, 2) (end capped at n-1).
QUERIES = [
    {"desc_id": 1, "vid_name": "vA", "ts": [0.862, 1.862], "input_ids": [101, 102],
     "type": "v"},
    {"desc_id": 2, "vid_name": "vB", "ts": [3.0, 3.5], "input_ids": [103], "type": "t"},
    {"desc_id": 3, "vid_name": "vA", "ts": [12.0, 13.0], "input_ids": [104, 105, 106],
     "type": "vt"},
    {"desc_id": 4, "vid_name": "vC", "ts": [0.0, 10.0], "input_ids": [107], "type": "v"},
]
TARGETS = {"1": [0, 1], "2": [2, 3], "3": [8, 9], "4": [0, 2]}
VID2DUR_IDX = {"train": {"vA": [15.0, 7], "vB": [6.0, 3]}, "val": {"vC": [4.5, 11]}}


@pytest.fixture
def dbs(tmp_path):
    root = str(tmp_path)
    img_dir = build_video_db(root, {"vA": 10, "vB": 4, "vC": 3, "vD": 5})
    sub_dir = build_sub_db(root, vid2dur_idx=VID2DUR_IDX)
    query_dir = build_query_db(root, "tvr_train.db", QUERIES)
    video_db = load_video_sub_dataset(img_dir, sub_dir, 1.5, opts())
    return {"root": root, "img_dir": img_dir, "video_db": video_db, "query_dir": query_dir,
            "query_db": QueryTokLmdb(query_dir, -1)}


def _set_rank(monkeypatch, rank, world):
    monkeypatch.setattr(dist_utils, "get_rank", lambda: rank)
    monkeypatch.setattr(dist_utils, "get_world_size", lambda: world)


def test_vcmr_items_and_targets(dbs):
    ds = VcmrDataset(get_video_ids(dbs["query_dir"]), dbs["video_db"], dbs["query_db"])
    assert len(ds) == 4 and ds.qids == ["1", "2", "3", "4"]
    video_inputs, vid, queries = ds[0]
    assert vid == "vA" and video_inputs[5] == 4 and len(queries) == 1
    ids, mask, qvid, target = queries[0]
    assert ids.tolist() == [0, 101, 102] and mask.tolist() == [1, 1, 1] and qvid == "vA"
    assert ids.dtype == target.dtype == torch.int64
    assert {ds.qids[i]: ds[i][2][0][3].tolist() for i in range(4)} == TARGETS


def test_vcmr_collate_duplicates_and_q_vidx(dbs):
    ds = VcmrDataset(get_video_ids(dbs["query_dir"]), dbs["video_db"], dbs["query_db"])
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=vcmr_collate)))
    assert batch["vids"] == ["vA", "vB", "vA"]  # same video twice in one batch
    assert batch["q_vidx"].tolist() == [2, 1, 2]  # points to the last copy (pitfall 13)
    assert batch["num_subs"] == [4, 2, 4] and batch["c_v_feats"].shape[:2] == (3, 10)
    assert batch["query_input_ids"].tolist() == [[0, 101, 102, 1], [0, 103, 1, 1],
                                                 [0, 104, 105, 106]]
    assert batch["query_pos_ids"].tolist() == [[0, 1, 2, 3]]
    assert batch["query_attn_masks"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["targets"].tolist() == [[0, 1], [2, 3], [8, 9]]
    assert batch["f_sub_input_ids"].shape[0] == 10


def test_length_filter_keeps_order(dbs):
    ds = VcmrDataset([], dbs["video_db"], QueryTokLmdb(dbs["query_dir"], 2))
    assert ds.qids == ["1", "2", "4"]


def test_video_index_from_vid2dur_idx(dbs):
    ds = VcmrDataset(get_video_ids(dbs["query_dir"]), dbs["video_db"], dbs["query_db"])
    assert ds.vid2idx == {"train": {"vA": 7, "vB": 3}, "val": {"vC": 11}}
    assert split_video2idx(ds.vid2idx, "val") == {"vC": 11}
    assert ds.vid2dur["val"] == [{"vid_name": "vC", "duration": 4.5}]


def test_video_index_from_sorted_names_without_vid2dur_idx(tmp_path):
    root = str(tmp_path)
    img_dir = build_video_db(root, {"vD": 5, "vC": 3, "vA": 10, "vB": 4})
    video_db = load_video_sub_dataset(img_dir, build_sub_db(root), 1.5, opts())
    query_dir = build_query_db(root, "didemo_val.db", [QUERIES[0], QUERIES[3]])
    ds = VcmrDataset(get_video_ids(query_dir), video_db, QueryTokLmdb(query_dir))
    assert ds.vid2idx == {"vA": 0, "vC": 2}  # global sorted index, split's videos only
    assert ds.vid2dur == {"vD": 5, "vC": 3, "vA": 10, "vB": 4}
    assert split_video2idx(ds.vid2idx, "val") == {"vA": 0, "vC": 2}


def test_missing_video_raises_with_query_ids(dbs):
    query_dir = build_query_db(dbs["root"], "bad.db", QUERIES + [
        {"desc_id": 5, "vid_name": "vZ", "ts": [0, 1], "input_ids": [9]}])
    with pytest.raises(KeyError, match=r"'5', 'vZ'"):
        VcmrDataset([], dbs["video_db"], QueryTokLmdb(query_dir))
    # vD has features but no subtitle record
    query_dir = build_query_db(dbs["root"], "bad2.db", [
        {"desc_id": 6, "vid_name": "vD", "ts": [0, 1], "input_ids": [9]}])
    with pytest.raises(KeyError, match="subtitle DB"):
        VcmrDataset([], dbs["video_db"], QueryTokLmdb(query_dir))


def test_sharding_two_ranks_cover_every_query_once(dbs, monkeypatch):
    shards = {}
    for rank in (0, 1):
        _set_rank(monkeypatch, rank, 2)
        shards[rank] = VcmrDataset([], dbs["video_db"], dbs["query_db"]).qids
        full = VcmrFullEvalDataset([], dbs["video_db"], dbs["query_db"])
        assert full.qids == ["1", "2", "3", "4"]  # full eval shards only if distributed
        shards[f"full{rank}"] = VcmrFullEvalDataset([], dbs["video_db"], dbs["query_db"],
                                                    distributed=True).qids
    assert shards[0] == ["1", "3"] and shards[1] == ["2", "4"]
    assert shards["full0"] == ["1", "3"] and shards["full1"] == ["2", "4"]


def test_eval_dataset_adds_qids(dbs):
    ds = VcmrEvalDataset([], dbs["video_db"], dbs["query_db"])
    qids, item = ds[1]
    assert qids == ["2"] and item[1] == "vB"
    batch = vcmr_eval_collate([ds[0], ds[1]])
    assert batch["qids"] == ["1", "2"] and batch["q_vidx"].tolist() == [0, 1]


def test_sampled_by_video_tops_up_to_max_num_query(dbs):
    ds = VcmrDataset(get_video_ids(dbs["query_dir"]), dbs["video_db"], dbs["query_db"],
                     max_num_query=5, sampled_by_q=False)
    assert ds.vids == ["vA", "vB", "vC"] and len(ds) == 3
    batch = vcmr_collate([ds[0]])
    assert batch["query_input_ids"][:2, 1].tolist() == [101, 104]  # own queries first
    assert batch["q_vidx"].tolist() == [0] * 5 and batch["targets"].shape == (5, 2)
    assert set(batch["query_input_ids"][:, 1].tolist()) <= {101, 104}


def test_sampled_by_video_top_up_draws_without_replacement(dbs, tmp_path):
    """3 own queries, 5 slots: the 2 extra ones are a ``random.sample`` (never a repeat)."""
    extra = dict(QUERIES[0], desc_id=5, input_ids=[108])
    query_dir = build_query_db(str(tmp_path), "tvr_more.db", QUERIES + [extra])
    ds = VcmrDataset(["vA"], dbs["video_db"], QueryTokLmdb(query_dir, -1), max_num_query=5,
                     sampled_by_q=False)
    for seed in range(30):
        random.seed(seed)
        vid, qids = ds.getids(0)
        assert vid == "vA" and qids[:3] == ["1", "3", "5"]
        assert len(set(qids[3:])) == 2 and set(qids[3:]) <= {"1", "3", "5"}


def test_full_eval_items_and_collate(dbs):
    ds = VcmrFullEvalDataset([], dbs["video_db"], dbs["query_db"])
    qid, queries = ds[3]
    assert qid == "4" and queries[0][2] == "vC" and queries[0][3].tolist() == [0, 2]
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=vcmr_full_eval_collate)))
    assert set(batch) == {"query_input_ids", "query_pos_ids", "query_attn_masks", "targets",
                          "vids", "qids"}
    assert batch["qids"] == ["1", "2", "3", "4"]
    assert batch["vids"] == ["vA", "vB", "vA", "vC"]
    assert batch["targets"].tolist() == [TARGETS[q] for q in batch["qids"]]
    assert batch["query_input_ids"][3].tolist() == [0, 107, 1, 1]


def test_full_eval_test_split_without_query2video(dbs):
    """Pitfall 27: an empty query2video.json gives vid -1 / target -1 and video_ids.json."""
    lines = [{"desc_id": 8, "desc": "x", "input_ids": [7, 8]},
             {"desc_id": 9, "desc": "y", "input_ids": [9]}]
    query_dir = build_query_db(dbs["root"], "tvr_test_public.db", lines,
                               video_ids=["vC", "vA"])
    assert get_video_ids(query_dir) == ["vC", "vA"]
    ds = VcmrFullEvalDataset(get_video_ids(query_dir), dbs["video_db"],
                             QueryTokLmdb(query_dir))
    batch = vcmr_full_eval_collate([ds[0], ds[1]])
    assert batch["vids"] == [-1, -1] and batch["targets"].tolist() == [[-1, -1], [-1, -1]]
    assert batch["query_input_ids"].tolist() == [[0, 7, 8], [0, 9, 1]]


def test_video_corpus_in_sorted_order(dbs):
    ds = VideoCorpusDataset(["vC", "vA", "vB"], dbs["video_db"])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=video_corpus_collate)))
    assert batch["vids"] == ["vA", "vB"] and batch["num_subs"] == [4, 2]
    assert batch["c_attn_masks"].sum(1).tolist() == [10, 4]
    assert len(ds) == 3 and ds[2][0] == "vC"


def test_didemo_video_only(dbs):
    video_db = load_video_only_dataset(dbs["img_dir"], dbs["query_dir"], 1.5,
                                       opts(max_clip_len=20))
    ds = VcmrVideoOnlyDataset(get_video_ids(dbs["query_dir"]), video_db, dbs["query_db"])
    assert ds.vid2idx == {"vA": 0, "vB": 1, "vC": 2}
    batch = vcmr_collate([ds[1]])
    assert batch["f_sub_input_ids"].tolist() == [[0]] and batch["num_subs"] == [1]
    assert batch["f_v_feats"].shape == (1, 4, 4352) and batch["targets"].tolist() == [[2, 3]]
    with pytest.raises(TypeError, match="VideoFeatDataset"):
        VcmrVideoOnlyDataset([], dbs["video_db"], dbs["query_db"])


def test_vr_targets_and_index(dbs):
    lines = [{"desc_id": 1, "sen_id": 1, "vid_name": "vB", "ts": [0.0, 3.0], "input_ids": [5]},
             {"desc_id": 2, "retrieval_key": "k2", "vid_name": "vA", "input_ids": [6, 7]}]
    query_dir = build_query_db(dbs["root"], "msrvtt_val.db", lines)
    query_db = VrQueryTokLmdb(query_dir)
    video_ids = get_video_ids(query_dir)
    ds = VrDataset(video_ids, dbs["video_db"], query_db)
    assert ds.vid2idx == {"vB": 1, "vA": 0}  # sorted names, not vid2dur_idx.json
    batch = vr_collate([ds[0], ds[1]])
    assert batch["targets"].tolist() == [[-1, -1], [-1, -1]]
    assert batch["q_vidx"].tolist() == [0, 1] and batch["vids"] == ["vB", "vA"]
    full = VrFullEvalDataset(video_ids, dbs["video_db"], query_db)
    assert full[0][1][0][3].tolist() == [-1, -1]
    with pytest.raises(TypeError):
        VrVideoOnlyFullEvalDataset(video_ids, dbs["video_db"], query_db)

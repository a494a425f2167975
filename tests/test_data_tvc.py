"""TVC datasets and collates on small real LMDBs (data.md §3.5, §6.1, §9.5)."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from test_data_video import META, build_sub_db, build_video_db, opts
from torch.utils.data import DataLoader

import utils.distributed as dist_utils
from data.data import load_video_sub_dataset
from data.db import TxtLmdbWriter, write_json, write_meta
from data.tvc import TvcEvalDataset, TvcTrainDataset, TvcValDataset
from data.txt_db import CaptionTokLmdb

# desc_id -> (vid, clip_id, ts seconds, tokens, text); vA has 10 frames, vB 4 (fi 1.5)
CAPS = {
    1: ("vA", 11, [0.0, 3.75], [100, 101, 102], "a man walks"),
    2: ("vA", 12, [1.6, 5.25], [110], "she sits"),
    5: ("vA", 11, [0.0, 3.75], [150], "a man moves"),
    3: ("vB", 13, [7.0, 9.0], [120, 121], "they talk"),
    4: ("vB", 14, [2.0, 3.7], [130], "he laughs"),
}
# expected [st, ed): 3.75/1.5 = 2.5 rounds to 2 (Python round), 5.25/1.5 = 3.5 to 4;
# clip 13 starts after the 4 frames of vB -> empty range (4, 4)
RANGES = {1: (0, 2), 2: (1, 4), 5: (0, 2), 3: (4, 4), 4: (1, 2)}


def build_tvc_db(root, caps=CAPS, vid2caps=None):
    """meta.json on top, cap.db and clip.db with their side files, as prepro_tvc writes them."""
    db_dir = os.path.join(root, "tvc_train.db")
    cap_dir, clip_dir = os.path.join(db_dir, "cap.db"), os.path.join(db_dir, "clip.db")
    os.makedirs(db_dir)
    clips = {}
    with TxtLmdbWriter(cap_dir) as writer:
        for cid, (vid, clip_id, ts, ids, text) in caps.items():
            writer[str(cid)] = {"desc": text, "desc_id": cid, "input_ids": ids, "vid_name": vid,
                                "clip_id": str(clip_id), "ts": ts, "sub_indices": [],
                                "duration": 60.0}
            clip = clips.setdefault(clip_id, {"vid_name": vid, "ts": ts, "sub_indices": [],
                                              "duration": 60.0, "captions": []})
            clip["captions"].append({"id": cid, "input_ids": ids, "text": text})
    with TxtLmdbWriter(clip_dir) as writer:
        for clip_id, clip in clips.items():
            writer[str(clip_id)] = clip
    if vid2caps is None:
        vid2caps = {}
        for cid, cap in caps.items():
            vid2caps.setdefault(cap[0], []).append(str(cid))
    write_meta(db_dir, META)
    write_json(os.path.join(cap_dir, "id2len.json"), {})
    write_json(os.path.join(cap_dir, "cap2vid.json"), {str(c): v[0] for c, v in caps.items()})
    write_json(os.path.join(cap_dir, "vid2caps.json"), vid2caps)
    write_json(os.path.join(clip_dir, "clip2vid.json"),
               {str(c): clip["vid_name"] for c, clip in clips.items()})
    vid2clips = {}
    for clip_id, clip in clips.items():
        vid2clips.setdefault(clip["vid_name"], []).append(str(clip_id))
    write_json(os.path.join(clip_dir, "vid2clips.json"), vid2clips)
    return db_dir


@pytest.fixture
def video_db(tmp_path):
    img_dir = build_video_db(str(tmp_path), {"vA": 10, "vB": 4, "vC": 3})
    sub_dir = build_sub_db(str(tmp_path))
    return load_video_sub_dataset(img_dir, sub_dir, 1.5, opts(task="tvc", sub_ctx_len=1))


@pytest.fixture
def tvc_dir(tmp_path):
    return build_tvc_db(str(tmp_path))


def test_train_collate_captions_targets_and_clip_masks(video_db, tvc_dir):
    ds = TvcTrainDataset(video_db, CaptionTokLmdb(tvc_dir, 3))
    assert ds.vids == ["vA", "vB"]
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=TvcTrainDataset.collate)
    (batch,) = list(loader)
    # [BOS]+tokens and tokens+[EOS], each cut to 3: caption 1 loses its EOS
    assert batch["cap_input_ids"].tolist() == [[0, 100, 101], [0, 110, 1], [0, 150, 1],
                                               [0, 120, 121], [0, 130, 1]]
    assert batch["cap_tgt_ids"].tolist() == [[100, 101, 102], [110, 2, -1], [150, 2, -1],
                                             [120, 121, 2], [130, 2, -1]]
    assert batch["cap_pos_ids"].tolist() == [[0, 1, 2]]
    assert batch["clip_ranges"] == ((RANGES[1], RANGES[2], RANGES[5]), (RANGES[3], RANGES[4]))
    assert batch["cap_attn_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0],
                                               [1, 0, 0]]
    assert batch["cap_attn_mask"].dtype == torch.long
    assert batch["num_subs"] == [4, 2] and batch["c_v_feats"].shape == (2, 10, 4352)
    # sub_ctx_len 1: segment 1 of vA holds subtitles 0 and 1
    assert batch["f_sub_input_ids"][1].tolist()[:4] == [2, 11, 21, 22]


def test_untruncated_targets_end_with_eos(video_db, tvc_dir):
    _, input_ids, tgt_ids, _, _ = TvcTrainDataset(video_db, CaptionTokLmdb(tvc_dir, -1))[0]
    assert input_ids[0].tolist() == [0, 100, 101, 102]
    assert tgt_ids[0].tolist() == [100, 101, 102, 2]


def test_max_cap_per_vid_samples_own_captions(video_db, tvc_dir):
    random.seed(0)
    ds = TvcTrainDataset(video_db, CaptionTokLmdb(tvc_dir, -1), max_cap_per_vid=1)
    for _ in range(5):
        _, input_ids, _, _, ranges = ds[0]
        assert len(input_ids) == 1
        assert input_ids[0][1].item() in (100, 110, 150)


def test_val_collate_clips_and_ground_truth(video_db, tvc_dir):
    ds = TvcValDataset(video_db, CaptionTokLmdb(tvc_dir, -1))
    batch = TvcValDataset.collate([ds[0], ds[1]])
    assert batch["clip_ids"] == [11, 12, 13, 14]
    assert batch["vid_names"] == ["vA", "vA", "vB", "vB"]
    assert batch["gts"] == ["a man walks", "she sits", "they talk", "he laughs"]
    assert batch["all_ts"] == [[0.0, 3.75], [1.6, 5.25], [7.0, 9.0], [2.0, 3.7]]
    assert batch["clip_ranges"] == ((RANGES[1], RANGES[2]), (RANGES[3], RANGES[4]))
    assert batch["cap_attn_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert "cap_input_ids" not in batch and batch["num_subs"] == [4, 2]


def write_clip_jsonl(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(line) for line in lines) + "\n")


def test_eval_dataset_reads_raw_jsonl(video_db, tmp_path):
    path = str(tmp_path / "tvc_test_public_release.jsonl")
    write_clip_jsonl(path, [
        {"vid_name": "vB", "clip_id": 13, "ts": [7.0, 9.0], "duration": 60.0},
        {"vid_name": "vA", "clip_id": 12, "ts": [1.6, 5.25], "duration": 60.0},
        {"vid_name": "vB", "clip_id": 14, "ts": [2.0, 3.7], "duration": 60.0},
    ])
    ds = TvcEvalDataset(video_db, path)
    assert ds.vids == ["vB", "vA"]
    batch = TvcEvalDataset.collate([ds[0], ds[1]])
    assert batch["clip_ids"] == [13, 14, 12] and batch["vid_names"] == ["vB", "vB", "vA"]
    assert batch["clip_ranges"] == ((RANGES[3], RANGES[4]), (RANGES[2],))
    assert batch["cap_attn_mask"].tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert batch["all_ts"] == [[7.0, 9.0], [2.0, 3.7], [1.6, 5.25]]
    assert "gts" not in batch and batch["c_v_feats"].shape == (2, 10, 4352)


def test_eval_jsonl_errors_name_file_and_video(video_db, tmp_path):
    bad = str(tmp_path / "bad.jsonl")
    write_clip_jsonl(bad, [{"vid_name": "vA", "clip_id": 1, "ts": [0, 1]},
                           {"vid_name": "vA", "clip_id": 2}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        TvcEvalDataset(video_db, bad)
    unknown = str(tmp_path / "unknown.jsonl")
    write_clip_jsonl(unknown, [{"vid_name": "vZ", "clip_id": 1, "ts": [0, 1]}])
    with pytest.raises(KeyError, match=r"unknown\.jsonl.*vZ"):
        TvcEvalDataset(video_db, unknown)


def test_caption_of_unknown_video_is_an_error(video_db, tmp_path):
    caps = {**CAPS, 6: ("vZ", 15, [0.0, 1.0], [160], "nobody")}
    db_dir = build_tvc_db(str(tmp_path / "z"), caps)
    with pytest.raises(KeyError, match=r"vid2caps\.json.*vZ"):
        TvcTrainDataset(video_db, CaptionTokLmdb(db_dir, -1))


def test_empty_caption_is_a_bos_to_eos_item(video_db, tmp_path):
    """Upstream trains on an empty caption ([BOS] -> [EOS]); it must not stop the run."""
    caps = {**CAPS, 4: ("vB", 14, [2.0, 3.7], [], "")}
    ds = TvcTrainDataset(video_db, CaptionTokLmdb(build_tvc_db(str(tmp_path / "e"), caps), 60))
    batch = TvcTrainDataset.collate([ds[1]])
    assert batch["cap_input_ids"].tolist() == [[0, 120, 121], [0, 1, 1]]
    assert batch["cap_tgt_ids"].tolist() == [[120, 121, 2], [2, -1, -1]]
    assert batch["clip_ranges"] == ((RANGES[3], RANGES[4]),)


def test_sharding_keeps_every_video_once(video_db, tvc_dir, monkeypatch):
    caption_db = CaptionTokLmdb(tvc_dir, -1)
    monkeypatch.setattr(dist_utils, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist_utils, "get_rank", lambda r=rank: r)
        shards.append(TvcValDataset(video_db, caption_db).vids)
    assert shards == [["vA"], ["vB"]]

"""TVQA and VIOLIN datasets and collates on small real LMDBs (data.md §3.3, §3.4, §9.3, §9.4)."""
from __future__ import annotations

import os

import pytest
import torch
from test_data_video import META, build_sub_db, build_video_db, opts
from torch.utils.data import DataLoader

import utils.distributed as dist_utils
from data.data import load_video_sub_dataset
from data.db import TxtLmdbWriter, write_json, write_jsonl, write_meta
from data.txt_db import QaQueryTokLmdb
from data.videoQA import (
    VideoQaDataset,
    VideoQaEvalDataset,
    video_qa_collate,
    video_qa_eval_collate,
)
from data.violin import (
    ViolinDataset,
    ViolinEvalDataset,
    pair_id,
    violin_collate,
    violin_eval_collate,
)

# qid -> (vid, [q, a0..a4], ts, answer_idx); vA has 10 frames, vB 4 (fi 1.5)
TVQA = {
    7: ("vA", [[5, 6], [10], [11, 12], [13], [14], [15, 16, 17]], "1.6-6.1", 3),
    8: ("vB", [[7], [20], [21], [22], [23], [24]], "13.0-20.0", 0),
    9: ("vA", [[8], [30], [31], [32], [33], [34]], "NaN-NaN", None),
}
# desc_id -> (vid, tokens, label); s1-0 deliberately maps to another video than s1-1
VIOLIN = {
    "s1-1": ("vA", [70, 71], True),
    "s1-0": ("vB", [80], 0),
    "s2-1": ("vB", [90], 1),
}


def build_qa_db(root, name, records, id2len):
    """A TVQA/VIOLIN DB laid out as prepro_query writes it (records keyed by str(id))."""
    db_dir = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    with TxtLmdbWriter(db_dir) as writer:
        for qid, rec in records.items():
            writer[str(qid)] = rec
    write_meta(db_dir, META)
    write_json(os.path.join(db_dir, "id2len.json"), id2len)
    write_json(os.path.join(db_dir, "query2video.json"),
               {str(q): r["vid"] for q, r in records.items()})
    write_jsonl(os.path.join(db_dir, "query_data.jsonl"), list(records.values()))
    return db_dir


def build_tvqa_db(root, questions=TVQA):
    records, id2len = {}, {}
    for qid, (vid, ids, ts, ans) in questions.items():
        records[qid] = {"qid": str(qid), "vid_name": vid, "vid": vid, "input_ids": ids, "ts": ts,
                        "target": ans, "q": "q", "show_name": "bbt"}
        id2len[str(qid)] = [len(x) for x in ids]
    return build_qa_db(root, "tvqa_train.db", records, id2len)


def build_violin_db(root, statements=VIOLIN):
    records = {sid: {"desc_id": sid, "desc": "s", "vid_name": vid, "vid": vid, "input_ids": ids,
                     "label": label, "target": label, "qid": sid}
               for sid, (vid, ids, label) in statements.items()}
    id2len = {sid: len(ids) for sid, (_, ids, _) in statements.items()}
    return build_qa_db(root, "violin_train.db", records, id2len)


@pytest.fixture
def video_db(tmp_path):
    img_dir = build_video_db(str(tmp_path), {"vA": 10, "vB": 4, "vC": 3})
    sub_dir = build_sub_db(str(tmp_path))
    return load_video_sub_dataset(img_dir, sub_dir, 1.5, opts(task="tvqa"))


@pytest.fixture
def tvqa_db(tmp_path):
    return QaQueryTokLmdb(build_tvqa_db(str(tmp_path)), -1)


@pytest.fixture
def two_ranks(monkeypatch):
    """Call ``fn(rank)`` with utils.distributed reporting that rank of a world of 2."""
    def run(fn):
        out = []
        monkeypatch.setattr(dist_utils, "get_world_size", lambda: 2)
        for rank in (0, 1):
            monkeypatch.setattr(dist_utils, "get_rank", lambda r=rank: r)
            out.append(fn(rank))
        return out
    return run


# ---------------------------------------------------------------------------------------------
# TVQA
# ---------------------------------------------------------------------------------------------
def test_tvqa_item_targets_and_texts(video_db, tvqa_db):
    ds = VideoQaDataset(["vA", "vB"], video_db, tvqa_db)
    assert ds.qids == ["7", "8", "9"] and ds.frame_interval == 1.5 and ds.max_clip_len == 100
    videos, qa_ids, qa_masks, vids, targets, ts_targets = ds[0]
    assert vids == ["vA"] and targets[0].tolist() == [3]
    # floor(1.6/1.5)=1, ceil(6.1/1.5)-1=4
    assert ts_targets[0].tolist() == [1, 4]
    assert [q.tolist() for q in qa_ids] == [[2, 5, 6, 2, 10], [2, 5, 6, 2, 11, 12],
                                            [2, 5, 6, 2, 13], [2, 5, 6, 2, 14],
                                            [2, 5, 6, 2, 15, 16, 17]]
    assert all(m.tolist() == [1] * len(q) for m, q in zip(qa_masks, qa_ids))
    assert len(videos) == 5
    # answer 1, segment 1 of vA (sub tokens [21, 22], frames 1, 2)
    assert videos[1][0][1].tolist() == [2, 21, 22, 2, 5, 6, 2, 11, 12]
    assert videos[1][2][1].tolist() == [1] * (2 + 9)
    # ts past the end of vB (4 frames): both capped at n-1
    assert ds[1][5][0].tolist() == [3, 3]


def test_tvqa_unparsable_ts_and_missing_answer(video_db, tvqa_db):
    _, _, _, _, targets, ts_targets = VideoQaDataset(None, video_db, tvqa_db)[2]
    assert targets[0].tolist() == [-1] and ts_targets[0].tolist() == [-1, -1]


def test_tvqa_collate_shapes_padding_and_answer_order(video_db, tvqa_db):
    ds = VideoQaDataset(None, video_db, tvqa_db)
    batch = video_qa_collate([ds[0], ds[1]])
    assert batch["num_subs"] == [4] * 5 + [2] * 5
    assert batch["targets"].tolist() == [[3], [0]] and batch["targets"].dtype == torch.long
    assert batch["ts_targets"].tolist() == [[1, 4], [3, 3]]
    qa = batch["qa_input_ids"]
    assert qa.shape == (10, 7) and qa.dtype == torch.long
    assert qa[0].tolist() == [2, 5, 6, 2, 10, 1, 1]
    assert qa[4].tolist() == [2, 5, 6, 2, 15, 16, 17]
    assert qa[9].tolist() == [2, 7, 2, 24, 1, 1, 1]
    assert batch["qa_pos_ids"].tolist() == [list(range(7))]
    assert batch["qa_attn_masks"][9].tolist() == [1, 1, 1, 1, 0, 0, 0]
    # segment rows: 5 copies of vA (4 segments each), then 5 of vB (2 segments each)
    rows = batch["f_sub_input_ids"]
    assert rows.shape[0] == 5 * 4 + 5 * 2
    assert rows[0].tolist()[:7] == [2, 11, 2, 5, 6, 2, 10]
    assert rows[4 * 4 + 3].tolist()[:11] == [2, 41, 42, 43, 2, 5, 6, 2, 15, 16, 17]
    # vB segment 1 has no frame: masked dummy row, then text [SEP, 61] + qa (2, 7, 2, 20)
    last_a0 = 20 + 1
    assert batch["f_attn_masks"][last_a0].tolist()[:7] == [0, 1, 1, 1, 1, 1, 1]
    assert batch["f_sub_input_ids"][last_a0].tolist()[:6] == [2, 61, 2, 7, 2, 20]
    assert batch["c_v_feats"].shape == (10, 10, 4352)
    assert batch["c_attn_masks"][5].tolist() == [1] * 4 + [0] * 6
    assert batch["c_v_feats"][7, :, 0].tolist() == [200, 201, 202, 203] + [0] * 6


def test_tvqa_eval_collate_adds_qids_through_dataloader(video_db, tvqa_db):
    ds = VideoQaEvalDataset(None, video_db, tvqa_db)
    loader = DataLoader(ds, batch_size=2, shuffle=False, collate_fn=video_qa_eval_collate)
    batches = list(loader)
    assert [b["qids"] for b in batches] == [["7", "8"], ["9"]]
    assert batches[1]["targets"].tolist() == [[-1]]
    assert batches[1]["ts_targets"].tolist() == [[-1, -1]]


def test_tvqa_length_filter_drops_questions(video_db, tmp_path):
    # q + longest answer: 7 -> 2 + 3 = 5, 8 -> 2, 9 -> 2
    query_db = QaQueryTokLmdb(build_tvqa_db(str(tmp_path / "f")), 4)
    assert VideoQaDataset(None, video_db, query_db).qids == ["8", "9"]


def test_tvqa_answer_index_out_of_range(video_db, tmp_path):
    questions = {**TVQA, 8: ("vB", TVQA[8][1], "1-2", 5)}
    query_db = QaQueryTokLmdb(build_tvqa_db(str(tmp_path / "bad"), questions), -1)
    ds = VideoQaDataset(None, video_db, query_db)
    with pytest.raises(ValueError, match=r"question 8 .*tvqa_train\.db.*answer index 5"):
        ds[1]


def test_tvqa_question_on_unknown_video(video_db, tmp_path):
    questions = {**TVQA, 10: ("vZ", TVQA[9][1], None, 1)}
    query_db = QaQueryTokLmdb(build_tvqa_db(str(tmp_path / "z"), questions), -1)
    with pytest.raises(KeyError, match=r"query2video\.json.*vZ"):
        VideoQaDataset(None, video_db, query_db)


def test_tvqa_sharding_covers_every_question_once(video_db, tvqa_db, two_ranks):
    shards = two_ranks(lambda r: VideoQaDataset(None, video_db, tvqa_db).qids)
    assert shards == [["7", "9"], ["8"]]


# ---------------------------------------------------------------------------------------------
# VIOLIN
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def violin_db(tmp_path):
    return QaQueryTokLmdb(build_violin_db(str(tmp_path)), -1)


def test_pair_id_flips_last_field():
    assert pair_id("abc-def-1") == "abc-def-0" and pair_id("x-0") == "x-1"
    with pytest.raises(ValueError, match="'nolabel'"):
        pair_id("nolabel")


def test_violin_train_item_pairs_statements_on_own_video(tmp_path, violin_db):
    img_dir = build_video_db(str(tmp_path), {"vA": 10, "vB": 4, "vC": 3})
    video_db = load_video_sub_dataset(img_dir, build_sub_db(str(tmp_path)), 1.5,
                                      opts(task="violin", sub_ctx_len=2))
    ds = ViolinDataset(None, video_db, violin_db)
    batch = violin_collate([ds[0]])  # s1-1 and its pair s1-0, both on vA
    assert batch["num_subs"] == [4, 4]
    assert batch["targets"].tolist() == [[1], [0]]
    assert batch["q_input_ids"].tolist() == [[2, 70, 71], [2, 80, 1]]
    assert batch["q_attn_masks"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["q_pos_ids"].tolist() == [[0, 1, 2]]
    # sub_ctx_len 2: segment 3 of vA holds subtitles 1..3, then the statement
    assert batch["f_sub_input_ids"][3].tolist() == [2, 21, 22, 31, 41, 42, 43, 2, 70, 71]
    assert batch["f_sub_input_ids"][4].tolist()[:4] == [2, 11, 2, 80]
    assert batch["c_v_feats"][1, :, 0].tolist() == [100 + t for t in range(10)]


def test_violin_missing_pair_names_id_and_db(video_db, violin_db):
    ds = ViolinDataset(None, video_db, violin_db)
    with pytest.raises(KeyError, match=r"s2-0.*violin_train\.db"):
        ds[2]


def test_violin_eval_one_statement_per_item(video_db, violin_db):
    ds = ViolinEvalDataset(None, video_db, violin_db)
    batch = violin_eval_collate([ds[0], ds[1], ds[2]])
    assert batch["qids"] == ["s1-1", "s1-0", "s2-1"]
    assert batch["targets"].tolist() == [[1], [0], [1]]
    assert batch["num_subs"] == [4, 2, 2]
    assert batch["q_input_ids"].tolist() == [[2, 70, 71], [2, 80, 1], [2, 90, 1]]


def test_violin_sharding_covers_every_statement_once(video_db, violin_db, two_ranks):
    shards = two_ranks(lambda r: ViolinEvalDataset(None, video_db, violin_db).qids)
    assert shards == [["s1-1", "s2-1"], ["s1-0"]]

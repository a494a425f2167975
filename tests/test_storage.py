"""Storage layer: LMDB writers and the text/video readers (data.md §2-§4, §6)."""
from __future__ import annotations

import gc
import io
import logging
import multiprocessing as mp
import os
import pickle
import zipfile

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

import data.db as db_module
from data.codec import RecordDecodeError, decode_txt_fields, encode_txt, encode_video
from data.db import (
    LazyLmdb,
    LmdbWriter,
    TxtLmdbWriter,
    VideoLmdbWriter,
    make_output_dir,
    write_json,
    write_jsonl,
    write_meta,
)
from data.txt_db import (
    CaptionTokLmdb,
    MsrvttQueryTokLmdb,
    QaQueryTokLmdb,
    QueryTokLmdb,
    SubTokLmdb,
    TxtTokLmdb,
    VrQueryTokLmdb,
    VrSubTokLmdb,
)
from data.video_db import VideoFeatLmdb, check_frame_counts, require_videos, video_lmdb_dir

META = {"BOS": 0, "CLS": 0, "PAD": 1, "EOS": 2, "SEP": 2, "UNK": 3, "MASK": 99,
        "v_range": [4, 98]}
D = 4352


def make_txt_db(path, records: dict, meta=META, **side_files):
    """Write a text DB the way the prepro scripts do: records + meta.json + JSON side files."""
    os.makedirs(path)
    write_meta(path, meta)
    with TxtLmdbWriter(str(path)) as db:
        for key, rec in records.items():
            db[key] = rec
    for name, obj in side_files.items():
        if name == "query_data":
            write_jsonl(os.path.join(path, "query_data.jsonl"), obj)
        else:
            write_json(os.path.join(path, f"{name}.json"), obj)
    return str(path)


# ---------------------------------------------------------------- writers


def test_writer_commits_in_batches_and_on_close(tmp_path):
    path = str(tmp_path / "db")
    with LmdbWriter(path, commit_every=3) as db:
        for i in range(7):
            db.put(f"k{i}", b"v%d" % i)
        assert db.env.stat()["entries"] == 6  # two batches of 3 committed, one pending
    reader = LazyLmdb(path)
    assert len(reader) == 7
    assert bytes(reader.get("k6")) == b"v6"


def test_writer_aborts_pending_batch_on_error(tmp_path):
    path = str(tmp_path / "db")
    with pytest.raises(RuntimeError), TxtLmdbWriter(path) as db:
        db["a"] = {"x": 1}
        raise RuntimeError("boom")
    assert len(LazyLmdb(path)) == 0


def test_make_output_dir_refuses_existing(tmp_path):
    make_output_dir(str(tmp_path / "out"))
    with pytest.raises(FileExistsError, match="out"):
        make_output_dir(str(tmp_path / "out"))


# ---------------------------------------------------------------- text readers


def test_txt_db_round_trip_bytes_and_meta(tmp_path):
    rec = {"desc": "a b", "input_ids": [5, 6], "target": [1.5, 3.0], "qid": "7"}
    db_dir = make_txt_db(tmp_path / "q.db", {"7": rec}, id2len={"7": 2})
    with open(os.path.join(db_dir, "meta.json")) as f:
        assert f.read().startswith('{\n    "BOS": 0')
    db = TxtTokLmdb(db_dir)
    assert bytes(db.db.get("7")) == encode_txt(rec)
    assert db["7"] == rec and db[7] == rec
    assert (db.cls_, db.sep, db.pad, db.bos, db.eos, db.mask) == (0, 2, 1, 0, 2, 99)
    assert db.v_range == [4, 98]
    assert db.id2len == {"7": 2}


def test_length_filter_drops_and_logs_once(tmp_path, caplog):
    id2len = {"1": 3, "2": 10, "3": 5}
    db_dir = make_txt_db(tmp_path / "q.db", {k: {"input_ids": []} for k in id2len},
                         id2len=id2len)
    with caplog.at_level(logging.INFO, logger="data.txt_db"):
        db = TxtTokLmdb(db_dir, 5)
    assert db.ids == ["1", "3"]
    assert [r.message for r in caplog.records if "dropped" in r.message] == [
        f"{db_dir}: dropped 1 of 3 items longer than max_txt_len=5"]
    assert TxtTokLmdb(db_dir, -1).ids == ["1", "2", "3"]


def test_tvqa_length_is_question_plus_longest_answer(tmp_path):
    id2len = {"1": [10, 3, 50, 2, 2, 2], "2": [10, 3, 49, 2, 2, 2]}
    db_dir = make_txt_db(tmp_path / "qa.db", {"1": {}, "2": {}}, id2len=id2len,
                         query2video={"1": "v", "2": "v"})
    assert QaQueryTokLmdb(db_dir, 59).ids == ["2"]


def test_txt_db_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.db"):
        TxtTokLmdb(str(tmp_path / "nowhere.db"))
    bad_meta = {k: v for k, v in META.items() if k != "MASK"}
    db_dir = make_txt_db(tmp_path / "m.db", {"1": {}}, meta=bad_meta)
    with pytest.raises(KeyError, match="meta.json.*MASK"):
        TxtTokLmdb(db_dir)
    db_dir = make_txt_db(tmp_path / "ok.db", {"1": {}})
    with LmdbWriter(db_dir) as w:
        w.put("bad", b"not lz4")
    db = TxtTokLmdb(db_dir)
    with pytest.raises(RecordDecodeError, match=r"ok\.db\['42'\]"):
        db["42"]
    with pytest.raises(RecordDecodeError, match=r"ok\.db\['bad'\]"):
        db["bad"]
    os.remove(os.path.join(db_dir, "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TxtTokLmdb(db_dir)


def test_query_db_side_files(tmp_path):
    lines = [{"desc_id": 5, "vid_name": "v1", "ts": [0, 1], "type": "v"},
             {"desc_id": 6, "vid_name": "v2", "ts": [1, 2], "type": "t"},
             {"desc_id": 7, "vid_name": "v1", "ts": [2, 3], "type": "vt"}]
    db_dir = make_txt_db(tmp_path / "q.db", {"5": {}, "6": {}, "7": {}},
                         id2len={"5": 1, "6": 1, "7": 1},
                         query2video={"5": "v1", "6": "v2", "7": "v1"}, query_data=lines)
    db = QueryTokLmdb(db_dir)
    assert db.video2query == {"v1": ["5", "7"], "v2": ["6"]}
    assert db.query_data["6"] == lines[1]
    bare = QueryTokLmdb(make_txt_db(tmp_path / "test.db", {"5": {}}, id2len={"5": 1}))
    assert (bare.query2video, bare.video2query, bare.query_data) == ({}, {}, {})


def test_qa_db_requires_query2video(tmp_path):
    db_dir = make_txt_db(tmp_path / "qa.db", {"1": {}}, id2len={"1": [1] * 6})
    with pytest.raises(FileNotFoundError, match="query2video.json"):
        QaQueryTokLmdb(db_dir)


def test_vr_query_data_keyed_by_sen_id_then_retrieval_key(tmp_path):
    lines = [{"sen_id": 11, "retrieval_key": "r1"}, {"retrieval_key": "r2"}]
    db_dir = make_txt_db(tmp_path / "m.db", {"11": {}}, id2len={"11": 1}, query_data=lines)
    assert MsrvttQueryTokLmdb is VrQueryTokLmdb
    assert sorted(VrQueryTokLmdb(db_dir).query_data) == ["11", "r2"]
    with pytest.raises(KeyError, match="query_data.jsonl line 1 .*desc_id"):
        QueryTokLmdb(db_dir)


def make_tvc_db(root):
    os.makedirs(root)
    write_meta(root, META)
    cap = {"desc": "x", "desc_id": 3, "input_ids": [5, 6, 7, 8], "vid_name": "v",
           "clip_id": "9", "ts": [0.0, 3.0], "sub_indices": [0], "duration": 60.0}
    clip = {"vid_name": "v", "ts": [0.0, 3.0], "sub_indices": [0], "duration": 60.0,
            "captions": [{"id": 3, "input_ids": [5, 6, 7, 8], "text": "x"}]}
    for name, key, rec in (("cap.db", "3", cap), ("clip.db", "9", clip)):
        with TxtLmdbWriter(os.path.join(root, name)) as db:
            db[key] = rec
    write_json(os.path.join(root, "cap.db", "id2len.json"), {})
    write_json(os.path.join(root, "cap.db", "cap2vid.json"), {"3": "v"})
    write_json(os.path.join(root, "cap.db", "vid2caps.json"), {"v": ["3"]})
    write_json(os.path.join(root, "clip.db", "clip2vid.json"), {"9": "v"})
    write_json(os.path.join(root, "clip.db", "vid2clips.json"), {"v": ["9"]})
    return str(root), clip


def test_caption_db_bos_eos_and_independent_truncation(tmp_path):
    root, clip = make_tvc_db(tmp_path / "tvc.db")
    full = CaptionTokLmdb(root)["3"]
    assert full["input_ids"].tolist() == [0, 5, 6, 7, 8]
    assert full["tgt_ids"].tolist() == [5, 6, 7, 8, 2]
    assert full["input_ids"].dtype == torch.long
    cut = CaptionTokLmdb(root, 3)["3"]
    assert cut["input_ids"].tolist() == [0, 5, 6] and cut["tgt_ids"].tolist() == [5, 6, 7]
    db = CaptionTokLmdb(root, 60)
    assert db.get_clip(9) == clip
    assert (db.cap2vid, db.vid2caps, db.clip2vid, db.vid2clips) == (
        {"3": "v"}, {"v": ["3"]}, {"9": "v"}, {"v": ["9"]})
    write_json(os.path.join(root, "cap.db", "vid2caps.json"), {"w": []})
    assert db.vid2caps == {"w": []}  # re-read from disk on every access, as upstream
    assert (db.pad, db.bos, db.eos, db.id2len) == (1, 0, 2, {})


def sub_record(vid, unique, unmatched):
    return {"vid_name": vid, "unique_sub2frames": unique, "unmatched_frames": unmatched,
            "input_ids": [[5]] * len(unique)}


def make_sub_db(tmp_path, name="sub.db", vid2dur_idx=None):
    records = {
        "a": sub_record("a", [[0, [0, 1]], [1, []], [2, [2, 3, 4]], [3, [5]]], [6, 7]),
        "b": sub_record("b", [[0, [0]], [1, [4, 5]], [2, [6]]], [1, 2, 3]),
    }
    side = {"vid2len": {"a": 8, "b": 7}, "vid2max_frame_sub_len": {"a": 4, "b": 3}}
    if vid2dur_idx is not None:
        side["vid2dur_idx"] = vid2dur_idx
    return make_txt_db(tmp_path / name, records, **side)


def test_sub_db_keeps_prefix_of_subtitles(tmp_path):
    dur = {"train": {"a": [12.0, 0]}, "val": {"b": [10.5, 1]}}
    db = SubTokLmdb(make_sub_db(tmp_path, vid2dur_idx=dur), 3)
    assert db.vid_sub2frame == {"a": [(0, [0, 1]), (1, []), (2, [2])], "b": [(0, [0])]}
    assert db.vid2vonly_frames == {"a": [], "b": [1, 2]}
    assert db.id2len == {"a": 3, "b": 3}
    assert db.vid2max_len == {"a": 4, "b": 3}
    assert db.vid2dur == {"train": [{"vid_name": "a", "duration": 12.0}],
                          "val": [{"vid_name": "b", "duration": 10.5}]}
    assert db.vid2idx == {"train": {"a": 0}, "val": {"b": 1}}
    assert db["b"]["input_ids"] == [[5], [5], [5]]


def test_sub_db_minus_one_and_vr_variant(tmp_path):
    db_dir = make_sub_db(tmp_path)
    raw = SubTokLmdb(db_dir, -1)
    assert raw.vid_sub2frame["a"] == [[0, [0, 1]], [1, []], [2, [2, 3, 4]], [3, [5]]]  # raw
    assert raw.vid2vonly_frames == {"a": [], "b": []}  # upstream's broken -1 path
    assert raw.id2len == {"a": -1, "b": -1}
    assert (raw.vid2dur, raw.vid2idx) == ({}, {})
    vr = VrSubTokLmdb(db_dir, 3)
    assert vr.max_clip_len == 3
    assert vr.vid_sub2frame["b"] == [[0, [0]], [1, [4, 5]], [2, [6]]]
    assert vr.id2len == {"a": 8, "b": 7}
    assert (vr.vid2dur, vr.vid2idx) == ({}, {})


def test_sub_db_scan_decodes_only_the_mappings(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("full record decode during the SubTokLmdb scan")

    db_dir = make_sub_db(tmp_path)
    monkeypatch.setattr(db_module, "decode_txt", refuse)
    assert gc.isenabled()
    db = SubTokLmdb(db_dir, 100)
    assert gc.isenabled()  # the scan pauses the GC and restores it
    assert db.vid_sub2frame["b"] == [(0, [0]), (1, [4, 5]), (2, [6])]


def test_decode_txt_fields_subset_and_errors(tmp_path):
    rec = {"sub": [{"text": "x", "start": 0.5}], "unique_sub2frames": [[0, [1, 2]]],
           "unmatched_frames": [0], "v_id": "v"}
    value = encode_txt(rec)
    assert decode_txt_fields(value, ("unmatched_frames", "unique_sub2frames")) == {
        "unique_sub2frames": [[0, [1, 2]]], "unmatched_frames": [0]}
    assert decode_txt_fields(memoryview(value), ("v_id",)) == {"v_id": "v"}
    with pytest.raises(RecordDecodeError, match=r"db\['v'\] lacks the field\(s\) \['dur'\]"):
        decode_txt_fields(value, ("v_id", "dur"), where="db['v']")
    with pytest.raises(RecordDecodeError, match="missing record"):
        decode_txt_fields(None, ("v_id",))
    db_dir = make_txt_db(tmp_path / "s.db", {"a": {"unique_sub2frames": []}},
                         vid2len={"a": 3}, vid2max_frame_sub_len={"a": 0})
    with pytest.raises(RecordDecodeError, match=r"s\.db\['a'\] lacks.*unmatched_frames"):
        SubTokLmdb(db_dir, 100)


def test_sub_db_missing_side_file_and_record(tmp_path):
    db_dir = make_sub_db(tmp_path)
    write_json(os.path.join(db_dir, "vid2len.json"), {"a": 8, "zz": 3})
    with pytest.raises(RecordDecodeError, match="'zz'"):
        SubTokLmdb(db_dir, 100)
    os.remove(os.path.join(db_dir, "vid2max_frame_sub_len.json"))
    with pytest.raises(FileNotFoundError, match="vid2max_frame_sub_len.json"):
        SubTokLmdb(db_dir, 100)


# ---------------------------------------------------------------- video reader


def make_video_db(root, feats: dict, id2nframe=None, interval="1.5", compress=False):
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, f"resnet_slowfast_{interval}" + ("_compressed" * compress))
    with VideoLmdbWriter(folder, compress=compress) as db:
        for vid, arr in feats.items():
            db[vid] = arr
    write_json(os.path.join(root, "id2nframe.json"),
               id2nframe or {v: len(a) for v, a in feats.items()})
    return str(root)


def rand_feats(n, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(dtype)


def test_video_msgpack_bytes_equal_msgpack_numpy(tmp_path):
    arr = rand_feats(3)
    root = make_video_db(tmp_path / "tv", {"v": arr})
    reference = msgpack.packb({"features": arr}, default=msgpack_numpy.encode,
                              use_bin_type=True)
    assert encode_video(arr) == reference
    reader = VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)
    assert bytes(reader.db.get("v")) == reference
    out = reader["v"]
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(arr))


def test_video_float16_and_foreign_msgpack_numpy_records(tmp_path):
    half = rand_feats(4, np.float16)
    root = make_video_db(tmp_path / "tv", {"h": half})
    folder = os.path.join(root, "resnet_slowfast_1.5")
    with LmdbWriter(folder) as db:  # a record written by msgpack-numpy itself
        db.put("m", msgpack.packb({"features": half[:2]}, default=msgpack_numpy.encode,
                                  use_bin_type=True))
    write_json(os.path.join(root, "id2nframe.json"), {"h": 4, "m": 2})
    reader = VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)
    assert reader["h"].dtype == torch.float32
    assert torch.equal(reader["h"], torch.from_numpy(half.astype(np.float32)))
    assert torch.equal(reader["m"], torch.from_numpy(half[:2].astype(np.float32)))


def test_video_compressed_and_clip_len_slicing(tmp_path):
    arr = rand_feats(6)
    root = make_video_db(tmp_path / "violin", {"v": arr}, id2nframe={"v": 5}, compress=True)
    assert VideoFeatLmdb(root, "resnet_slowfast", 1.5, True, 100)["v"].shape == (5, D)
    short = VideoFeatLmdb(root, "resnet_slowfast", 1.5, True, 3)
    assert torch.equal(short["v"], torch.from_numpy(arr[:3]))
    full = make_video_db(tmp_path / "full", {"v": arr}, compress=True)
    assert torch.equal(VideoFeatLmdb(full, "resnet_slowfast", 1.5, True, -1)["v"],
                       torch.from_numpy(arr[:-1]))  # upstream quirk: -1 drops the last frame
    with pytest.raises(FileNotFoundError, match="resnet_slowfast_1.5"):
        VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)


def npz_with_allow_pickle_member(arr) -> bytes:
    """An npz value as numpy 1.x wrote it when given ``allow_pickle=True``: two members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, member in (("features", arr), ("allow_pickle", np.array(True))):
            member_buf = io.BytesIO()
            np.lib.format.write_array(member_buf, member, allow_pickle=False)
            zf.writestr(f"{name}.npy", member_buf.getvalue())
    return buf.getvalue()


def test_video_npz_value_format_and_extra_member(tmp_path):
    arr = rand_feats(3, np.float16)
    value = encode_video(arr, compress=True)
    with zipfile.ZipFile(io.BytesIO(value)) as zf:
        assert zf.namelist() == ["features.npy"]
        assert zf.getinfo("features.npy").compress_type == zipfile.ZIP_DEFLATED
    root = make_video_db(tmp_path / "violin", {"v": arr}, compress=True)
    with LmdbWriter(os.path.join(root, "resnet_slowfast_1.5_compressed")) as db:
        db.put("old", npz_with_allow_pickle_member(arr[:2]))
    write_json(os.path.join(root, "id2nframe.json"), {"v": 3, "old": 2})
    reader = VideoFeatLmdb(root, "resnet_slowfast", 1.5, True, 100)
    assert torch.equal(reader["v"], torch.from_numpy(arr.astype(np.float32)))
    assert torch.equal(reader["old"], torch.from_numpy(arr[:2].astype(np.float32)))


def test_video_folder_accepts_both_interval_spellings(tmp_path):
    root2 = make_video_db(tmp_path / "a", {"v": rand_feats(2)}, interval="2.0")
    root3 = make_video_db(tmp_path / "b", {"v": rand_feats(2)}, interval="2")
    for root in (root2, root3):
        for interval in (2, 2.0):
            assert VideoFeatLmdb(root, "resnet_slowfast", interval, False, 100)["v"].shape[0] == 2
    assert video_lmdb_dir(root2, "resnet_slowfast", 2).endswith("resnet_slowfast_2.0")


def test_video_errors(tmp_path):
    root = make_video_db(tmp_path / "tv", {"v": rand_feats(2), "w": np.zeros((2, 10), "f4")},
                         id2nframe={"v": 2, "w": 2, "gone": 3})
    assert VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)["w"].shape == (2, 10)
    checked = VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100, expected_dim=D)
    with pytest.raises(ValueError, match=r"'w'.*expected \(n_frames, 4352\)"):
        checked["w"]
    reader = VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)
    with pytest.raises(RecordDecodeError, match=r"resnet_slowfast_1.5\['gone'\]"):
        reader["gone"]
    with pytest.raises(KeyError, match="id2nframe.json"):
        reader["nope"]
    with pytest.raises(KeyError, match=r"2 video id\(s\) from tvr_val.db.*\['x', 'y'\]"):
        require_videos(["v", "x", "y"], reader, "tvr_val.db")
    require_videos(["v", "w"], reader, "tvr_val.db")
    with pytest.raises(FileNotFoundError, match="missing"):
        VideoFeatLmdb(str(tmp_path / "missing"))
    os.remove(os.path.join(root, "id2nframe.json"))
    with pytest.raises(FileNotFoundError, match="id2nframe.json"):
        VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)


def test_check_frame_counts_reports_frames_beyond_video(tmp_path):
    root = make_video_db(tmp_path / "tv", {"a": rand_feats(8), "b": rand_feats(5)})
    reader = VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)
    check_frame_counts(reader, {"a": [(0, [6, 7])], "b": [(0, [4]), (1, [])]}, "tv_subtitles")
    with pytest.raises(ValueError, match=r"b \(frame 5 >= 5\)"):
        check_frame_counts(reader, {"a": [(0, [7])], "b": [(0, [4, 5])]}, "tv_subtitles")


# ---------------------------------------------------------------- fork / pickling

_READERS = {}


def _read_in_child(queue):
    txt, vid = _READERS["txt"], _READERS["vid"]
    queue.put((txt["7"], vid["v"].numpy().tolist(), os.getpid()))


def test_readers_work_in_forked_child_and_after_pickling(tmp_path):
    db_dir = make_txt_db(tmp_path / "q.db", {"7": {"input_ids": [1, 2]}}, id2len={"7": 2})
    arr = rand_feats(2)
    root = make_video_db(tmp_path / "tv", {"v": arr})
    txt, vid = TxtTokLmdb(db_dir), VideoFeatLmdb(root, "resnet_slowfast", 1.5, False, 100)
    assert txt["7"]["input_ids"] == [1, 2] and vid["v"].shape == (2, D)  # parent env open
    _READERS.update(txt=txt, vid=vid)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(queue,))
    child.start()
    rec, feats, pid = queue.get(timeout=10)
    child.join(timeout=30)
    assert child.exitcode == 0 and pid != os.getpid()
    assert rec == {"input_ids": [1, 2]}
    assert np.array_equal(np.array(feats, dtype=np.float32), arr)
    clone = pickle.loads(pickle.dumps(vid))
    assert torch.equal(clone["v"], vid["v"])
    assert pickle.loads(pickle.dumps(txt))["7"] == rec

"""Converters from the ORIGINAL VIOLIN / DiDeMo / MSR-VTT annotation files to HERO text DBs,
on hand-made inputs whose records are known."""
from __future__ import annotations

import csv
import json
import logging

import pytest

from data.txt_db import QaQueryTokLmdb, QueryTokLmdb, VrQueryTokLmdb
from scripts import prepro_didemo, prepro_msrvtt, prepro_violin
from scripts.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def toker(tmp_path_factory) -> str:
    return str(build_tokenizer(tmp_path_factory.mktemp("toker")))


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


VIOLIN = {
    "c7": {"file": "friends_clip_7", "source": "tv", "split": "train", "span": [100.0, 140.0],
           "statement": [["Alice eats cake.", "Alice eats soup."],
                         ["Bruno runs.", "Bruno sits."]],
           "sub": [[" B : late line", 112.0, 114.0], [" A : early", 99.0, 101.5],
                   [" A : before the clip", 90.0, 95.0]]},
    "c8": {"file": "movie_clip_8", "source": "movie", "split": "validate", "span": [0, 30],
           "statement": [["Chloe reads.", "Chloe sings."]], "sub": []},
    "c9": {"file": "orphan", "statement": [["x", "y"]], "sub": []},
}


def test_violin_statement_ids_labels_and_subtitles(tmp_path, toker, caplog):
    (tmp_path / "violin_annotation.json").write_text(json.dumps(VIOLIN))
    with caplog.at_level(logging.WARNING):
        prepro_violin.main(["--annotation", str(tmp_path / "violin_annotation.json"),
                            "--output_dir", str(tmp_path / "txt"), "--ann_out",
                            str(tmp_path / "ann"), "--toker", toker])
    assert "1 clips without a 'split'" in caplog.text
    assert "1 subtitles ending before" in caplog.text
    train = QaQueryTokLmdb(str(tmp_path / "txt" / "violin_train.db"))
    assert train.ids == ["c7-0-1", "c7-0-0", "c7-1-1", "c7-1-0"]
    assert train.query2video == dict.fromkeys(train.ids, "friends_clip_7")
    rec = train["c7-0-0"]
    assert (rec["desc"], rec["label"], rec["target"], rec["qid"]) == \
        ("Alice eats soup.", 0, 0, "c7-0-0")
    for qid in train.ids:
        *head, x = qid.split("-")
        assert "-".join(head + [str(1 - int(x))]) in train.ids
    assert QaQueryTokLmdb(str(tmp_path / "txt" / "violin_val.db")).ids == ["c8-0-1", "c8-0-0"]
    subs = read_jsonl(tmp_path / "ann" / "violin_subtitles.jsonl")
    assert subs[0] == {"vid_name": "friends_clip_7", "sub": [
        {"text": " A : early", "start": 0.0, "end": 1.5},
        {"text": " B : late line", "start": 12.0, "end": 14.0}]}
    assert [s["vid_name"] for s in subs] == ["friends_clip_7", "movie_clip_8"]


def test_violin_clip_clock_and_bad_split():
    clip = dict(VIOLIN["c7"], sub=[[" A : x", 3.0, 4.0]])
    line, dropped = prepro_violin.subtitle_line(clip, "clip")
    assert line["sub"] == [{"text": " A : x", "start": 3.0, "end": 4.0}] and dropped == 0
    with pytest.raises(ValueError, match="'c1' has unknown split 'dev'"):
        prepro_violin.convert({"c1": dict(VIOLIN["c7"], split="dev")}, "source")


DIDEMO = [
    {"annotation_id": 11, "description": "Alice dances.", "video": "vidA@N00_1.mov",
     "times": [[0, 0], [0, 0], [0, 1], [1, 1]]},
    {"annotation_id": 12, "description": "Bruno sits.", "video": "vidA@N00_1.mov",
     "times": [[1, 1], [2, 3], [2, 3], [1, 1]]},
    {"annotation_id": 13, "description": "Chloe runs.", "video": "vidB.mp4",
     "times": [[4, 4], [4, 5], [5, 5], [4, 4]]},
    {"annotation_id": 14, "description": "Nobody.", "video": "no_features.avi",
     "times": [[0, 0], [0, 0], [0, 0], [0, 0]]},
]


def test_didemo_multi_gt_ts_and_consensus_target(tmp_path, toker):
    (tmp_path / "train_data.json").write_text(json.dumps(DIDEMO))
    prepro_didemo.main(["--ann_dir", str(tmp_path), "--output_dir", str(tmp_path / "txt"),
                        "--ann_out", str(tmp_path / "ann"), "--toker", toker,
                        "--splits", "train"])
    db = QueryTokLmdb(str(tmp_path / "txt" / "didemo_train.db"))
    assert db.ids == ["11", "12", "13", "14"]
    assert db["11"]["target"] == [0.0, 5.0]
    assert db["12"]["target"] == [5.0, 10.0]
    assert db["11"]["vid"] == "vidA@N00_1" and db["13"]["vid"] == "vidB"
    assert db.query_data["11"]["ts"] == [[0.0, 5.0], [0.0, 5.0], [0.0, 10.0], [5.0, 10.0]]
    assert db.query_data["13"]["duration"] == 30.0
    video_ids = json.loads((tmp_path / "txt" / "didemo_train.db" / "video_ids.json").read_text())
    assert video_ids == ["no_features", "vidA@N00_1", "vidB"]
    assert read_jsonl(tmp_path / "ann" / "didemo_train.jsonl") == list(db.query_data.values())


def test_didemo_clips_to_video_length_and_drops(tmp_path, toker, caplog):
    (tmp_path / "val_data.json").write_text(json.dumps(DIDEMO))
    (tmp_path / "id2nframe.json").write_text(json.dumps({"vidA@N00_1": 20, "vidB": 12}))
    with caplog.at_level(logging.WARNING):
        prepro_didemo.main(["--ann_dir", str(tmp_path), "--output_dir", str(tmp_path / "txt"),
                            "--ann_out", str(tmp_path / "ann"), "--toker", toker,
                            "--splits", "val", "--vid2nframe", str(tmp_path / "id2nframe.json")])
    assert "dropped 1 queries whose video has no features and 1 whose" in caplog.text
    db = QueryTokLmdb(str(tmp_path / "txt" / "didemo_val.db"))
    assert db.ids == ["11", "12"]
    assert db.query_data["12"]["ts"] == [[5.0, 10.0], [10.0, 20.0], [10.0, 20.0], [5.0, 10.0]]
    assert db.query_data["12"]["duration"] == 30.0
    assert db.query2video == {"11": "vidA@N00_1", "12": "vidA@N00_1"}


MSRVTT = {"info": {}, "videos": [
    {"video_id": "video0", "split": "train", "start time": 1.0, "end time": 11.5, "id": 0},
    {"video_id": "video1", "split": "validate", "start time": 0.0, "end time": 20.0, "id": 1},
    {"video_id": "video2", "split": "test", "start time": 0.0, "end time": 14.0, "id": 2}],
    "sentences": [{"caption": "a man runs", "video_id": "video0", "sen_id": 0},
                  {"caption": "a dog sits", "video_id": "video1", "sen_id": 1},
                  {"caption": "people dance", "video_id": "video2", "sen_id": 2},
                  {"caption": "a woman sings", "video_id": "video0", "sen_id": 3}]}


def run_msrvtt(tmp_path, toker, *extra):
    (tmp_path / "videodatainfo.json").write_text(json.dumps(MSRVTT))
    prepro_msrvtt.main(["--videodatainfo", str(tmp_path / "videodatainfo.json"),
                        "--output_dir", str(tmp_path / "txt"), "--ann_out",
                        str(tmp_path / "ann"), "--toker", toker, *extra])
    return {s: VrQueryTokLmdb(str(tmp_path / "txt" / f"msrvtt_{s}.db"))
            for s in ("train", "val", "test")}


def test_msrvtt_sentences_keyed_by_sen_id(tmp_path, toker):
    dbs = run_msrvtt(tmp_path, toker)
    assert dbs["train"].ids == ["0", "3"] and dbs["val"].ids == ["1"]
    assert dbs["test"].ids == ["2"]
    line = dbs["train"].query_data["3"]
    assert line == {"desc_id": 3, "sen_id": 3, "desc": "a woman sings", "vid_name": "video0",
                    "clip_name": "video0", "duration": 10.5}
    assert dbs["train"]["3"]["target"] is None
    assert dbs["train"].query2video == {"0": "video0", "3": "video0"}


def test_msrvtt_1ka_csv_keyed_by_retrieval_key(tmp_path, toker):
    with open(tmp_path / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"],
                                 ["ret0", "msr2", "video2", "people dance"],
                                 ["ret1", "msr1", "video1", "a dog sits"]])
    dbs = run_msrvtt(tmp_path, toker, "--test_csv", str(tmp_path / "test.csv"))
    test = dbs["test"]
    assert test.ids == ["ret0", "ret1"]
    assert "sen_id" not in test.query_data["ret1"]
    assert test.query_data["ret1"]["clip_name"] == "video1"
    assert test.query2video == {"ret0": "video2", "ret1": "video1"}
    assert json.loads((tmp_path / "txt" / "msrvtt_test.db" / "video_ids.json").read_text()) \
        == ["video1", "video2"]

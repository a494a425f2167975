"""Tokenizer and preprocessing scripts, read back through the runtime readers (data.md §3-§5)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaTokenizer

from data.txt_db import CaptionTokLmdb, QaQueryTokLmdb, QueryTokLmdb, SubTokLmdb
from data.video_db import VideoFeatLmdb
from scripts import (
    collect_video_feature_paths,
    convert_videodb,
    prepro_query,
    prepro_sub,
    prepro_tvc,
)
from scripts.prepro_sub import match_subtitles, pseudo_subtitles
from utils.tokenizer import load_toker, roberta_tokenize, toker_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["Chase : That's all this is? He opens the door and leaves.",
          "A man & a woman walk into the room. She smiles at him.",
          "House : Who ordered the tests? Nobody did."] * 30


@pytest.fixture(scope="session")
def toker_dir(tmp_path_factory):
    """A tiny byte-level BPE in RoBERTa layout: specials at 0-3, '<|endoftext|>', '<mask>' last."""
    out = tmp_path_factory.mktemp("toker")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(out))
    vocab_path = out / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<mask>"] = len(vocab)
    vocab_path.write_text(json.dumps(vocab))
    return str(out)


@pytest.fixture(scope="session")
def toker(toker_dir):
    return load_toker(toker_dir)


META_ORDER = ["tokenizer", "BOS", "EOS", "SEP", "CLS", "PAD", "MASK", "UNK", "v_range"]


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return str(path)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers_and_tokenizers(toker_dir, toker):
    reference = RobertaTokenizer.from_pretrained(toker_dir, local_files_only=True)
    raw = ByteLevelBPETokenizer(os.path.join(toker_dir, "vocab.json"),
                                os.path.join(toker_dir, "merges.txt"))
    for text in ["Chase : That's all this is?", " House : Who ordered the tests?",
                 "zebra quux, 42!", "He opens the door."]:
        ids = roberta_tokenize(toker, text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text).ids
        assert ids and all(isinstance(i, int) for i in ids)


def test_upper_case_rule_and_html_unescape(toker):
    assert roberta_tokenize(toker, "THAT'S ALL!") == roberta_tokenize(toker, "that's all!")
    assert roberta_tokenize(toker, "THAT'S ALL!", lower_upper=False) != \
        roberta_tokenize(toker, "that's all!")
    assert roberta_tokenize(toker, "a &amp; b", unescape=True) == roberta_tokenize(toker, "a & b")
    assert roberta_tokenize(toker, "a &amp; b") != roberta_tokenize(toker, "a & b")


def test_toker_meta_special_ids(toker_dir, toker):
    vocab = json.loads(open(os.path.join(toker_dir, "vocab.json")).read())
    meta = toker_meta(toker)
    assert {k: meta[k] for k in ("BOS", "CLS", "PAD", "EOS", "SEP", "UNK")} == {
        "BOS": 0, "CLS": 0, "PAD": 1, "EOS": 2, "SEP": 2, "UNK": 3}
    assert meta["MASK"] == len(vocab) - 1
    assert meta["v_range"] == [vocab["."], vocab["<|endoftext|>"] + 1]


# ---------------------------------------------------------------- prepro_sub matching

WORKED = [{"text": "a", "start": 0.862, "end": 1.862}, {"text": "b", "start": 2.0, "end": 5.5},
          {"text": "c", "start": 5.0, "end": 7.9}, {"text": "d", "start": 12.0, "end": 13.0}]


def test_worked_example_of_spec():
    match = match_subtitles(WORKED, 1.5, 10)
    assert match["unique_sub2frames"] == [[0, [0]], [1, [1, 2]], [2, [3, 4, 5]], [3, [8]]]
    assert match["sub2frames"] == [[0, [0, 1]], [1, [1, 2, 3]], [2, [3, 4, 5]], [3, [8]]]
    assert match["unmatched_frames"] == [6, 7, 9]


def test_matching_quirks():
    late = match_subtitles([{"start": 0.0, "end": 2.9}, {"start": 15.0, "end": 16.0}], 1.5, 10)
    assert late["sub2frames"] == [[0, [0, 1]], [1, []]]  # starts after the video: no entry
    assert late["unique_sub2frames"] == [[0, [0, 1]], [1, []]]
    long_last = match_subtitles([{"start": 0.0, "end": 30.0}], 1.5, 40)
    assert long_last["sub2frames"] == [[0, list(range(11))]]  # > 16 s: first 11 frames
    assert long_last["unmatched_frames"] == list(range(11, 40))
    tie = match_subtitles([{"start": 1.5, "end": 3.0}, {"start": 1.5, "end": 3.0}], 1.5, 3)
    assert tie["unique_sub2frames"] == [[0, [1]], [1, []]]  # ties keep the lower index
    zero = match_subtitles([{"start": 0.0, "end": 1.4}, {"start": 3.2, "end": 3.2}], 1.5, 4)
    assert zero["unique_sub2frames"] == [[0, [0, 2]], [1, []]]  # all-zero IoU -> subtitle 0
    assert zero["unmatched_frames"] == [1, 3]


def test_matching_uses_float32_seconds_and_clipped_duration():
    # 4.4999999999 s is 4.5 in float32: frame 3 starts it (float64 would give frame 2)
    f32 = match_subtitles([{"start": 4.4999999999, "end": 6.0}], 1.5, 10)
    assert f32["sub2frames"] == [[0, [3]]]
    # the 16 s test uses min(end, fl * N): 15 s here, so all 20 candidates are kept,
    # and sub2frames is not clipped at N (unique_sub2frames is)
    clipped = match_subtitles([{"start": 0.0, "end": 30.0}], 1.5, 10)
    assert clipped["sub2frames"] == [[0, list(range(20))]]
    assert clipped["unique_sub2frames"] == [[0, list(range(10))]]
    # not the last subtitle: never cut to 11 frames
    first = match_subtitles([{"start": 0.0, "end": 30.0}, {"start": 31.0, "end": 32.0}], 1.5, 40)
    assert first["sub2frames"][0] == [0, list(range(20))]


def test_pseudo_subtitles_blocks_of_five():
    pseudo = pseudo_subtitles(12)
    assert pseudo["unique_sub2frames"] == [[0, [0, 1, 2, 3, 4]], [1, [5, 6, 7, 8, 9]],
                                           [2, [10, 11]]]
    assert pseudo["sub2frames"] == pseudo["unique_sub2frames"]
    assert pseudo["input_ids"] == [[], [], []] and pseudo["unmatched_frames"] == []


# ---------------------------------------------------------------- prepro_sub end to end


def run_prepro_sub(tmp_path, toker_dir, lines, vid2nframe, name="sub.db"):
    ann = write_lines(tmp_path / f"{name}.jsonl", lines)
    nframe = tmp_path / f"{name}_vid2nframe.json"
    nframe.write_text(json.dumps(vid2nframe))
    out = str(tmp_path / name)
    prepro_sub.main(["--annotation", ann, "--vid2nframe", str(nframe), "--frame_length", "1.5",
                     "--output", out, "--toker", toker_dir, "--task", "tv"])
    return out, ann, str(nframe)


def test_prepro_sub_writes_records_and_side_files(tmp_path, toker_dir, toker):
    subs = [dict(s, text=t) for s, t in zip(WORKED, [" Chase : A &amp; B", " HOUSE : WHO?",
                                                     " He opens the door.", " Nobody did."])]
    lines = [{"vid_name": "v1", "sub": subs}, {"vid_name": "v2", "sub": []},
             {"vid_name": "v3", "sub": [{"text": "x", "start": 0.5, "end": 10.0}]},
             {"vid_name": "v4", "sub": []}]
    out, ann, nframe = run_prepro_sub(tmp_path, toker_dir, lines,
                                      {"v1": 10, "v2": 7, "v3": 0, "v4": 0})
    meta_text = open(os.path.join(out, "meta.json")).read()
    meta = json.loads(meta_text)
    assert list(meta) == ["annotation", "vid2nframe", "frame_length", "output", "toker", "task",
                          *META_ORDER]
    assert meta_text.startswith('{\n    "annotation"')
    assert meta["frame_length"] == 1.5 and meta["task"] == "tv" and meta["toker"] == toker_dir
    assert meta["tokenizer"] == toker_dir and meta["v_range"] == toker_meta(toker)["v_range"]
    db = SubTokLmdb(out, 100)
    rec = db["v1"]
    tokens = [roberta_tokenize(toker, s["text"], unescape=True) for s in subs]
    assert rec["input_ids"] == tokens
    assert tokens[0] == roberta_tokenize(toker, " Chase : A & B")
    assert tokens[1] == roberta_tokenize(toker, " house : who?")
    assert rec["unique_sub2frames"] == [[0, [0]], [1, [1, 2]], [2, [3, 4, 5]], [3, [8]]]
    assert (rec["v_id"], rec["duration"], rec["vid_name"], rec["sub"]) == ("v1", 10, "v1", subs)
    sub_lens = [2, 3, 3, 1]
    assert rec["max_mtached_sub_len"] == max(len(t) + n for t, n in zip(tokens, sub_lens))
    assert db["v2"]["unique_sub2frames"] == [[0, [0, 1, 2, 3, 4]], [1, [5, 6]]]
    assert db["v3"]["duration"] == 6  # int(int(10.0) / 1.5) when vid2nframe gives 0
    assert {k: db["v4"][k] for k in ("input_ids", "unique_sub2frames", "sub2frames",
                                      "unmatched_frames", "duration", "max_mtached_sub_len")} \
        == {"input_ids": [], "unique_sub2frames": [], "sub2frames": [], "unmatched_frames": [],
            "duration": 0, "max_mtached_sub_len": 0}  # N = 0 and no subtitle: empty record
    assert db["v2"]["max_mtached_sub_len"] == 5 and db["v2"]["v_id"] == "v2"
    assert db.vid_sub2frame["v1"] == [(0, [0]), (1, [1, 2]), (2, [3, 4, 5]), (3, [8])]
    side = {f: json.load(open(os.path.join(out, f)))
            for f in ("vid2len.json", "vid2max_frame_sub_len.json", "sub_info.json")}
    assert side["vid2len.json"] == {"v1": 10, "v2": 7, "v3": 6, "v4": 0}
    assert list(side["vid2len.json"]) == ["v1", "v2", "v3", "v4"]  # annotation order
    assert side["vid2max_frame_sub_len.json"]["v1"] == rec["max_mtached_sub_len"]
    assert side["sub_info.json"]["v1"]["max_overlap_time"] == pytest.approx(0.5)
    with pytest.raises(FileExistsError, match="sub.db"):
        prepro_sub.main(["--annotation", ann, "--vid2nframe", nframe, "--output", out,
                         "--toker", toker_dir])


@pytest.mark.parametrize("lines, vid2nframe, error, match", [
    ([{"vid_name": "v", "sub": []}], {}, KeyError, "'v' is missing from --vid2nframe"),
    ([{"vid_name": "v", "sub": []}], {"v": 3.0}, TypeError, "not an int"),
    ([{"vid_name": "v", "sub": [{"text": "a", "start": 2.0, "end": 3.0},
                                {"text": "b", "start": 1.0, "end": 3.0}]}],
     {"v": 3}, ValueError, "not sorted"),
])
def test_prepro_sub_bad_inputs(tmp_path, toker_dir, lines, vid2nframe, error, match):
    with pytest.raises(error, match=match):
        run_prepro_sub(tmp_path, toker_dir, lines, vid2nframe)


# ---------------------------------------------------------------- prepro_query


def run_query(tmp_path, toker_dir, task, lines, name):
    ann = write_lines(tmp_path / f"{name}.jsonl", lines)
    out = str(tmp_path / name)
    prepro_query.main(["--annotation", ann, "--output", out, "--toker", toker_dir,
                       "--task", task])
    return out, ann


def test_prepro_query_tvr(tmp_path, toker_dir, toker):
    lines = [{"vid_name": "v1", "duration": 60.0, "ts": [1.5, 6.0], "desc": "HE OPENS THE DOOR.",
              "type": "v", "desc_id": 90200},
             {"vid_name": "v2", "duration": 30.0, "ts": [0.0, 3.0], "desc": "She smiles.",
              "type": "t", "desc_id": 7}]
    out, ann = run_query(tmp_path, toker_dir, "tvr", lines, "tvr_train.db")
    meta_text = open(os.path.join(out, "meta.json")).read()
    assert list(json.loads(meta_text)) == ["annotation", "output", "toker", "task", *META_ORDER]
    assert meta_text == json.dumps(json.loads(meta_text), indent=4)
    assert list(json.load(open(os.path.join(out, "id2len.json")))) == ["90200", "7"]
    db = QueryTokLmdb(out)
    rec = db["90200"]
    assert rec["input_ids"] == roberta_tokenize(toker, "he opens the door.")
    assert (rec["vid"], rec["target"], rec["qid"], rec["desc"]) == (
        "v1", [1.5, 6.0], "90200", "HE OPENS THE DOOR.")
    assert db.id2len == {"90200": len(rec["input_ids"]), "7": len(db["7"]["input_ids"])}
    assert db.query2video == {"90200": "v1", "7": "v2"}
    assert db.query_data["7"] == lines[1]
    assert open(os.path.join(out, "query_data.jsonl")).read() == \
        open(ann).read()  # raw lines joined with \n, no trailing newline
    test_lines = [{"duration": 60.0, "desc": "He opens the door.", "type": "v", "desc_id": 5}]
    out, _ = run_query(tmp_path, toker_dir, "tvr", test_lines, "tvr_test_public.db")
    db = QueryTokLmdb(out)
    assert db.query2video == {} and db["5"]["target"] is None and "vid" not in db["5"]


def test_prepro_query_tvqa_and_violin(tmp_path, toker_dir, toker):
    qa = {"qid": 12, "q": "Who opens the door?", "a0": "Chase", "a1": "House", "a2": "Nobody",
          "a3": "She", "a4": "He", "answer_idx": 4, "vid_name": "v1", "ts": "60.32-70.15",
          "show_name": "House M.D."}
    out, _ = run_query(tmp_path, toker_dir, "tvqa", [qa], "tvqa_val.db")
    db = QaQueryTokLmdb(out)
    rec = db["12"]
    texts = [qa[k] for k in ("q", "a0", "a1", "a2", "a3", "a4")]
    assert rec["input_ids"] == [roberta_tokenize(toker, t) for t in texts]
    assert (rec["vid"], rec["ts"], rec["target"], rec["qid"]) == ("v1", "60.32-70.15", 4, "12")
    assert json.load(open(os.path.join(out, "id2len.json"))) == {
        "12": [len(ids) for ids in rec["input_ids"]]}
    assert db.query2video == {"12": "v1"}
    st = {"desc_id": "s01-3-1", "desc": "She smiles.", "vid_name": "v9", "label": 1}
    out, _ = run_query(tmp_path, toker_dir, "violin", [st], "violin_train.db")
    rec = QaQueryTokLmdb(out)["s01-3-1"]
    assert (rec["target"], rec["vid"], rec["qid"]) == (1, "v9", "s01-3-1")
    with pytest.raises(KeyError, match="line 1 lacks the field 'a3'"):
        bad = {k: v for k, v in qa.items() if k != "a3"}
        run_query(tmp_path, toker_dir, "tvqa", [bad], "bad.db")


# ---------------------------------------------------------------- prepro_tvc


def test_prepro_tvc(tmp_path, toker_dir, toker):
    subs = [{"vid_name": "v1", "sub": [{"text": "a", "start": 0.0, "end": 2.0},
                                       {"text": "b", "start": 2.5, "end": 6.0},
                                       {"text": "c", "start": 9.0, "end": 20.0},
                                       {"text": "d", "start": 3.0, "end": 5.0},
                                       {"text": "e", "start": 2.0, "end": 10.0},
                                       {"text": "f", "start": 10.0, "end": 11.0}]}]
    lines = [{"vid_name": "v1", "clip_id": 31, "ts": [2.0, 10.0], "duration": 60.0,
              "descs": [{"desc": "HE OPENS THE DOOR.", "desc_id": 101, "type": "v"},
                        {"desc": "She smiles.", "desc_id": 102, "type": "t"}]},
             {"vid_name": "v1", "clip_id": 32, "ts": [10.0, 15.0], "duration": 60.0}]
    out = str(tmp_path / "tvc_train.db")
    prepro_tvc.main(["--annotation", write_lines(tmp_path / "tvc.jsonl", lines),
                     "--subtitles", write_lines(tmp_path / "subs.jsonl", subs),
                     "--output", out, "--toker", toker_dir])
    db = CaptionTokLmdb(out)
    cap = db["101"]
    tokens = roberta_tokenize(toker, "HE OPENS THE DOOR.", lower_upper=False)
    assert tokens != roberta_tokenize(toker, "he opens the door.")
    assert cap["input_ids"].tolist() == [db.bos] + tokens
    assert cap["tgt_ids"].tolist() == tokens + [db.eos]
    assert (cap["clip_id"], cap["vid_name"], cap["type"]) == ("31", "v1", "v")
    # strict inequalities: sub 0 ends at st, sub 4 spans exactly [st, ed], sub 5 starts at ed
    assert cap["sub_indices"] == [1, 2, 3]
    clip = db.get_clip(31)
    assert clip["captions"][1] == {"id": 102, "input_ids": roberta_tokenize(
        toker, "She smiles.", lower_upper=False), "text": "She smiles."}
    assert db.get_clip("32")["captions"] == [] and db.get_clip("32")["sub_indices"] == [2, 5]
    assert (db.cap2vid, db.vid2caps) == ({"101": "v1", "102": "v1"}, {"v1": ["101", "102"]})
    assert (db.clip2vid, db.vid2clips) == ({"31": "v1", "32": "v1"}, {"v1": ["31", "32"]})
    assert db.id2len == {}
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["subtitles"].endswith("subs.jsonl")
    assert list(meta) == ["annotation", "subtitles", "output", "toker", *META_ORDER]


# ---------------------------------------------------------------- video features


def write_npz(path, n, dim, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    feats = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)
    np.savez(path, features=feats)
    return feats


@pytest.fixture
def feature_dir(tmp_path):
    root = tmp_path / "feats"
    arrays = {}
    for vid, folder, n_sf, n_rn, seed in (("vA", "f1", 5, 6, 0), ("vB", "f2", 3, 3, 1)):
        arrays[vid] = (write_npz(str(root / "slowfast_features" / folder / f"{vid}.npz"),
                                 n_sf, 2304, seed),
                       write_npz(str(root / "resnet_features" / folder / f"{vid}.npz"),
                                 n_rn, 2048, seed + 10))
    write_npz(str(root / "slowfast_features" / "f2" / "vC.npz"), 4, 2304, 3)  # no resnet
    return str(root), arrays


def collect_and_convert(tmp_path, feature_dir, *extra, nproc="1"):
    out = str(tmp_path / "video_db")
    collect_video_feature_paths.main(["--feature_dir", feature_dir, "--output", out,
                                      "--dataset", "tv", "--nproc", nproc])
    info = os.path.join(out, "tv", "video_feat_info.pkl")
    convert_videodb.main(["--vfeat_info_file", info, "--output", out, "--dataset", "tv",
                          "--frame_length", "1.5", "--nproc", nproc, *extra])
    return out


def test_collect_video_feature_paths(tmp_path, feature_dir):
    root, _ = feature_dir
    out = str(tmp_path / "video_db")
    collect_video_feature_paths.main(["--feature_dir", root, "--output", out,
                                      "--dataset", "tv", "--nproc", "1"])
    with open(os.path.join(out, "tv", "video_feat_info.pkl"), "rb") as f:
        info = pickle.load(f)
    sf = os.path.join(root, "slowfast_features", "f1", "vA.npz")
    assert info["vA"] == (5, sf, os.path.join(root, "resnet_features", "f1", "vA.npz"), "f1")
    assert info["vC"][:1] == (0,) and info["vC"][2] == "" and info["vC"][3] == "f2"
    with open(os.path.join(out, "tv", "failed_resnet_files.pkl"), "rb") as f:
        assert pickle.load(f) == ["f2/vC"]
    assert not os.path.exists(os.path.join(out, "tv", "failed_slowfast_files.pkl"))


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_convert_videodb_msgpack(tmp_path, feature_dir, nproc):
    root, arrays = feature_dir
    out = collect_and_convert(tmp_path, root, nproc=nproc)
    tv = os.path.join(out, "tv")
    assert os.path.isdir(os.path.join(tv, "resnet_slowfast_1.5"))
    assert json.load(open(os.path.join(tv, "id2nframe.json"))) == {"vA": 5, "vB": 3}
    assert json.load(open(os.path.join(tv, "corrupted.json"))) == ["vC"]
    reader = VideoFeatLmdb(tv, "resnet_slowfast", 1.5, False, 100)
    sf, rn = arrays["vA"]
    expected = np.concatenate([rn[:5], sf[:5]], axis=1).astype(np.float32)
    assert reader["vA"].dtype == torch.float32
    assert torch.equal(reader["vA"], torch.from_numpy(expected))


def test_convert_videodb_compress_chunks_and_min_merge(tmp_path, feature_dir):
    root, arrays = feature_dir
    tv = os.path.join(str(tmp_path / "video_db"), "tv")
    os.makedirs(tv)
    json.dump({"vA.0": 2, "vA.1": 1, "vA.2": 3, "vB.0": 1},
              open(os.path.join(tv, "id2nframe.json"), "w"))
    collect_and_convert(tmp_path, root, "--compress", "--clip_interval", "3")
    # chunks of int(3 / 1.5) = 2 frames: vA (5 frames) -> 2, 2, 1; vB (3) -> 2, 1.
    # Existing keys take min(old, new); converted keys absent from the file are not added.
    assert json.load(open(os.path.join(tv, "id2nframe.json"))) == {
        "vA.0": 2, "vA.1": 1, "vA.2": 1, "vB.0": 1}
    reader = VideoFeatLmdb(tv, "resnet_slowfast", 1.5, True, 100)
    sf, rn = arrays["vA"]
    full = np.concatenate([rn[:5], sf[:5]], axis=1).astype(np.float32)
    assert torch.equal(reader["vA.1"], torch.from_numpy(full[2:3]))  # id2nframe caps at 1
    assert len(reader.db) == 5 and reader.db.get("vA.2") is not None
    assert torch.equal(reader["vA.0"], torch.from_numpy(full[:2]))
    with pytest.raises(FileExistsError, match="resnet_slowfast_1.5_compressed"):
        collect_and_convert(tmp_path, root, "--compress", "--clip_interval", "3")


def test_convert_videodb_existing_key_not_produced_raises(tmp_path, feature_dir):
    root, _ = feature_dir
    tv = os.path.join(str(tmp_path / "video_db"), "tv")
    os.makedirs(tv)
    json.dump({"vA": 5, "vC": 4}, open(os.path.join(tv, "id2nframe.json"), "w"))
    with pytest.raises(KeyError, match="'vC'"):
        collect_and_convert(tmp_path, root)


def test_convert_videodb_stores_other_widths_resnet_first(tmp_path, caplog):
    root = tmp_path / "small"
    sf = write_npz(str(root / "slowfast_features" / "f" / "v.npz"), 4, 3, 5)
    rn = write_npz(str(root / "resnet_features" / "f" / "v.npz"), 3, 2, 6)
    with caplog.at_level("WARNING"):
        out = collect_and_convert(tmp_path, str(root))
    assert "1 videos stored with a feature width other than 4352" in caplog.text
    reader = VideoFeatLmdb(os.path.join(out, "tv"), "resnet_slowfast", 1.5, False, 100)
    expected = np.concatenate([rn[:3], sf[:3]], axis=1).astype(np.float32)
    assert torch.equal(reader["v"], torch.from_numpy(expected))

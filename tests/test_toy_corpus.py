"""The toy corpus generator, its tokenizer and the full toy DB build (scripts/toy/)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.toy.build import make_corpus
from scripts.toy.features import RESNET_DIM, SLOWFAST_DIM, make_prototypes
from scripts.toy.text import TVQA, lexicon
from scripts.toy.world import ACTIONS, CHARACTERS, LOCATIONS, OBJECTS, stream_rng
from tests.conftest import TOY_SEED

DATASETS = ("tv", "violin", "didemo", "msrvtt")


def world(raw: Path) -> dict:
    return json.loads((raw / "world.json").read_text())["videos"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def load_npz(raw: Path, kind: str, ds: str, vid: str) -> np.ndarray:
    with np.load(raw / "features" / f"{kind}_features" / ds / f"{vid}.npz") as npz:
        return npz["features"]


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".npz"}


def test_same_seed_same_corpus_other_seed_differs(toy_raw, tmp_path):
    again = make_corpus(tmp_path / "again", seed=TOY_SEED, size="tiny")
    assert corpus_files(again) == corpus_files(toy_raw)
    vid = sorted(world(toy_raw)["tv"])[0]
    for kind in ("resnet", "slowfast"):
        np.testing.assert_array_equal(load_npz(again, kind, "tv", vid),
                                      load_npz(toy_raw, kind, "tv", vid))
    other = make_corpus(tmp_path / "other", seed=TOY_SEED + 1, size="tiny")
    assert world(other) != world(toy_raw)


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_corpus(tmp_path / "x", seed=0)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_tokenizer_keeps_roberta_special_ids(toy_raw):
    from utils.tokenizer import load_toker, roberta_tokenize, toker_meta

    toker = load_toker(str(toy_raw / "tokenizer"))
    assert toker_meta(toker) == {"BOS": 0, "CLS": 0, "PAD": 1, "EOS": 2, "SEP": 2, "UNK": 3,
                                 "MASK": 50264, "v_range": [4, 50261]}
    vocab = toker.get_vocab()
    assert len(vocab) == 50265 and max(vocab.values()) == 50264 < 50272
    first_filler = min(i for t, i in vocab.items() if t.startswith("<unused"))
    assert vocab["<|endoftext|>"] == 50260 and first_filler < 1000
    for word in lexicon():
        ids = roberta_tokenize(toker, f"x {word}")[1:]
        assert len(ids) == 1 and 3 < ids[0] < first_filler, word
    sub = read_jsonl(toy_raw / "tvqa_preprocessed_subtitles.jsonl")[0]["sub"][0]["text"]
    assert all(3 < i < first_filler for i in roberta_tokenize(toker, sub, unescape=True))


def test_tokenizer_identical_in_a_fresh_process(toy_raw, tmp_path):
    code = ("import sys; from scripts.toy.tokenizer import build_tokenizer; "
            "build_tokenizer(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok")], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tok" / name).read_bytes() == (toy_raw / "tokenizer" / name).read_bytes()


def test_feature_files_shapes_dtypes_and_frame_counts(toy_raw):
    videos = world(toy_raw)
    assert {ds: len(v) for ds, v in videos.items()} == {"tv": 12, "violin": 8, "didemo": 8,
                                                        "msrvtt": 8}
    vid2nframe = json.loads((toy_raw / "tv_vid2nframe.json").read_text())
    assert vid2nframe == {v: w["n_frames"] for v, w in videos["tv"].items()}
    for ds in DATASETS:
        for vid, w in videos[ds].items():
            slowfast, resnet = (load_npz(toy_raw, k, ds, vid) for k in ("slowfast", "resnet"))
            assert slowfast.dtype == resnet.dtype == np.float16
            assert slowfast.shape == (w["n_frames"], SLOWFAST_DIM)
            assert resnet.shape[1] == RESNET_DIM and resnet.shape[0] - w["n_frames"] in (0, 1)
    for ds in ("tv", "violin"):  # short clips keep the demo's QA/VIOLIN CPU steps cheap
        for w in videos[ds].values():
            assert 9 <= w["n_frames"] <= 20 and 3 <= len(w["scenes"]) <= 4
            assert all(3 <= sc["end"] - sc["start"] <= 5 for sc in w["scenes"])
    assert all(5 <= w["n_frames"] <= 15 and w["fi"] == 2.0 for w in videos["msrvtt"].values())


def test_frames_carry_who_where_what_in_time(toy_raw):
    """Nearest prototype recovers each frame's character, location and action."""
    protos = make_prototypes(stream_rng(TOY_SEED, 0))
    hits = total = 0
    for vid, w in world(toy_raw)["tv"].items():
        resnet = load_npz(toy_raw, "resnet", "tv", vid).astype(np.float32)
        slowfast = load_npz(toy_raw, "slowfast", "tv", vid).astype(np.float32)
        for sc in w["scenes"]:
            frames = slice(sc["start"], sc["end"])
            hits += np.sum((resnet[frames] @ protos.char.T).argmax(1) == sc["char"])
            hits += np.sum((resnet[frames] @ protos.loc.T).argmax(1) == sc["loc"])
            hits += np.sum((slowfast[frames] @ protos.action.T).argmax(1) == sc["action"])
            total += 3 * (sc["end"] - sc["start"])
        assert all(a["action"] != b["action"] for a, b in zip(w["scenes"], w["scenes"][1:]))
        assert len({sc["char"] for sc in w["scenes"]}) == len(w["scenes"])
    assert hits / total > 0.99


def test_subtitles_state_the_object_inside_the_scene_with_gaps(toy_raw):
    subs = {x["vid_name"]: x["sub"]
            for x in read_jsonl(toy_raw / "tvqa_preprocessed_subtitles.jsonl")}
    for vid, w in world(toy_raw)["tv"].items():
        starts = [s["start"] for s in subs[vid]]
        assert starts == sorted(starts)
        covered = sum(s["end"] - s["start"] for s in subs[vid])
        assert covered < 0.8 * w["n_frames"] * w["fi"]
        for sc in w["scenes"]:
            lo, hi = sc["start"] * w["fi"], sc["end"] * w["fi"]
            inside = [s["text"] for s in subs[vid] if lo <= s["start"] and s["end"] <= hi]
            assert inside[0].startswith(f"{CHARACTERS[sc['char']]} : ")
            assert OBJECTS[sc["obj"]] in inside[0]


def scene_at(w: dict, ts) -> dict:
    st, ed = ts
    return next(sc for sc in w["scenes"]
                if (sc["start"] * w["fi"], sc["end"] * w["fi"]) == (st, ed))


def test_tvr_and_tvqa_point_at_scenes_with_absent_distractors(toy_raw):
    videos = world(toy_raw)["tv"]
    for q in read_jsonl(toy_raw / "tvr_train_release.jsonl"):
        sc = scene_at(videos[q["vid_name"]], q["ts"])
        assert CHARACTERS[sc["char"]] in q["desc"] and q["ts"][1] - q["ts"][0] >= 3 * 1.5
        assert (OBJECTS[sc["obj"]] in q["desc"]) == (q["type"] in ("t", "vt"))
        assert (LOCATIONS[sc["loc"]] in q["desc"]) == (q["type"] in ("v", "vt"))
    asked = []
    for q in read_jsonl(toy_raw / "tvqa_train.jsonl"):
        sc = scene_at(videos[q["vid_name"]], [float(x) for x in q["ts"].split("-")])
        answer = q[f"a{q['answer_idx']}"]
        assert q["q"] == f"Who is {ACTIONS[sc['action']][2]} in the {LOCATIONS[sc['loc']]}?"
        assert answer == f"{CHARACTERS[sc['char']]}." and len({q[f"a{k}"] for k in range(5)}) == 5
        on_screen = {f"{CHARACTERS[x['char']]}." for x in videos[q["vid_name"]]["scenes"]}
        distractors = {q[f"a{k}"] for k in range(5)} - {answer}
        assert not distractors & on_screen  # distractors name characters absent from the clip
        asked.append((q["vid_name"], q["ts"]))
    # one question about every scene of every labelled clip
    scenes = [(v, w["scenes"]) for v, w in videos.items() if w["split"] == "train"]
    assert len(asked) == len(set(asked)) == sum(len(s) for _, s in scenes) * len(TVQA)
    assert "answer_idx" not in read_jsonl(toy_raw / "tvqa_test_public.jsonl")[0]
    assert "ts" not in read_jsonl(toy_raw / "tvr_test_public_release.jsonl")[0]


def fact_words(sc: dict) -> tuple[str, ...]:
    """A scene's character, action (gerund), place and object as they appear in statements."""
    return (CHARACTERS[sc["char"]], ACTIONS[sc["action"]][2], LOCATIONS[sc["loc"]],
            OBJECTS[sc["obj"]])


def matching_scenes(text: str, scenes: list[dict]) -> list[dict]:
    return [sc for sc in scenes if all(w in text for w in fact_words(sc))]


def scene_words(scenes: list[dict]) -> set[str]:
    return {w for sc in scenes for w in fact_words(sc)}


FIELD_WORDS = {"char": set(CHARACTERS), "action": {a[2] for a in ACTIONS},
               "loc": set(LOCATIONS), "obj": set(OBJECTS)}


def test_violin_false_statement_describes_an_absent_moment(toy_raw):
    videos = world(toy_raw)["violin"]
    clips = json.loads((toy_raw / "violin" / "violin_annotation.json").read_text())
    for clip in clips.values():
        scenes = videos[clip["file"]]["scenes"]
        for true, false in clip["statement"]:
            assert matching_scenes(true, scenes) and not matching_scenes(false, scenes)
            words = set(re.findall(r"[A-Za-z]+", false))
            changed = words - set(re.findall(r"[A-Za-z]+", true))
            # character, action and place all changed to values absent from the clip
            assert len(changed) == 3 and not changed & scene_words(scenes)
            assert all(changed & FIELD_WORDS[f] for f in ("char", "action", "loc"))
            assert words & FIELD_WORDS["obj"] <= scene_words(scenes)  # the object stays


def test_didemo_times_are_segment_indices_around_the_scene(toy_raw):
    videos = world(toy_raw)["didemo"]
    anns = json.loads((toy_raw / "didemo" / "train_data.json").read_text())
    for ann in anns:
        w = videos[ann["video"].removesuffix(".mov")]
        assert len(ann["times"]) == 4
        n_seg = int(((w["n_frames"] - 0.5) * w["fi"]) // 5) + 1
        assert all(0 <= a <= b < n_seg for a, b in ann["times"])


def videos_of(raw: Path, ds: str, split: str) -> list[dict]:
    return [w for w in world(raw)[ds].values() if w["split"] == split]


def test_built_tv_text_dbs_hold_items_per_scene(toy_raw, toy_dbs):
    from data.txt_db import CaptionTokLmdb, QaQueryTokLmdb, QueryTokLmdb

    txt = toy_dbs / "txt_db"
    for split in ("train", "val", "test_public"):
        n_scenes = sum(len(w["scenes"]) for w in videos_of(toy_raw, "tv", split))
        assert len(QueryTokLmdb(str(txt / f"tvr_{split}.db")).ids) == n_scenes
        assert len(QaQueryTokLmdb(str(txt / f"tvqa_{split}.db")).ids) == len(TVQA) * n_scenes
    test_ids = json.loads((txt / "tvr_test_public.db" / "video_ids.json").read_text())
    assert test_ids == sorted(v for v, w in world(toy_raw)["tv"].items()
                              if w["split"] == "test_public")
    for split in ("train", "val"):
        caps = CaptionTokLmdb(str(txt / f"tvc_{split}.db"))
        assert len(caps.vid2caps) == len(videos_of(toy_raw, "tv", split))
    assert (txt / "tvc_val_release.jsonl").is_file()
    assert (txt / "tvc_test_public_release.jsonl").is_file()
    assert json.loads((txt / "pretrain_splits" / "tv_train.json").read_text()) == \
        sorted(v for v, w in world(toy_raw)["tv"].items() if w["split"] == "train")


def test_built_violin_didemo_msrvtt_dbs(toy_raw, toy_dbs):
    from data.txt_db import QaQueryTokLmdb, QueryTokLmdb, VrQueryTokLmdb

    txt = toy_dbs / "txt_db"
    for split in ("train", "val", "test"):
        n_clips = len(videos_of(toy_raw, "violin", split))
        assert len(QaQueryTokLmdb(str(txt / f"violin_{split}.db")).ids) == 6 * n_clips
        didemo = QueryTokLmdb(str(txt / f"didemo_{split}.db"))
        assert didemo.ids and all(len(didemo.query_data[q]["ts"]) == 4 for q in didemo.ids)
        assert VrQueryTokLmdb(str(txt / f"msrvtt_{split}.db")).query_data
    test_keys = VrQueryTokLmdb(str(txt / "msrvtt_test.db")).ids
    assert test_keys == [f"ret{k}" for k in range(len(videos_of(toy_raw, "msrvtt", "test")))]


def test_built_video_and_subtitle_dbs_match_the_corpus(toy_raw, toy_dbs):
    from data.txt_db import SubTokLmdb
    from data.video_db import VideoFeatLmdb

    videos = world(toy_raw)
    for ds, fi, compress in (("tv", 1.5, False), ("violin", 1.5, True), ("didemo", 1.5, False),
                             ("msrvtt", 2, False)):
        reader = VideoFeatLmdb(str(toy_dbs / "video_db" / ds), frame_interval=fi,
                               compress=compress, max_clip_len=100)
        assert reader.name2nframe == {v: w["n_frames"] for v, w in videos[ds].items()}
        subs = SubTokLmdb(str(toy_dbs / "txt_db" / f"{ds}_subtitles.db"), 100)
        assert set(subs.id2len) == set(videos[ds])
        name = sorted(videos[ds])[0]
        n = videos[ds][name]["n_frames"]
        expected = np.concatenate([load_npz(toy_raw, "resnet", ds, name)[:n],
                                   load_npz(toy_raw, "slowfast", ds, name)], axis=1)
        np.testing.assert_array_equal(reader[name].numpy(), expected.astype(np.float32))
    assert (toy_dbs / "video_db" / "msrvtt" / "resnet_slowfast_2").is_dir()
    assert (toy_dbs / "txt_db" / "tv_subtitles.db" / "vid2dur_idx.json").read_text() == \
        (toy_raw / "tvr_video2dur_idx.json").read_text()
    assert not (toy_dbs.parent / "dbs.partial").exists()


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    """The demo-size corpus (a few seconds: features of ~1,700 short clips)."""
    return make_corpus(tmp_path_factory.mktemp("demo") / "raw", seed=0, size="demo")


def test_demo_corpus_few_labels_many_unlabelled_tv_videos(demo_raw):
    """Low-label fine-tuning, larger unlabelled pre-training corpus (scripts/toy/README.md)."""
    from scripts.toy.build import SIZES

    videos = world(demo_raw)
    tv = videos["tv"]
    by_split = {s: {v for v, w in tv.items() if w["split"] == s}
                for s in ("train", "val", "test_public", "unlabelled")}
    assert len(by_split["train"]) == SIZES["demo"]["tv"].labelled == 16
    assert len(by_split["val"]) == len(by_split["test_public"]) == 100
    assert len(by_split["unlabelled"]) == 1000 - 216
    for name in ("tvr_train_release", "tvc_train_release", "tvqa_train"):
        lines = read_jsonl(demo_raw / f"{name}.jsonl")
        assert {x["vid_name"] for x in lines} == by_split["train"], name
    pretrain = json.loads((demo_raw / "pretrain_splits" / "tv_train.json").read_text())
    assert set(pretrain) == by_split["train"] | by_split["unlabelled"]
    dur_idx = json.loads((demo_raw / "tvr_video2dur_idx.json").read_text())
    assert set(dur_idx) == {"train", "val", "test_public"}
    subs = read_jsonl(demo_raw / "tvqa_preprocessed_subtitles.jsonl")
    assert {x["vid_name"] for x in subs} == set(tv)           # unlabelled videos have subtitles
    for ds in ("violin", "didemo", "msrvtt"):
        splits = [w["split"] for w in videos[ds].values()]
        assert splits.count("train") == 16 and "unlabelled" not in splits, ds
    asr = read_jsonl(demo_raw / "didemo" / "didemo_asr.jsonl")
    assert {x["vid_name"] for x in asr} <= set(videos["didemo"])


def test_query_words_appear_in_the_same_token_form_in_subtitles(demo_raw):
    """A byte-level BPE gives "Alice", " Alice" and "alice" unrelated ids: every name, action
    and place token of the task texts must occur in that same form in some subtitle, or
    pre-training on subtitles could not teach it."""
    from utils.tokenizer import load_toker

    toker = load_toker(str(demo_raw / "tokenizer"))
    sub_tokens = set()
    for line in read_jsonl(demo_raw / "tvqa_preprocessed_subtitles.jsonl"):
        for s in line["sub"]:
            sub_tokens.update(toker.tokenize(s["text"]))
    words = set(CHARACTERS) | {a[2] for a in ACTIONS} | set(LOCATIONS)
    texts = [q["desc"] for q in read_jsonl(demo_raw / "tvr_val_release.jsonl")]
    texts += [q[f"a{k}"] for q in read_jsonl(demo_raw / "tvqa_val.jsonl") for k in range(5)]
    texts += [d["description"] for d in json.loads(
        (demo_raw / "didemo" / "val_data.json").read_text())]
    texts += [s["caption"] for s in json.loads(
        (demo_raw / "msrvtt" / "videodatainfo.json").read_text())["sentences"]]
    task_tokens = {t for text in texts for t in toker.tokenize(text) if t.lstrip("Ġ") in words}
    assert task_tokens and task_tokens <= sub_tokens, sorted(task_tokens - sub_tokens)[:10]
    # the speaker prefix names the on-screen character in the sentence-initial form
    assert set(CHARACTERS) <= sub_tokens and {f"Ġ{c}" for c in CHARACTERS} <= sub_tokens


def test_labelled_override_keeps_the_pretraining_corpus(demo_raw, tmp_path):
    """A label curve (``labelled=N``) moves labels onto unlabelled videos: the videos, the
    pre-training split, the subtitles and the TV features stay the demo corpus's, so a
    checkpoint pre-trained on the demo corpus fits every label count. Validation asks about the
    same videos (its distractors are drawn after the training labels, so they differ)."""
    more = make_corpus(tmp_path / "more", seed=0, size="demo", labelled=64)
    for name in ("tvqa_preprocessed_subtitles.jsonl", "pretrain_splits/tv_train.json",
                 "pretrain_splits/tv_val.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (more / name).read_bytes() == (demo_raw / name).read_bytes(), name
    vid = sorted(world(demo_raw)["tv"])[5]
    np.testing.assert_array_equal(load_npz(more, "resnet", "tv", vid),
                                  load_npz(demo_raw, "resnet", "tv", vid))
    labelled = {v for v, w in world(more)["tv"].items() if w["split"] == "train"}
    assert len(labelled) == 64
    assert labelled > {v for v, w in world(demo_raw)["tv"].items() if w["split"] == "train"}
    assert {q["vid_name"] for q in read_jsonl(more / "tvqa_train.jsonl")} == labelled
    val = [[(q["vid_name"], q["ts"]) for q in read_jsonl(raw / "tvqa_val.jsonl")]
           for raw in (more, demo_raw)]
    assert val[0] == val[1]
    assert json.loads((more / "world.json").read_text())["labelled"] == 64
    assert "labelled" not in json.loads((demo_raw / "world.json").read_text())


def test_labelled_override_caps_at_the_training_videos_and_refuses_zero(tmp_path, capsys):
    raw = make_corpus(tmp_path / "all", seed=TOY_SEED, size="tiny", labelled=10_000)
    assert "the 'tiny' tv corpus has 8 training videos; all 8 are labelled" in \
        capsys.readouterr().out
    assert "unlabelled" not in {w["split"] for w in world(raw)["tv"].values()}
    with pytest.raises(ValueError, match="--labelled 0"):
        make_corpus(tmp_path / "none", seed=TOY_SEED, size="tiny", labelled=0)
    assert not (tmp_path / "none").exists()

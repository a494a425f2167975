"""Moment search (issue 19): index build from the toy DBs, the Python API, the CLI.

A tiny TVR model is fine-tuned for two updates on the toy corpus; the index built over the val
videos must rank, for every val query, the moments eval_vcmr.py ranks for it (same videos,
spans and scores, NMS included), and the index must be resumable, incremental and tied to its
checkpoint.
"""
from __future__ import annotations

import json

import pytest
from helpers_train import ROOT, write_config

import eval_vcmr
import search_moments
import train_vcmr
from data.vcmr import get_video_ids
from search import Moment, MomentIndex, SearchIndexError
from search import build as build_mod

BATCH = 1  # video batch of both the index and eval_vcmr.py: one shard per video


@pytest.fixture(scope="module")
def tvr_run(tmp_path_factory, toy_dbs):
    """A TVR run fine-tuned for 2 updates from scratch (no validation), as training leaves it."""
    tmp = tmp_path_factory.mktemp("search_run")
    cfg = write_config(tmp, "train-tvr-demo.json", toy_dbs, train_batch_size=4,
                       num_train_steps=2, valid_steps=1000, save_steps=2, warmup_steps=1,
                       hard_negtiave_start_step=[1000])
    out = tmp / "run"
    train_vcmr.main(["--config", str(cfg), "--output_dir", str(out)])
    ckpts = sorted((out / "ckpt").glob("model_step_2*.pt"))
    assert ckpts, list((out / "ckpt").iterdir())
    return out, ckpts[-1]


def build_argv(dbs, run, ckpt, out, video_ids=None, extra=()):
    argv = ["--video_db", str(dbs / "video_db" / "tv"),
            "--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"),
            "--model_dir", str(run), "--ckpt", str(ckpt), "--out", str(out),
            "--video_batch_size", str(BATCH), "--device", "cpu", *extra]
    if video_ids is not None:
        argv += ["--video_ids", str(video_ids)]
    return argv


@pytest.fixture(scope="module")
def val_index(tmp_path_factory, toy_dbs, tvr_run):
    run, ckpt = tvr_run
    tmp = tmp_path_factory.mktemp("search_index")
    ids = tmp / "val_ids.json"
    ids.write_text(json.dumps(get_video_ids(str(toy_dbs / "txt_db" / "tvr_val.db"))))
    build_mod.main(build_argv(toy_dbs, run, ckpt, tmp / "index", ids))
    return tmp / "index", ids


def eval_lists(dbs, run, ckpt):
    """eval_vcmr.py's VCMR list per query description: [(video, st, ed, score), ...]."""
    _, merged = eval_vcmr.main([
        "--query_txt_db", str(dbs / "txt_db" / "tvr_val.db"), "--split", "val",
        "--vfeat_db", str(dbs / "video_db" / "tv"),
        "--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"), "--output_dir", str(run),
        "--checkpoint", str(ckpt), "--n_workers", "0", "--batch_size", "4",
        "--vcmr_eval_video_batch_size", str(BATCH)])
    idx2vid = {i: v for v, i in merged["video2idx"].items()}
    queries = {str(json.loads(line)["desc_id"]): json.loads(line)["desc"] for line in
               (dbs / "txt_db" / "tvr_val.db" / "query_data.jsonl").read_text().splitlines()}
    return {queries[str(e["desc_id"])]: [(idx2vid[v], st, ed, s) for v, st, ed, s
                                          in e["predictions"]] for e in merged["VCMR"]}


def test_index_ranks_what_eval_vcmr_ranks(toy_dbs, tvr_run, val_index):
    run, ckpt = tvr_run
    expected = eval_lists(toy_dbs, run, ckpt)
    index = MomentIndex.load(val_index[0])
    assert index.videos() == sorted(json.loads(val_index[1].read_text()))
    assert len(expected) >= 5
    for query, rows in expected.items():
        got = index.search(query, top_k=len(rows) + 5)
        assert len(got) == len(rows), query
        assert [(m.video, m.start, m.end) for m in got] == [r[:3] for r in rows], query
        assert [m.score for m in got] == pytest.approx([r[3] for r in rows], rel=1e-5)
        assert [m.rank for m in got] == list(range(1, len(rows) + 1))
    top = index.search(next(iter(expected)), top_k=3)
    assert len(top) == 3 and all(isinstance(m, Moment) and m.path is None for m in top)
    assert index.frame_interval == 1.5
    assert index.video_path(top[0].video) is None



def test_cli_prints_a_table(val_index, capsys):
    query = "Felix is running in the beach and talks about the key."
    moments = search_moments.main(["--index", str(val_index[0]), query, "--top_k", "3",
                                   "--subtitles"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "video", "start", "end", "score"]
    rows = [line.split() for line in lines[1:] if not line.strip().startswith("|")]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [(r[1], float(r[2]), float(r[3])) for r in rows] == [
        (m.video, round(m.start, 2), round(m.end, 2)) for m in moments]


def test_incremental_resumable_and_tied_to_its_checkpoint(tmp_path, toy_dbs, tvr_run,
                                                          monkeypatch):
    import torch

    run, ckpt = tvr_run
    all_ids = sorted(json.loads((toy_dbs / "video_db" / "tv" / "id2nframe.json").read_text()))
    first = tmp_path / "first.json"
    first.write_text(json.dumps(all_ids[:2]))
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    build_mod.main(build_argv(toy_dbs, run, ckpt, grown, first))
    shard0 = (grown / "shards" / "00000.pt").stat().st_mtime_ns
    calls = []
    real = build_mod.write_shard

    def interrupted(*args):  # the build dies after two more shards
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2])
        real(*args)

    monkeypatch.setattr(build_mod, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_mod.main(build_argv(toy_dbs, run, ckpt, grown))
    monkeypatch.setattr(build_mod, "write_shard", real)
    assert len(json.loads((grown / "index.json").read_text())["videos"]) == 4
    meta = build_mod.main(build_argv(toy_dbs, run, ckpt, grown))  # resumes, encodes the rest
    assert sorted(meta["videos"]) == all_ids
    assert (grown / "shards" / "00000.pt").stat().st_mtime_ns == shard0
    assert len(list((grown / "shards").glob("*.pt"))) == len(all_ids)
    build_mod.main(build_argv(toy_dbs, run, ckpt, fresh))
    a, b = MomentIndex.load(grown), MomentIndex.load(fresh)
    assert a.videos() == b.videos() == all_ids
    assert torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks)
    query = "Alice is looking for her camera."
    assert a.search(query) == b.search(query)
    assert a.subtitles(all_ids[0], 0, 1e9) and a.subtitles(all_ids[0], 1e8, 1e9) == []

    other = tmp_path / "other.pt"
    state = torch.load(ckpt, weights_only=True)
    state = {k: (v + 1 if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in state.items()}
    torch.save(state, other)
    with pytest.raises(SearchIndexError, match=f"built with the checkpoint {ckpt}.*not {other}"):
        build_mod.main(build_argv(toy_dbs, run, other, grown))


def test_errors_name_the_culprit(tmp_path, toy_dbs, tvr_run):
    run, ckpt = tvr_run
    with pytest.raises(SearchIndexError, match="no index.json"):
        MomentIndex.load(tmp_path)
    with pytest.raises(SearchIndexError, match="--sub_txt_db goes with --video_db"):
        build_mod.check_flags(build_mod.build_parser().parse_args(
            ["--videos", str(tmp_path), "--sub_txt_db", "x", "--model_dir", str(run),
             "--ckpt", "1", "--out", str(tmp_path / "i")]))
    with pytest.raises(SearchIndexError, match="--video_ids .* not in the DBs"):
        bad = tmp_path / "ids.json"
        bad.write_text(json.dumps(["no_such_video"]))
        build_mod.main(build_argv(toy_dbs, run, ckpt, tmp_path / "i", bad))


SRT = """1
00:00:00,500 --> 00:00:02,000
<i>Alice:</i> Where is my camera?

2
00:00:02,500 --> 00:00:03,900
Dmitri: It is
on the table.
"""


def test_build_from_video_files_and_srt(tmp_path, toy_dbs, tvr_run):
    from scripts.extract.video_io import write_test_video
    from search.from_videos import parse_srt

    run, ckpt = tvr_run
    videos, subs = tmp_path / "videos", tmp_path / "subs"
    videos.mkdir()
    subs.mkdir()
    for name, seconds in (("vA", 4.0), ("vB", 3.0)):
        write_test_video(str(videos / f"{name}.mp4"), seconds, 8)
    (subs / "vA.srt").write_text(SRT)
    assert parse_srt(subs / "vA.srt")[1] == {"start": 2.5, "end": 3.9,
                                             "text": "Dmitri: It is on the table."}
    toker = json.loads((toy_dbs / "txt_db" / "tv_subtitles.db" / "meta.json").read_text())
    out = tmp_path / "index"
    argv = ["--videos", str(videos), "--subtitles", str(subs), "--model_dir", str(run),
            "--ckpt", str(ckpt), "--out", str(out), "--random_weights", "--tiny",
            "--frame_size", "32", "--toker", toker["toker"], "--device", "cpu"]
    build_mod.main(argv)
    index = MomentIndex.load(out)
    assert index.videos() == ["vA", "vB"]
    assert index.video_path("vA") == str((videos / "vA.mp4").resolve())
    assert index.subtitles("vA", 0.0, 1.0) == ["Alice: Where is my camera?"]
    assert index.subtitles("vB", 0.0, 10.0) == []
    moments = index.search("Alice is looking for her camera", top_k=2)
    assert len(moments) == 2 and all(m.path == index.video_path(m.video) for m in moments)
    first_shard = (out / "shards" / "00000.pt").stat().st_mtime_ns

    write_test_video(str(videos / "vC.mkv"), 2.0, 8)  # one more video: only it is encoded
    meta = build_mod.main(argv)
    assert sorted(meta["videos"]) == ["vA", "vB", "vC"]
    assert (out / "shards" / "00000.pt").stat().st_mtime_ns == first_shard
    assert meta["videos"]["vC"]["shard"] not in {meta["videos"][v]["shard"] for v in ("vA", "vB")}
    assert MomentIndex.load(out).search("camera", top_k=1)[0].video in {"vA", "vB", "vC"}


def test_search_benchmark_figures():
    from scripts import benchmark

    opts = benchmark.parse_args(["search", "--search_videos", "30", "--search_clip_len", "20",
                                 "--search_queries", "5", "--search_model_config",
                                 str(ROOT / "config" / "hero_demo.json")])
    figures = benchmark.BENCHMARKS["search"].run(opts)
    names = [f["figure"] for f in figures]
    assert names[0].startswith("search/cpu/videos=30/L=20/")
    assert names[0].endswith("/query_latency_median") and figures[0]["unit"] == "ms"
    assert 0 < figures[1]["value"] <= figures[0]["value"] <= figures[2]["value"]


def test_demo_search_step(tmp_path, toy_dbs, tvr_run):
    """demo.sh's index step and its two queries, sourced from the real script, on the toy DBs
    and the 2-update TVR run laid out as the demo leaves them."""
    import os
    import subprocess
    import sys

    run, _ = tvr_run
    out = tmp_path / "demo"
    (out / "finetune").mkdir(parents=True)
    (out / "dbs").symlink_to(toy_dbs)
    (out / "finetune" / "tvr_pretrained").symlink_to(run)
    script = (f'source scripts/demo.sh\nOUT="{out}"\nN_STEPS=2\n'
              'STEP_KEY=k step "search index" search_index\nsearch_queries\n')
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "search_index" / "index.json").is_file()
    lines = proc.stdout.splitlines()
    assert sum(line.strip().startswith("query: ") for line in lines) == 2
    assert sum(line.split()[:2] == ["rank", "video"] for line in lines) == 2
    assert sum(line.split()[:1] == ["1"] for line in lines) == 2


def test_video_only_index_has_no_subtitles(tmp_path, toy_dbs, tvr_run):
    run, ckpt = tvr_run
    argv = build_argv(toy_dbs, run, ckpt, tmp_path / "index")
    argv = argv[:2] + argv[4:]  # no --sub_txt_db: video-only input
    meta = build_mod.main(argv)
    assert meta["video_only"] and not (tmp_path / "index" / "subtitles.json").exists()
    index = MomentIndex.load(tmp_path / "index")
    moment = index.search("Alice is looking for her camera.", top_k=1)[0]
    assert index.subtitles(moment.video, 0.0, 1e9) == []
    with pytest.raises(SearchIndexError, match="is video-only; pass the same kind"):
        build_mod.main(build_argv(toy_dbs, run, ckpt, tmp_path / "index"))

"""Feature extraction from video files (issue 8) on short clips generated with PyAV.

Networks have random weights and one block per stage (feature widths kept), frames are cropped
to 32 px so everything runs in seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from test_data_video import build_query_db, build_sub_db, opts
from torch.utils.data import DataLoader

from data.data import load_video_sub_dataset
from data.txt_db import QueryTokLmdb
from data.vcmr import VcmrDataset, get_video_ids, vcmr_collate
from scripts import benchmark, collect_video_feature_paths, convert_videodb, extract_features
from scripts.extract import pipeline
from scripts.extract.pipeline import (
    ExtractConfig,
    check_against,
    extract,
    feature_path,
    find_videos,
    plan_jobs,
)
from scripts.extract.resnet import resnet152
from scripts.extract.slowfast import slow_indices, slowfast_r50
from scripts.extract.video_io import RowSampler, count_rows, write_test_video
from scripts.extract.weights import TINY_DEPTHS, build_streams, load_checkpoint

SIZE = 32
# clip -> (seconds, fps, container); rows at fi 1.5 = ceil(duration / 1.5)
CLIPS = {"vA": (4.0, 10, "mp4"), "vB": (3.0, 10, "mkv"), "vC": (2.0, 8, "mp4")}
ROWS = {"vA": 3, "vB": 2, "vC": 2}


def cfg(**kw) -> ExtractConfig:
    base = dict(batch_size=4, num_workers=0, device="cpu", frame_size=SIZE)
    return ExtractConfig(**dict(base, **kw))


@pytest.fixture(scope="module")
def streams():
    torch.manual_seed(0)
    return build_streams(["resnet", "slowfast"], random_weights=True, tiny=True)


def make_videos(root) -> str:
    video_dir = os.path.join(root, "videos")
    os.makedirs(video_dir)
    for vid, (seconds, fps, ext) in CLIPS.items():
        write_test_video(os.path.join(video_dir, f"{vid}.{ext}"), seconds, fps)
    return video_dir


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, streams):
    """One extraction of the three clips through the CLI (2 decoding workers); seeded like
    ``streams``, so the CLI's random networks equal the fixture's."""
    root = tmp_path_factory.mktemp("extract")
    video_dir, out = make_videos(str(root)), str(root / "feats")
    torch.manual_seed(0)
    run = extract_features.main(["--video_dir", video_dir, "--output", out, "--random_weights",
                                 "--tiny", "--frame_size", str(SIZE), "--num_workers", "2",
                                 "--batch_size", "2"])
    return {"root": str(root), "video_dir": video_dir, "out": out, "summary": run["summary"]}


def load(path) -> np.ndarray:
    with np.load(path) as npz:
        return npz["features"]


# ---------------------------------------------------------------------------------------------
# time grid and frame sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("duration, interval, rows", [
    (4.0, 1.5, 3), (3.0, 1.5, 2), (3.0004, 1.5, 2), (3.1, 1.5, 3), (6.0, 2, 3), (0.5, 2, 1),
    (0.0, 1.5, 0)])
def test_count_rows(duration, interval, rows):
    assert count_rows(duration, interval) == rows


class FakeFrame:
    def __init__(self, index, fps):
        self.time, self.image = index / fps, index


def test_row_sampler_takes_nearest_frames_and_last_frame_past_the_end():
    sampler, rows = RowSampler(1.5, ("resnet", "slowfast")), []
    for i in range(30):                       # 3.0 s at 10 fps -> 2 rows
        rows += sampler.push(FakeFrame(i, 10))
    assert len(rows) == 1                     # row 0 complete once frame 1.5 s is seen
    rows += sampler.finish(3.0)
    assert [r["resnet"] for r in rows] == [0, 15]
    # slot k targets t*1.5 + (k + 0.5) * 1.5 / 32
    assert rows[0]["slowfast"][:3] == [0, 1, 1] and rows[0]["slowfast"][31] == 15
    assert rows[1]["slowfast"][0] == 15 and rows[1]["slowfast"][31] == 29   # clamped to end


def test_row_sampler_tie_goes_to_the_earlier_frame():
    sampler, rows = RowSampler(1.0, ("resnet",)), []
    for t in (0.0, 0.75, 1.25):               # row 1 targets 1.0: 0.75 and 1.25 equally near
        frame = FakeFrame(0, 1)
        frame.time, frame.image = t, t
        rows += sampler.push(frame)
    rows += sampler.finish(1.5)
    assert [r["resnet"] for r in rows] == [0.0, 0.75]


def test_slow_pathway_takes_every_alpha_th_fast_frame():
    assert slow_indices(32).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def test_rows_shapes_dtypes_and_layout(extracted):
    out, summary = extracted["out"], extracted["summary"]
    assert summary.done == 3 and not summary.failures and summary.rows == sum(ROWS.values())
    assert summary.video_s == pytest.approx(sum(c[0] for c in CLIPS.values()))
    for vid, n in ROWS.items():
        resnet = load(os.path.join(out, "resnet_features", "videos", f"{vid}.npz"))
        slowfast = load(os.path.join(out, "slowfast_features", "videos", f"{vid}.npz"))
        assert resnet.shape == (n, 2048) and slowfast.shape == (n, 2304)
        assert resnet.dtype == slowfast.dtype == np.float16
        norms = np.linalg.norm(resnet.astype(np.float32), axis=1)
        assert np.allclose(norms, 1.0, atol=1e-2)           # ResNet rows L2-normalised
        assert not np.allclose(np.linalg.norm(slowfast.astype(np.float32), axis=1), 1.0,
                               atol=1e-2)                    # SlowFast rows are not
        assert np.isfinite(slowfast).all() and not np.allclose(resnet[0], resnet[-1])
    assert json.load(open(os.path.join(out, "extract_failures.json"))) == []


def test_features_feed_convert_videodb_and_the_vcmr_dataset(extracted, tmp_path):
    out, video_db = extracted["out"], str(tmp_path / "video_db")
    collect_video_feature_paths.main(["--feature_dir", out, "--output", video_db,
                                      "--dataset", "mine", "--nproc", "1"])
    convert_videodb.main(["--vfeat_info_file", os.path.join(video_db, "mine",
                                                            "video_feat_info.pkl"),
                          "--output", video_db, "--dataset", "mine", "--frame_length", "1.5",
                          "--nproc", "1"])
    img_dir = os.path.join(video_db, "mine")
    assert json.load(open(os.path.join(img_dir, "id2nframe.json"))) == ROWS
    subs = {"vA": ([[11], [21]], [[0, [0, 1]], [1, [2]]], [], 3),
            "vB": ([[31]], [[0, [0, 1]]], [], 2)}
    sub_dir = build_sub_db(str(tmp_path), subs)
    query_dir = build_query_db(str(tmp_path), "q.db", [
        {"desc_id": 1, "vid_name": "vA", "ts": [0.0, 2.0], "input_ids": [101], "type": "v"},
        {"desc_id": 2, "vid_name": "vB", "ts": [1.5, 3.0], "input_ids": [102], "type": "v"}])
    video_ds = load_video_sub_dataset(img_dir, sub_dir, 1.5, opts())
    ds = VcmrDataset(get_video_ids(query_dir), video_ds, QueryTokLmdb(query_dir))
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=vcmr_collate)))
    assert batch["vids"] == ["vA", "vB"] and batch["c_v_feats"].shape == (2, 3, 4352)
    feats_a = batch["c_v_feats"][0].numpy()
    src = os.path.join(out, "{}_features", "videos", "vA.npz")
    assert np.array_equal(feats_a[:, :2048], load(src.format("resnet")).astype(np.float32))
    assert np.array_equal(feats_a[:, 2048:], load(src.format("slowfast")).astype(np.float32))
    assert batch["targets"].tolist() == [[0, 1], [1, 1]]


# ---------------------------------------------------------------------------------------------
# resume and failures
# ---------------------------------------------------------------------------------------------
def test_resume_skips_done_clips_and_redoes_a_missing_stream(extracted, streams, tmp_path):
    out = str(tmp_path / "feats")
    shutil.copytree(extracted["out"], out)
    kept = feature_path(out, "resnet", "videos", "vA")
    before = os.stat(kept).st_mtime_ns
    redo = feature_path(out, "slowfast", "videos", "vB")
    original = load(redo)
    os.remove(redo)
    jobs, skipped = plan_jobs(find_videos(extracted["video_dir"]), out, ["resnet", "slowfast"])
    assert skipped == 2 and [(j.vid, j.streams) for j in jobs] == [("vB", ("slowfast",))]
    summary = extract(jobs, out, streams, cfg(), skipped)
    assert summary.done == 1 and summary.skipped == 2 and summary.rows == ROWS["vB"]
    assert os.stat(kept).st_mtime_ns == before
    assert np.allclose(load(redo).astype(np.float32), original.astype(np.float32), atol=1e-2)
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f]


def test_corrupt_video_is_reported_and_skipped(streams, tmp_path, caplog, monkeypatch):
    video_dir = make_videos(str(tmp_path))
    bad = os.path.join(video_dir, "broken.mp4")
    with open(bad, "wb") as f:
        f.write(b"\x00not a video" * 64)
    real_iter_chunks = pipeline.iter_chunks

    def fail_mid_vb(path, *args):              # vB decodes one chunk, then breaks
        for i, chunk in enumerate(real_iter_chunks(path, *args)):
            if path.endswith("vB.mkv") and i == 1:
                raise RuntimeError("decoder exploded")
            yield chunk

    monkeypatch.setattr(pipeline, "iter_chunks", fail_mid_vb)
    out = str(tmp_path / "feats")
    jobs, _ = plan_jobs(find_videos(video_dir), out, ["resnet", "slowfast"])
    summary = extract(jobs, out, streams, cfg(batch_size=1))
    failed = dict(summary.failures)
    assert sorted(failed) == sorted([bad, os.path.join(video_dir, "vB.mkv")])
    assert "InvalidDataError" in failed[bad] and "decoder exploded" in failed[
        os.path.join(video_dir, "vB.mkv")]
    assert bad in caplog.text
    assert summary.done == 2
    for stream in ("resnet", "slowfast"):
        assert not os.path.exists(feature_path(out, stream, "videos", "vB"))
        assert load(feature_path(out, stream, "videos", "vC")).shape[0] == ROWS["vC"]
    listed = json.load(open(os.path.join(out, "extract_failures.json")))
    assert sorted(e["path"] for e in listed) == sorted(failed)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_through_wrappers(tmp_path):
    src, dst = resnet152(TINY_DEPTHS), resnet152(TINY_DEPTHS)
    path = str(tmp_path / "resnet.pth")
    torch.save({"model_state": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    load_checkpoint(dst, path, "resnet", "--resnet_ckpt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values()))


def test_checkpoint_with_wrong_keys_fails_clearly(tmp_path):
    path = str(tmp_path / "wrong.pyth")
    torch.save({"model_state": resnet152(TINY_DEPTHS).state_dict()}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(slowfast_r50(TINY_DEPTHS), path, "slowfast", "--slowfast_ckpt")
    msg = str(err.value)
    assert path in msg and "--slowfast_ckpt" in msg and "pytorchvideo slowfast_r50" in msg
    assert "blocks.0.multipathway_blocks.0.conv.weight" in msg and "conv1.weight" in msg
    state = resnet152(TINY_DEPTHS).state_dict()
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"wrong shape 1 \['fc.weight \(10, 2048\)"):
        load_checkpoint(resnet152(TINY_DEPTHS), path, "resnet", "--resnet_ckpt")


def test_missing_checkpoint_flag_is_named():
    with pytest.raises(ValueError, match="--slowfast_ckpt is required"):
        build_streams(["slowfast"])


# ---------------------------------------------------------------------------------------------
# --check_against
# ---------------------------------------------------------------------------------------------
def test_check_against_identical_features_gives_cosine_one(extracted):
    report = check_against(extracted["out"], extracted["out"])
    for stream in ("resnet", "slowfast"):
        assert report[stream]["clips"] == 3 and report[stream]["rows"] == 7
        assert report[stream]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
        assert report[stream]["cosine_min"] == pytest.approx(1.0, abs=1e-5)


def _write(root, stream, folder, vid, rows):
    path = os.path.join(root, f"{stream}_features", folder, f"{vid}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, features=np.asarray(rows, np.float16))


def test_check_against_hand_made_cosines(tmp_path):
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    _write(ours, "resnet", "a", "x", [[1, 0], [0, 2], [3, 3]])
    _write(ref, "resnet", "other_folder", "x", [[2, 0], [1, 0]])   # matched by stem, 2 rows
    _write(ours, "resnet", "a", "y", [[1, 0]])                       # no reference
    report = check_against(ours, ref)
    assert list(report) == ["resnet"]
    r = report["resnet"]
    assert r["cosine_mean"] == pytest.approx(0.5) and r["cosine_min"] == pytest.approx(0.0)
    assert (r["clips"], r["rows"], r["missing_reference"], r["row_count_mismatch"]) == (1, 2, 1, 1)
    assert r["mean_norm"] == pytest.approx(1.5) and r["reference_mean_norm"] == pytest.approx(1.5)
    with pytest.raises(FileNotFoundError, match="--check_against"):
        check_against(ours, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# benchmark sub-command
# ---------------------------------------------------------------------------------------------
def test_extract_benchmark_figures():
    opts_ = benchmark.parse_args([
        "extract", "--extract_tiny", "--extract_frame_size", str(SIZE), "--extract_videos", "1",
        "--extract_seconds", "1.5", "--extract_resolution", "64x48", "--extract_fps", "10",
        "--extract_workers", "0", "--extract_devices", "cpu"])
    results = {r["figure"]: r for r in benchmark.BENCHMARKS["extract"].run(opts_)}
    tag = "extract/cpu/workers=0/bs=8"
    assert set(results) == {f"{tag}/{n}" for n in ("video_s_per_s", "decode_share",
                                                  "network_share")}
    assert results[f"{tag}/video_s_per_s"]["value"] > 0
    assert results[f"{tag}/decode_share"]["value"] + results[f"{tag}/network_share"][
        "value"] == pytest.approx(1.0, abs=2e-3)
    assert all(r["device"].startswith("cpu") for r in results.values())

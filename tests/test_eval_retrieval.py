"""eval_vcmr.py / eval_vr.py end to end on the toy corpus with a random small model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import eval_vcmr
import eval_vr
from config.config import SharedConfigs
from eval.common import EvalSetupError
from model.vcmr import HeroForVcmr
from utils.save import ModelSaver
from utils.tvr_standalone_eval import eval_retrieval, load_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEP = 3


def make_run(out: Path, config: str, **overrides) -> Path:
    """A run folder as training leaves it: log/hps.json, log/model_config.json, a ckpt."""
    opts = SharedConfigs().get_vcmr_args(["--config", str(ROOT / "config" / config)])
    hps = {**vars(opts), **overrides}
    (out / "log").mkdir(parents=True)
    (out / "log" / "hps.json").write_text(json.dumps(hps, indent=4))
    shutil.copy(ROOT / "config" / "hero_demo.json", out / "log" / "model_config.json")
    torch.manual_seed(0)
    model = HeroForVcmr(str(ROOT / "config" / "hero_demo.json"), lw_neg_ctx=8, lw_neg_q=8)
    ModelSaver(out / "ckpt").save(model, STEP)
    return out


@pytest.fixture(scope="module")
def tvr_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("tvr") / "run", "train-tvr-8gpu.json")


def vcmr_args(dbs, run, split="val", db="tvr", extra=()):
    return ["--query_txt_db", str(dbs / "txt_db" / f"{db}_{split}.db"), "--split", split,
            "--vfeat_db", str(dbs / "video_db" / "tv"),
            "--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"),
            "--output_dir", str(run), "--checkpoint", str(STEP), "--n_workers", "0",
            "--vcmr_eval_video_batch_size", "1", "--batch_size", "4", *extra]


def read_results(run, split, tag=STEP):
    folder = run / f"results_{split}"
    return (json.loads((folder / f"results_{tag}_all.json").read_text()),
            json.loads((folder / f"metrics_{tag}_all.json").read_text()))


def test_eval_vcmr_val_writes_upstream_format(toy_dbs, tvr_run):
    eval_vcmr.main(vcmr_args(toy_dbs, tvr_run))
    results, metrics = read_results(tvr_run, "val")
    vid2dur_idx = json.loads((toy_dbs / "txt_db" / "tv_subtitles.db" / "vid2dur_idx.json")
                             .read_text())["val"]  # {vid: [duration, idx]}
    vid2idx = {vid: dur_idx[1] for vid, dur_idx in vid2dur_idx.items()}
    qids = sorted(int(q) for q in json.loads(
        (toy_dbs / "txt_db" / "tvr_val.db" / "id2len.json").read_text()))
    assert set(results) == {"VCMR", "SVMR", "VR", "video2idx"}
    assert results["video2idx"] == {v: vid2idx[v] for v in results["video2idx"]}
    gt = {g["desc_id"]: g for g in load_jsonl(toy_dbs / "txt_db" / "tvr_val.db" /
                                              "query_data.jsonl")}
    for task in ("VCMR", "SVMR", "VR"):
        assert sorted(e["desc_id"] for e in results[task]) == qids
        assert all(0 < len(e["predictions"]) <= 100 for e in results[task])
    for e in results["VCMR"] + results["SVMR"]:
        for _, st, ed, _ in e["predictions"]:
            assert 2 <= round((ed - st) / 1.5) - 1 < 16 and st >= 0
    for e in results["SVMR"]:
        assert {p[0] for p in e["predictions"]} == {vid2idx[gt[e["desc_id"]]["vid_name"]]}
    assert "valid_val_VCMR/VCMR_0.7-r1" in metrics and "valid/vcmr_val_ex_per_s" in metrics
    assert "valid_val_VCMR_by_type/VCMR_by_type_t-0.5-r5" in metrics
    n = len(gt)  # §5.3: the share string sits inside every *_by_type dict, not at the top
    shares = [sum(g["type"] == t for g in gt.values()) / n for t in ("v", "t", "vt")]
    ratio = "v {} t {} vt {}".format(*(round(100 * x, 2) for x in shares))
    texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
    assert texts == {f"valid_val_{t}_by_type{nms}/{t}_by_type_desc_type_ratio": ratio
                     for t in ("VCMR", "SVMR", "VR") for nms in ("", "_nms_0.5")}
    # the saved lists are the post-NMS ones (P6): re-scoring them gives the _nms_0.5 numbers
    rescored = eval_retrieval(results, list(gt.values()), verbose=False)
    for task in ("VCMR", "SVMR"):
        for key, value in rescored[task].items():
            assert metrics[f"valid_val_{task}_nms_0.5/{task}_{key}"] == value


def test_reference_ranking_gives_identical_results(toy_dbs, tvr_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tvr_run, run, ignore=shutil.ignore_patterns("results_*"))
    _, fast = eval_vcmr.main(vcmr_args(toy_dbs, run))
    fast_metrics = read_results(run, "val")[1]
    _, ref = eval_vcmr.main(vcmr_args(toy_dbs, run, extra=["--ranking_impl", "reference"]))
    ref_metrics = read_results(run, "val")[1]
    assert fast == ref
    drop = lambda m: {k: v for k, v in m.items() if not k.endswith("ex_per_s")}
    assert drop(fast_metrics) == drop(ref_metrics)


def test_eval_vcmr_test_public_has_no_svmr_nor_metrics(toy_dbs, tvr_run):
    args = vcmr_args(toy_dbs, tvr_run, "test_public")
    args[args.index("--checkpoint") + 1] = str(tvr_run / "ckpt" / f"model_step_{STEP}.pt")
    eval_vcmr.main(args)
    results, metrics = read_results(tvr_run, "test_public", f"model_step_{STEP}")
    assert set(results) == {"VCMR", "VR", "video2idx"}
    assert list(metrics) == ["valid/vcmr_test_public_ex_per_s"]


def test_eval_vcmr_bad_flags(toy_dbs, tvr_run):
    args = vcmr_args(toy_dbs, tvr_run)
    with pytest.raises(EvalSetupError, match="--split 'test_public' does not occur"):
        eval_vcmr.main(args[:3] + ["test_public"] + args[4:])
    args[args.index("--checkpoint") + 1] = "77"
    with pytest.raises(EvalSetupError, match="model_step_77.pt"):
        eval_vcmr.main(args)


def test_eval_vcmr_didemo_video_only(toy_dbs, tmp_path):
    run = make_run(tmp_path / "run", "train-didemo_video_only-4gpu.json", vfeat_interval=1.5)
    args = vcmr_args(toy_dbs, run, db="didemo", extra=["--task", "didemo_video_only"])
    args[args.index("--vfeat_db") + 1] = str(toy_dbs / "video_db" / "didemo")
    eval_vcmr.main(args)
    results, metrics = read_results(run, "val")
    assert {"VCMR", "SVMR", "VR"} <= set(results)
    for e in results["VCMR"]:
        assert all(3 <= round((ed - st) / 1.5) - 1 < 6 for _, st, ed, _ in e["predictions"])
    assert "valid_val_SVMR/SVMR_0.5-r1" in metrics


def test_eval_vr_msrvtt(toy_dbs, tmp_path):
    run = make_run(tmp_path / "run", "train-msrvtt_video_sub-4gpu.json")
    args = ["--query_txt_db", str(toy_dbs / "txt_db" / "msrvtt_val.db"), "--split", "val",
            "--vfeat_db", str(toy_dbs / "video_db" / "msrvtt"),
            "--sub_txt_db", str(toy_dbs / "txt_db" / "msrvtt_subtitles.db"),
            "--output_dir", str(run), "--checkpoint", str(STEP), "--n_workers", "0"]
    eval_vr.main(args)
    results, metrics = read_results(run, "val")
    assert set(results) == {"VR", "video2idx"}
    assert all(isinstance(e["desc_id"], str) for e in results["VR"])
    n_videos = len(results["video2idx"])
    assert all(len(e["predictions"]) == n_videos for e in results["VR"])
    assert set(metrics) == {f"valid_val_VR/VR_r{k}" for k in (1, 5, 10, 100)} | \
        {"valid/vr_val_ex_per_s"}
    assert metrics["valid_val_VR/VR_r100"] == 100.0

"""eval_videoQA.py, eval_violin.py and inf_tvc.py end to end on the tiny toy corpus.

Each script runs on a run folder made here like a training run's (log/hps.json,
log/model_config.json, ckpt/model_step_N.pt holding a randomly initialised small model), over the
DBs built by ``scripts/build_toy_dbs.sh``. Predictions are random; the tests check the wiring,
the file formats and that the reported accuracy agrees with the written predictions and the
labels of the raw annotation files.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import eval_videoQA
import eval_violin
import inf_tvc
from eval.common import EvalSetupError
from eval.tvc import METRIC_KEYS, CaptionEvalError
from model.tvc import HeroForTvc
from model.videoQA import HeroForVideoQA
from model.violin import HeroForViolin
from utils.save import ModelSaver

CONFIG = Path(__file__).resolve().parents[1] / "config"
STEP = 7
DATA_HPS = dict(vfeat_interval=1.5, max_clip_len=100, vfeat_version="resnet_slowfast",
                compressed_db=False, sub_ctx_len=0)


def make_run(root: Path, model_cls, config_name: str, hps: dict) -> Path:
    """A training-run folder with a seeded random model saved at step ``STEP``."""
    cfg = json.loads((CONFIG / config_name).read_text())
    torch.manual_seed(0)
    ModelSaver(root / "ckpt").save(model_cls.from_pretrained(cfg, {}), STEP)
    (root / "log").mkdir(parents=True)
    (root / "log" / "hps.json").write_text(json.dumps(hps, indent=4))
    (root / "log" / "model_config.json").write_text(json.dumps(cfg, indent=4))
    return root


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("tvqa_run"), HeroForVideoQA, "hero_demo.json",
                    {**DATA_HPS, "task": "tvqa"})


def qa_argv(dbs, run, db="tvqa_val.db", split="val", *extra):
    return ["--sub_txt_db", str(dbs / "txt_db" / "tv_subtitles.db"),
            "--vfeat_db", str(dbs / "video_db" / "tv"),
            "--query_txt_db", str(dbs / "txt_db" / db), "--split", split,
            "--output_dir", str(run), "--checkpoint", str(STEP), "--n_workers", "0",
            "--batch_size", "4", *extra]


def test_eval_videoqa_val_writes_submission_and_logits(toy_dbs, toy_raw, qa_run):
    val_log, results, logits = eval_videoQA.main(qa_argv(toy_dbs, qa_run, "tvqa_val.db", "val",
                                                         "--save_logits"))
    answers = {str(r["qid"]): r["answer_idx"] for r in read_jsonl(toy_raw / "tvqa_val.jsonl")}
    out_dir = qa_run / "results_val_w_logit"
    written = json.loads((out_dir / f"results_{STEP}_all.json").read_text())
    assert written == results and set(written) == set(answers)
    assert all(isinstance(v, int) and 0 <= v < 5 for v in written.values())
    with open(out_dir / f"logits_{STEP}_all.pkl", "rb") as f:
        saved_logits = pickle.load(f)
    assert saved_logits == logits
    for qid, row in saved_logits.items():
        assert len(row) == 5 and written[qid] == max(range(5), key=row.__getitem__)
    correct = sum(written[q] == a for q, a in answers.items())
    assert val_log["valid/acc"] == pytest.approx(correct / len(answers))
    assert val_log["valid/loss"] > 0
    metrics = json.loads((out_dir / f"metrics_{STEP}_all.json").read_text())
    assert metrics["valid/acc"] == pytest.approx(val_log["valid/acc"])


def test_eval_videoqa_unlabelled_test_split(toy_dbs, toy_raw, qa_run):
    val_log, results, logits = eval_videoQA.main(qa_argv(toy_dbs, qa_run, "tvqa_test_public.db",
                                                         "test_public"))
    assert set(val_log) == {"valid/ex_per_s"} and logits is None
    qids = {str(r["qid"]) for r in read_jsonl(toy_raw / "tvqa_test_public.jsonl")}
    assert set(results) == qids
    assert (qa_run / "results_test_public" / f"results_{STEP}_all.json").is_file()


def test_eval_videoqa_split_must_match_db(toy_dbs, qa_run):
    with pytest.raises(EvalSetupError, match="--split 'test_public' does not occur"):
        eval_videoQA.main(qa_argv(toy_dbs, qa_run, "tvqa_val.db", "test_public"))


def test_eval_violin_accuracy_matches_labels(toy_dbs, tmp_path):
    run = make_run(tmp_path / "violin_run", HeroForViolin, "hero_demo.json",
                   {**DATA_HPS, "compressed_db": True, "sub_ctx_len": 2, "task": "violin"})
    argv = ["--sub_txt_db", str(toy_dbs / "txt_db" / "violin_subtitles.db"),
            "--vfeat_db", str(toy_dbs / "video_db" / "violin"),
            "--query_txt_db", str(toy_dbs / "txt_db" / "violin_test.db"),
            "--output_dir", str(run), "--checkpoint", str(STEP), "--n_workers", "0"]
    val_log, results, _ = eval_violin.main(argv)
    labels = {r["desc_id"]: r["label"]
              for r in read_jsonl(toy_dbs / "txt_db" / "violin_test.db" / "query_data.jsonl")}
    assert set(results) == set(labels)
    assert set(results.values()) <= {0, 1}
    correct = sum(results[q] == lab for q, lab in labels.items())
    assert val_log["valid/test_acc"] == pytest.approx(correct / len(labels))
    assert {"valid/test_loss", "valid/test_ex_per_s"} <= set(val_log)
    assert json.loads((run / "results_test" / f"results_{STEP}_all.json").read_text()) == results


@pytest.fixture(scope="module")
def tvc_run(tmp_path_factory, toy_dbs, toy_raw):
    hps = {**DATA_HPS, "sub_ctx_len": 1, "task": "tvc", "lsr": 0.1,
           "sub_txt_db": str(toy_dbs / "txt_db" / "tv_subtitles.db"),
           "vfeat_db": str(toy_dbs / "video_db" / "tv"), "toker": str(toy_raw / "tokenizer")}
    return make_run(tmp_path_factory.mktemp("tvc_run"), HeroForTvc, "hero_demo_tvc.json", hps)


def tvc_argv(run, target, output, *extra):
    return ["--model_dir", str(run), "--ckpt_step", str(STEP), "--target_clip", str(target),
            "--output", str(output), "--n_workers", "0", "--batch_size", "2", *extra]


def test_inf_tvc_val_writes_submission_and_scores(toy_dbs, tvc_run, tmp_path, monkeypatch):
    monkeypatch.setattr("eval.tvc.java_available", lambda: False)  # METEOR: caption tests
    target = toy_dbs / "txt_db" / "tvc_val_release.jsonl"
    out = tmp_path / "pred.jsonl"
    results, scores = inf_tvc.main(tvc_argv(tvc_run, target, out, "--max_gen_step", "5"))
    lines = read_jsonl(out)
    assert lines == results
    clips = {(c["vid_name"], c["clip_id"], tuple(c["ts"])) for c in read_jsonl(target)}
    assert {(r["vid_name"], r["clip_id"], tuple(r["ts"])) for r in lines} == clips
    assert len(lines) == len(clips)
    for line in lines:
        assert set(line) == {"vid_name", "clip_id", "ts", "descs"}
        assert isinstance(line["clip_id"], int) and isinstance(line["descs"][0]["desc"], str)
    assert list(scores) == [k for k in METRIC_KEYS if k != "METEOR"]
    assert json.loads((tmp_path / "pred_metrics.json").read_text()) == scores


def test_inf_tvc_test_public_has_no_scores_and_tokenizer_from_meta(toy_dbs, tvc_run, tmp_path):
    hps_path = tvc_run / "log" / "hps.json"
    hps = json.loads(hps_path.read_text())
    hps_path.write_text(json.dumps({**{k: v for k, v in hps.items() if k != "toker"},
                                    "train_db": str(toy_dbs / "txt_db" / "tvc_train.db")}))
    try:
        target = toy_dbs / "txt_db" / "tvc_test_public_release.jsonl"
        results, scores = inf_tvc.main(tvc_argv(tvc_run, target, tmp_path / "test.jsonl",
                                                "--max_gen_step", "3"))
    finally:
        hps_path.write_text(json.dumps(hps))
    assert scores is None
    assert len(results) == len(read_jsonl(target)) == len(read_jsonl(tmp_path / "test.jsonl"))


def test_inf_tvc_unknown_video_is_named(toy_dbs, tvc_run, tmp_path):
    target = tmp_path / "bad_clips.jsonl"
    target.write_text(json.dumps({"vid_name": "no_such_video", "clip_id": 1, "ts": [0, 3]})
                      + "\n")
    with pytest.raises(KeyError, match=r"bad_clips.jsonl.*no_such_video"):
        inf_tvc.main(tvc_argv(tvc_run, target, tmp_path / "out.jsonl"))


def test_inf_tvc_without_any_tokenizer_asks_for_toker(tvc_run, tmp_path):
    hps = json.loads((tvc_run / "log" / "hps.json").read_text())
    run = make_run(tmp_path / "run", HeroForTvc, "hero_demo_tvc.json",
                   {k: v for k, v in hps.items() if k != "toker"})
    with pytest.raises(EvalSetupError, match="pass --toker"):
        inf_tvc.main(tvc_argv(run, tmp_path / "x.jsonl", tmp_path / "out.jsonl"))


def test_inf_tvc_empty_reference_fails_before_decoding(toy_dbs, tvc_run, tmp_path, monkeypatch):
    lines = read_jsonl(toy_dbs / "txt_db" / "tvc_val_release.jsonl")
    lines[1]["descs"][0]["desc"] = " "
    target = tmp_path / "empty_ref.jsonl"
    target.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(inf_tvc, "decode_tvc", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(CaptionEvalError,
                       match=rf"empty_ref.jsonl:2: clip {lines[1]['clip_id']} has an empty"):
        inf_tvc.main(tvc_argv(tvc_run, target, tmp_path / "out.jsonl"))


def test_decoding_paths_agree_and_validate_tvc(toy_dbs, toy_raw, tvc_run, caplog):
    from types import SimpleNamespace

    from eval.captioning import decode_tvc, ids_to_text, validate_tvc
    from eval.common import build_eval_model, load_hps
    from eval.tvc import TVCEval
    from utils.tokenizer import load_toker

    toker = load_toker(toy_raw / "tokenizer")
    unknown = [0]
    text = ids_to_text(toker, [347, 525, 50270, 4], unknown)
    assert unknown == [1] and text == toker.decode([347, 525, 4])
    target = toy_dbs / "txt_db" / "tvc_val_release.jsonl"
    opts = SimpleNamespace(target_clip=str(target), batch_size=3, n_workers=0, no_pin_mem=True)
    loader = inf_tvc.build_loader(opts, load_hps(tvc_run), torch.device("cpu"))
    model, _ = build_eval_model(HeroForTvc, tvc_run, STEP, "cpu")
    model.train()
    cached = decode_tvc(model, loader, toker, max_gen_step=4)
    assert cached == decode_tvc(model, loader, toker, max_gen_step=4, use_cache=False)
    assert model.training
    val_log, results = validate_tvc(model, loader, TVCEval(target, use_java=False), toker, 4)
    assert results == cached
    assert list(val_log) == [k for k in METRIC_KEYS if k != "METEOR"]

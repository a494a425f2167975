"""scripts/qa_label_curve.py without its training: corpus check, job wiring, report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from scripts import qa_label_curve as curve
from scripts.toy.build import make_corpus
from tests.conftest import TOY_SEED
from tests.test_demo import write_jsonl_run


def options(tmp_path: Path, **kw) -> argparse.Namespace:
    opts = dict(study=str(tmp_path / "study"), seed=0, labelled=[16, 128],
                updates={"tvqa": 600, "violin": 240}, learning_rate=None, lr_mul=None,
                out=str(tmp_path / "curve"), jobs=2)
    opts.update(kw)
    return argparse.Namespace(**opts)


def test_pretrain_input_check_accepts_relabelled_corpus_and_names_a_foreign_one(toy_raw,
                                                                                tmp_path):
    relabelled = make_corpus(tmp_path / "two", seed=TOY_SEED, size="tiny", labelled=2)
    curve.check_pretrain_inputs(relabelled, toy_raw)
    other = make_corpus(tmp_path / "other", seed=TOY_SEED + 1, size="tiny")
    with pytest.raises(SystemExit, match="tvqa_preprocessed_subtitles.jsonl differs"):
        curve.check_pretrain_inputs(other, toy_raw)


def test_jobs_fine_tune_both_tasks_from_the_study_checkpoint_and_from_scratch(tmp_path):
    opts = options(tmp_path, learning_rate=1e-4, lr_mul=10.0)
    with pytest.raises(SystemExit, match="no pre-trained checkpoint"):
        curve.curve_jobs(opts)
    ckpt = tmp_path / "study" / "seed0" / "pretrain" / "ckpt" / "model_step_1500.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    jobs = {j.name: j for j in curve.curve_jobs(opts)}
    assert len(jobs) == 2 * (1 + 4)
    pre, scratch = jobs["l128-tvqa-pretrained"], jobs["l128-tvqa-scratch"]
    assert pre.deps == scratch.deps == ["l128-data"]
    assert pre.argv[pre.argv.index("--checkpoint") + 1] == str(ckpt)
    assert scratch.argv[scratch.argv.index("--checkpoint") + 1] == ""
    assert pre.argv[pre.argv.index("--seed") + 1] == "77"
    cfg = json.loads(Path(pre.argv[pre.argv.index("--config") + 1]).read_text())
    assert cfg["train_query_txt_db"] == str(tmp_path / "curve" / "labelled128" / "dbs" /
                                            "txt_db" / "tvqa_train.db")
    assert (cfg["num_train_steps"], cfg["valid_steps"], cfg["warmup_steps"]) == (600, 600, 40)
    assert (cfg["learning_rate"], cfg["lr_mul"]) == (1e-4, 10.0)
    violin = json.loads(Path(jobs["l16-violin-scratch"].argv[3]).read_text())
    assert (violin["num_train_steps"], violin["warmup_steps"]) == (240, 24)


def test_settings_of_an_out_folder_cannot_change(tmp_path):
    curve.check_settings(tmp_path, options(tmp_path))
    curve.check_settings(tmp_path, options(tmp_path))
    with pytest.raises(SystemExit, match="other settings"):
        curve.check_settings(tmp_path, options(tmp_path, lr_mul=10.0))


def test_updates_default_to_the_demo_configs_and_bad_pairs_are_named():
    assert curve.parse_updates([]) == {"tvqa": 300, "violin": 120}
    assert curve.parse_updates(["tvqa=600"])["tvqa"] == 600
    with pytest.raises(SystemExit, match="'tvr=5'"):
        curve.parse_updates(["tvr=5"])


def test_report_reads_accuracy_early_loss_and_tvqa_question_types(toy_raw, tmp_path):
    opts = options(tmp_path, labelled=[2])
    ldir = tmp_path / "curve" / "labelled2"
    (ldir / "raw").mkdir(parents=True)
    questions = [json.loads(x) for x in (toy_raw / "tvqa_val.jsonl").read_text().splitlines()]
    # the toy asks "who" only; corpora of older generators also asked where and what
    for k, q in enumerate(questions):
        q["q"] = ("Who is here?", "Where is Alice?", "What is Alice doing?")[k % 3]
    (ldir / "raw" / "tvqa_val.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for init, right in (("pretrained", True), ("scratch", False)):
        run = ldir / f"tvqa_{init}"
        write_jsonl_run(run, [(1, "tvqa", 1.6), (100, "tvqa", 1.2), (200, "tvqa", 0.1)],
                        {600: {curve.ACC_KEYS["tvqa"]: 0.5}}, {})
        preds = {str(q["qid"]): q["answer_idx"] if right or q["q"].startswith("Who")
                 else (q["answer_idx"] + 1) % 5 for q in questions}
        (run / "results").mkdir()
        (run / "results" / "val_results_600_all.json").write_text(json.dumps(preds))
    rows = curve.collect(opts)
    tvqa = rows[0]
    assert tvqa["pretrained"]["acc"] == 50.0
    assert tvqa["pretrained"]["early_loss"] == pytest.approx(1.4)
    assert tvqa["pretrained"]["types"] == {"what": 100.0, "where": 100.0, "who": 100.0}
    assert tvqa["scratch"]["types"] == {"what": 0.0, "where": 0.0, "who": 100.0}
    assert rows[1]["pretrained"]["acc"] is None          # violin runs absent
    table = curve.markdown(rows, opts)
    assert "| tvqa | 2 | 50.0 | 50.0 | 1.40 | 1.40 | what 100 where 100 who 100 |" in table
    assert "| violin | 2 | – | – |" in table

"""Label curve of HERO's QA-style heads (TVQA, VIOLIN): pre-trained vs scratch as labels grow.

Usage (from the repository root, after ``make study``)::

    python scripts/qa_label_curve.py [--study study_output] [--seed 0] [--labelled 16 128]
        [--updates tvqa=300 violin=120] [--learning_rate 1e-4 --lr_mul 10] [--out DIR]

Why: in the toy study, TVQA and VIOLIN gain nothing from pre-training (docs/toy_qa.md). For
each label count N this builds the study seed's corpus with N labelled training videos per
dataset (``make_corpus(labelled=N)`` keeps the videos, and so TV's pre-training set, of the
demo corpus; the data job checks that against the study's corpus), then fine-tunes TVQA and
VIOLIN from that seed's pre-trained checkpoint and from scratch, with the demo configs and the
given overrides. ``{out}/label_curve.md`` reports validation accuracy, TVQA accuracy per question
type and the mean QA loss of the first 100 updates (ln 5 = 1.61 and ln 2 = 0.69 are chance: a
run still there learns nothing yet). Jobs, markers and logs work as in :mod:`scripts.study`;
one ``--out`` folder holds one setting (``settings.json``), so give each setting its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.make_report import read_run  # noqa: E402
from scripts.study import (  # noqa: E402
    FINETUNES,
    REPO,
    Job,
    Scheduler,
    demo_config,
    last_checkpoint,
    train_job,
)

TASKS = ("tvqa", "violin")
ACC_KEYS = {"tvqa": "val_tvqa/tvqa_val_valid/acc", "violin": "valid_violin/violin_valid/val_acc"}
QUESTION_TYPES = {"Who": "who", "Where": "where", "What": "what"}
# inputs of pre-training: a labelled corpus must share them with the study's corpus
PRETRAIN_INPUTS = ("tvqa_preprocessed_subtitles.jsonl", "pretrain_splits/tv_train.json",
                   "tokenizer/vocab.json", "tokenizer/merges.txt")
BUILD_DATA = """
import shutil, subprocess, sys
from pathlib import Path
from scripts.toy.build import make_corpus
from scripts.qa_label_curve import check_pretrain_inputs
ldir, seed, labelled, study_raw = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
shutil.rmtree(ldir / "raw", ignore_errors=True)
make_corpus(ldir / "raw", seed=seed, size="demo", labelled=labelled)
check_pretrain_inputs(ldir / "raw", Path(study_raw))
subprocess.run(["bash", "scripts/build_toy_dbs.sh", str(ldir / "raw"), str(ldir / "dbs")],
               check=True)
"""


def check_pretrain_inputs(raw: Path, study_raw: Path) -> None:
    """Stop unless ``raw`` holds the same pre-training inputs as the study's corpus (else the
    study's checkpoint was pre-trained on other data)."""
    for name in PRETRAIN_INPUTS:
        if (raw / name).read_bytes() != (study_raw / name).read_bytes():
            raise SystemExit(f"{raw / name} differs from {study_raw / name}: this corpus is not "
                             "the one the study pre-trained on (was the toy generator changed "
                             "since `make study`? re-run it first)")


def fine_tune_edit(updates: int, opts):
    """Config edit: ``updates`` updates (warm-up scaled with them), validated once at the end;
    the LR overrides when given."""
    def edit(cfg):
        warmup = max(1, round(cfg["warmup_steps"] * updates / cfg["num_train_steps"]))
        cfg.update(num_train_steps=updates, valid_steps=updates, save_steps=updates,
                   warmup_steps=warmup)
        if opts.learning_rate is not None:
            cfg["learning_rate"] = opts.learning_rate
        if opts.lr_mul is not None:
            cfg["lr_mul"] = opts.lr_mul
    return edit


def curve_jobs(opts) -> list:
    """Per label count: the corpus + DBs, then both tasks from both starts."""
    study, out = Path(opts.study).resolve(), Path(opts.out).resolve()
    ckpt = last_checkpoint(study / f"seed{opts.seed}" / "pretrain")
    if not Path(ckpt).is_file():
        raise SystemExit(f"--study {study}: no pre-trained checkpoint {ckpt}; run `make study`")
    jobs = []
    for n in opts.labelled:
        ldir = out / f"labelled{n}"
        data = Job(f"l{n}-data", [sys.executable, "-c", BUILD_DATA, str(ldir), str(opts.seed),
                                  str(n), str(study / f"seed{opts.seed}" / "raw")],
                   ldir / "dbs", weight=0.2)
        jobs.append(data)
        for task in TASKS:
            script, config = FINETUNES[task]
            cfg = demo_config(config, ldir, ldir / "configs",
                              fine_tune_edit(opts.updates[task], opts))
            for init, start in (("pretrained", ckpt), ("scratch", "")):
                jobs.append(train_job(f"l{n}-{task}-{init}", script, cfg,
                                      ldir / f"{task}_{init}", opts.seed, [data.name],
                                      opts.updates[task] / 100, start))
    return jobs


def type_accuracy(run_dir: Path, raw: Path) -> dict:
    """TVQA validation accuracy (%) per question type, from the newest predictions file."""
    files = sorted((run_dir / "results").glob("val_results_*_all.json"),
                   key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    questions = {str(q["qid"]): q for q in map(json.loads,
                                                (raw / "tvqa_val.jsonl").read_text().splitlines())}
    hits: dict = {}
    for qid, pred in json.loads(files[-1].read_text()).items():
        q = questions[qid]
        kind = QUESTION_TYPES.get(q["q"].split()[0], "other")
        hits.setdefault(kind, []).append(pred == q["answer_idx"])
    return {k: 100 * sum(v) / len(v) for k, v in sorted(hits.items())}


def run_row(run_dir: Path, task: str, raw: Path) -> dict:
    """Accuracy, early loss and (TVQA) per-type accuracy of one fine-tuning run."""
    run = read_run(run_dir)
    acc = run.valid.get(ACC_KEYS[task]) if run else None
    early = [loss for step, loss in (run.losses.get(task, []) if run else []) if step <= 100]
    return {"acc": 100 * acc[-1][1] if acc else None,
            "early_loss": sum(early) / len(early) if early else None,
            "types": type_accuracy(run_dir, raw) if task == "tvqa" else {}}


def collect(opts) -> list:
    out = Path(opts.out).resolve()
    rows = []
    for n in opts.labelled:
        ldir = out / f"labelled{n}"
        train = ldir / "raw" / "tvqa_train.jsonl"
        for task in TASKS:
            row = {"task": task, "labelled": n, "tvqa_train_questions":
                   len(train.read_text().splitlines()) if train.is_file() else None}
            for init in ("pretrained", "scratch"):
                row[init] = run_row(ldir / f"{task}_{init}", task, ldir / "raw")
            rows.append(row)
    return rows


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list, opts) -> str:
    lr = ", ".join(f"{k} {v}" for k, v in (("learning_rate", opts.learning_rate),
                                            ("lr_mul", opts.lr_mul)) if v is not None)
    lines = [f"# QA label curve (study seed {opts.seed})", "",
             f"Updates: {', '.join(f'{t} {u}' for t, u in opts.updates.items())}; "
             f"learning rate: {lr or 'the demo configs'}. Early loss = mean training loss of "
             "updates 1-100 (chance: TVQA 1.61, VIOLIN 0.69).", "",
             "| task | labelled videos | pre-trained acc | scratch acc | pre-trained early loss "
             "| scratch early loss | pre-trained per type | scratch per type |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        pre, scr = r["pretrained"], r["scratch"]
        types = [" ".join(f"{k} {v:.0f}" for k, v in x["types"].items()) or "–"
                 for x in (pre, scr)]
        lines.append(f"| {r['task']} | {r['labelled']} | {fmt(pre['acc'])} | {fmt(scr['acc'])} "
                     f"| {fmt(pre['early_loss'], 2)} | {fmt(scr['early_loss'], 2)} "
                     f"| {types[0]} | {types[1]} |")
    return "\n".join(lines) + "\n"


def check_settings(out: Path, opts) -> None:
    """Finished jobs are reused by name, so one ``--out`` folder holds one setting."""
    settings = {"study": str(Path(opts.study).resolve()), "seed": opts.seed,
                "updates": opts.updates, "learning_rate": opts.learning_rate,
                "lr_mul": opts.lr_mul}
    path = out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"--out {out} holds runs of other settings ({path}); give another "
                         "--out for these")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def parse_updates(pairs: list) -> dict:
    updates = {t: json.loads((REPO / "config" / FINETUNES[t][1]).read_text())["num_train_steps"]
               for t in TASKS}
    for pair in pairs:
        task, _, value = pair.partition("=")
        if task not in updates or not value.isdigit():
            raise SystemExit(f"--updates {pair!r}: expected TASK=N with TASK one of {TASKS}")
        updates[task] = int(value)
    return updates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="study_output", help="a finished `make study` folder")
    parser.add_argument("--seed", type=int, default=0, help="the study seed to reuse")
    parser.add_argument("--labelled", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--updates", nargs="*", default=[], help="TASK=N (default: demo configs)")
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--lr_mul", type=float, default=None)
    parser.add_argument("--out", default="qa_curve_output")
    parser.add_argument("--jobs", type=int, default=2)
    opts = parser.parse_args(argv)
    opts.updates = parse_updates(opts.updates)
    check_settings(Path(opts.out).resolve(), opts)
    jobs = curve_jobs(opts)
    Scheduler(Path(opts.out).resolve(), jobs, opts.jobs).run()
    rows = collect(opts)
    out = Path(opts.out).resolve()
    (out / "label_curve.json").write_text(json.dumps(rows, indent=1))
    (out / "label_curve.md").write_text(markdown(rows, opts))
    print(f"label curve written to {out / 'label_curve.md'}")


if __name__ == "__main__":
    main()

"""Write the demo report: per task, pre-trained+fine-tuned vs from-scratch vs chance, with plots.

Usage (from the repository root)::

    python scripts/make_report.py --demo_dir demo_output

Reads the runs that ``scripts/demo.sh`` lays out under ``--demo_dir``::

    pretrain/                          the pre-training run (mlm, mfm-nce, fom, vsm)
    finetune/{task}_{pretrained,scratch}/   one fine-tuning run per task and initialisation

and writes ``report.md``, ``plots/loss_*.png`` (training loss vs update) and
``plots/metrics.png`` into ``--demo_dir``, then prints a short table. A run's log is
``log/metrics.jsonl`` (the engine's raw per-update losses and every validation) or, for runs
without it, the TensorBoard event files in ``log/`` (whose losses are the 0.99 running means).

Decisions:
- A run's metric is its **last** validation (upstream never selects a best checkpoint,
  training.md §8 q2); missing runs or metrics show as "-".
- Chance is what a predictor that ignores its input scores with the same metric code:
  QA 1/5, VIOLIN 1/2, video retrieval R@K = min(K, V)/V over the V corpus videos of the split;
  VCMR is the mean of 5 draws of uniformly random (video, moment) predictions that respect
  ``min_pred_l``/``max_pred_l``, scored by :func:`utils.tvr_standalone_eval.eval_retrieval`;
  TVC scores, for every clip, a reference caption of another random clip with ``TVCEval``.
- Accuracies (logged as fractions) are shown in %, like the retrieval and caption metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOGGER = logging.getLogger("make_report")
INITS = ("pretrained", "scratch")
LOSS_COMPONENTS = ("_st_ed", "_neg_ctx", "_neg_q", "_qa")
CHANCE_DRAWS = 5
# the committed summary of the last `make study` run (docs/toy_study.md says how it was made)
STUDY_SUMMARY = Path(__file__).resolve().parents[1] / "docs" / "toy_study.json"


class Metric(NamedTuple):
    label: str
    key: str          # TensorBoard key written by the task's validation
    chance: str       # how chance is computed: qa5, binary, vr@K, vcmr, tvc
    scale: float = 1.0


class TaskSpec(NamedTuple):
    name: str         # run folder prefix and engine task name
    title: str
    metrics: tuple    # the first is the task's headline metric (scripts/study_report.py)


def _vcmr(split: str, key: str) -> Metric:
    return Metric(f"VCMR R@{key.split('-r')[1]} IoU{key.split('-')[0]}",
                  f"valid_{split}_VCMR/VCMR_{key}", "vcmr")


def _vr(split: str, k: int) -> Metric:
    return Metric(f"VR R@{k}", f"valid_{split}_VR/VR_r{k}", f"vr@{k}")


TASKS = (
    TaskSpec("tvr", "TVR (VCMR)", (_vcmr("val", "0.5-r10"), _vcmr("val", "0.7-r10"),
                                   _vcmr("val", "0.7-r100"), _vr("val", 1), _vr("val", 10))),
    TaskSpec("tvqa", "TVQA", (Metric("accuracy", "val_tvqa/tvqa_val_valid/acc", "qa5", 100),)),
    TaskSpec("violin", "VIOLIN", (
        Metric("val accuracy", "valid_violin/violin_valid/val_acc", "binary", 100),
        Metric("test accuracy", "valid_violin/violin_valid/test_acc", "binary", 100))),
    TaskSpec("tvc", "TVC (captioning)", tuple(Metric(k, k, "tvc") for k in
                                              ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"))),
    TaskSpec("didemo_video_only", "DiDeMo (VCMR, video only)", (
        _vcmr("val", "0.5-r10"), _vcmr("val", "0.7-r10"), _vcmr("val", "0.7-r100"),
        _vr("val", 1), _vr("val", 5))),
    TaskSpec("msrvtt_video_only", "MSR-VTT (video retrieval, video only)",
             (_vr("val", 1), _vr("val", 5), _vr("val", 10))),
)


# --------------------------------------------------------------------------- reading runs
class RunLog(NamedTuple):
    losses: dict      # task -> [(step, loss)]
    valid: dict       # key -> [(step, value)]
    hps: dict
    source: str


def read_jsonl_log(path: Path) -> tuple[dict, dict]:
    """(losses, valid) from ``metrics.jsonl``; the last record of a step wins (resumed runs)."""
    train, valid = {}, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "valid" in rec:
            for key, value in rec["valid"].items():
                valid.setdefault(key, {})[rec["step"]] = value
        elif rec.get("loss") is not None:
            train.setdefault(rec["task"], {})[rec["step"]] = rec["loss"]
    as_lists = lambda d: {k: sorted(v.items()) for k, v in d.items()}
    return as_lists(train), as_lists(valid)


def read_tb_log(log_dir: Path) -> tuple[dict, dict]:
    """(losses, valid) from TensorBoard events: ``loss/{task}`` (or TVC's bare ``loss``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    losses, valid = {}, {}
    for tag in acc.Tags()["scalars"]:
        points = sorted({e.step: e.value for e in acc.Scalars(tag)}.items())
        if tag == "loss" or (tag.startswith("loss/") and not tag.endswith(LOSS_COMPONENTS)):
            losses[tag.split("/", 1)[-1]] = points
        elif not tag.startswith(("lr", "grad_norm", "loss", "perf/")):
            valid[tag] = points
    return losses, valid


def read_run(run_dir: Path) -> RunLog | None:
    """The run's log, or None when the run folder has no log yet."""
    log_dir = run_dir / "log"
    hps_path = log_dir / "hps.json"
    hps = json.loads(hps_path.read_text()) if hps_path.is_file() else {}
    if (log_dir / "metrics.jsonl").is_file():
        return RunLog(*read_jsonl_log(log_dir / "metrics.jsonl"), hps, "metrics.jsonl")
    if any(log_dir.glob("events.*")):
        return RunLog(*read_tb_log(log_dir), hps, "tensorboard")
    return None


def final_value(run: RunLog | None, metric: Metric):
    if run is None or not run.valid.get(metric.key):
        return None
    return run.valid[metric.key][-1][1] * metric.scale


# --------------------------------------------------------------------------- chance
def _read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _corpus_videos(run_dir: Path, gts: list) -> list:
    """Videos the split was ranked over: a saved results file's ``video2idx``, else GT videos."""
    for path in sorted((run_dir / "results").glob("val_results_*.json")):
        video2idx = json.loads(path.read_text()).get("video2idx")
        if video2idx:
            return sorted(video2idx)
    return sorted({g["vid_name"] for g in gts})


def random_vcmr_submission(rng, gts, videos, nframes, hps) -> dict:
    """100 uniformly random moments per query, lengths as the model may predict them."""
    lo, hi = hps.get("min_pred_l", 2), hps.get("max_pred_l", 16)
    interval, n_pred = float(hps.get("vfeat_interval", 1.5)), hps.get("max_after_nms", 100)
    video2idx = {v: i for i, v in enumerate(videos)}
    rows = []
    for g in gts:
        preds = []
        for _ in range(n_pred):
            vid = rng.choice(videos)
            n = max(1, min(nframes.get(vid, 1), hps.get("max_clip_len", 100)))
            span = rng.choice(range(lo, min(hi, n)) or [n - 1])  # end frame j = st + span
            st = rng.randint(0, n - 1 - span)
            preds.append([video2idx[vid], st * interval, (st + span + 1) * interval, 1.0])
        rows.append({"desc_id": g["desc_id"], "desc": "", "predictions": preds})
    return {"VCMR": rows, "video2idx": video2idx}


def vcmr_chance(run_dir: Path, hps: dict, metric_keys: list) -> dict:
    from utils.tvr_standalone_eval import eval_retrieval
    gts = _read_jsonl(Path(hps["val_query_txt_db"]) / "query_data.jsonl")
    videos = _corpus_videos(run_dir, gts)
    nframes = json.loads((Path(hps["vfeat_db"]) / "id2nframe.json").read_text())
    rng, sums = random.Random(0), dict.fromkeys(metric_keys, 0.0)
    for _ in range(CHANCE_DRAWS):
        sub = random_vcmr_submission(rng, gts, videos, nframes, hps)
        scores = eval_retrieval(sub, gts, verbose=False, use_desc_type=False)["VCMR"]
        for key in metric_keys:
            sums[key] += scores[key.rsplit("VCMR_", 1)[1]] / CHANCE_DRAWS
    return sums


def vr_chance(run_dir: Path, hps: dict, k: int) -> float:
    gts = _read_jsonl(Path(hps["val_query_txt_db"]) / "query_data.jsonl")
    if gts and "clip_name" in gts[0]:
        gts = [{**g, "vid_name": g["clip_name"]} for g in gts]
    videos = _corpus_videos(run_dir, gts)
    return 100.0 * min(k, len(videos)) / len(videos)


def tvc_chance(hps: dict) -> dict:
    """Each clip captioned with a reference of another random clip."""
    from eval.tvc import TVCEval
    refs = _read_jsonl(hps["val_ref"])
    rng = random.Random(0)
    results = []
    for i, clip in enumerate(refs):
        other = refs[rng.choice([j for j in range(len(refs)) if j != i] or [i])]
        results.append({"vid_name": clip["vid_name"], "clip_id": clip["clip_id"],
                        "ts": clip["ts"], "descs": [{"desc": other["descs"][0]["desc"]}]})
    return TVCEval(hps["val_ref"])(results)


def chance_values(spec: TaskSpec, run_dir: Path | None, hps: dict) -> dict:
    """metric key -> chance value (None where the run's inputs are unavailable)."""
    out = {m.key: {"qa5": 20.0, "binary": 50.0}.get(m.chance) for m in spec.metrics}
    if run_dir is None or not hps:
        return out
    try:
        vcmr = [m.key for m in spec.metrics if m.chance == "vcmr"]
        if vcmr:
            out.update(vcmr_chance(run_dir, hps, vcmr))
        for m in spec.metrics:
            if m.chance.startswith("vr@"):
                out[m.key] = vr_chance(run_dir, hps, int(m.chance[3:]))
        if any(m.chance == "tvc" for m in spec.metrics):
            out.update(tvc_chance(hps))
    except (OSError, KeyError, ValueError) as exc:
        LOGGER.warning("chance level of %s not computed: %s", spec.name, exc)
    return out


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _smooth(values: list, window: int = 10) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(curves: dict, title: str, path: Path) -> Path:
    """One line per curve (label -> [(step, loss)]): raw values faint, moving average solid.

    Losses of different tasks differ by orders of magnitude (MFM-NCE vs VSM), so the y axis
    is logarithmic whenever every value is positive.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, points) in enumerate(sorted(curves.items())):
        steps, values = zip(*points)
        color = f"C{i}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(list(values)), color=color, label=label)
    ax.set(title=title, xlabel="update", ylabel="training loss")
    if all(v > 0 for points in curves.values() for _, v in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics(rows: list, path: Path) -> Path:
    """Grouped bars per task: pre-trained+fine-tuned, from scratch, chance."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task]
        for j, (col, label) in enumerate((("pretrained", "pre-trained + FT"),
                                          ("scratch", "from scratch"), ("chance", "chance"))):
            xs = [i + (j - 1) * 0.27 for i in range(len(mine))]
            ax.bar(xs, [r[col] or 0.0 for r in mine], width=0.27, label=label, color=f"C{j}")
        ax.set_xticks(range(len(mine)), [r["metric"] for r in mine], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(task, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report
def collect(demo_dir: Path) -> tuple[list, dict]:
    """(metric rows, task -> {init: RunLog}) for every task of :data:`TASKS`."""
    rows, runs = [], {}
    for spec in TASKS:
        runs[spec.name] = {i: read_run(demo_dir / "finetune" / f"{spec.name}_{i}") for i in INITS}
        ref = next((i for i in INITS if runs[spec.name][i] is not None), None)
        run_dir = demo_dir / "finetune" / f"{spec.name}_{ref}" if ref else None
        chance = chance_values(spec, run_dir, runs[spec.name][ref].hps if ref else {})
        for m in spec.metrics:
            rows.append({"task": spec.title, "metric": m.label,
                         **{i: final_value(runs[spec.name][i], m) for i in INITS},
                         "chance": chance.get(m.key)})
    return rows, runs


def make_plots(demo_dir: Path, runs: dict, rows: list) -> list:
    out_dir = demo_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    pretrain = read_run(demo_dir / "pretrain")
    if pretrain is not None and pretrain.losses:
        plots.append(plot_losses(pretrain.losses, "pre-training (per task)",
                                 out_dir / "loss_pretrain.png"))
    for spec in TASKS:
        curves = {f"{i}: {task}": points for i, run in runs[spec.name].items() if run
                  for task, points in run.losses.items()}
        if curves:
            plots.append(plot_losses(curves, spec.title, out_dir / f"loss_{spec.name}.png"))
    if any(r[i] is not None for r in rows for i in INITS):
        plots.append(plot_metrics(rows, out_dir / "metrics.png"))
    return plots


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_mean_std(d: dict) -> str:
    """A study summary's ``{"mean", "std"}`` as ``mean ± std`` (scripts/study_report.py)."""
    return "-" if d["mean"] is None else f"{d['mean']:.1f} ± {d['std']:.1f}"


def fmt_beyond(flag) -> str:
    """A study summary's ``beyond_spread``: yes / no / - (not computed)."""
    return {True: "yes", False: "no"}.get(flag, "-")


def table(rows: list) -> list:
    head = ["| task | metric | pre-trained + fine-tuned | from scratch | chance |",
            "|---|---|---:|---:|---:|"]
    return head + [f"| {r['task']} | {r['metric']} | {fmt(r['pretrained'])} | "
                   f"{fmt(r['scratch'])} | {fmt(r['chance'])} |" for r in rows]


def timings_section(demo_dir: Path) -> list:
    """The demo's per-step wall times (``timings.tsv``, written by scripts/demo.sh)."""
    path = demo_dir / "timings.tsv"
    if not path.is_file():
        return []
    lines = ["## Demo steps", "", "Build time of every step (a reused step shows the time it "
             "took when it was built).", "", "| step | seconds | this run |", "|---|---:|---|"]
    total = 0.0
    for line in path.read_text().splitlines():
        name, secs, how = line.split("\t")
        secs = float(secs) if secs.strip() else 0.0
        total += secs
        lines.append(f"| {name} | {secs:.0f} | {how} |")
    return lines + [f"| **total** | **{total:.0f}** | |", ""]


def spread_section(study_path: Path | None, rows: list) -> list:
    """This run's headline gaps beside the seed spread of the last ``make study``
    (``study.json``, see scripts/study_report.py), so a reader can tell which gaps are real."""
    if study_path is None or not study_path.is_file():
        return []
    study = json.loads(study_path.read_text())
    head = ["## How large is the seed spread?", "",
            f"From `make study` ({len(study['seeds'])} seeds, {study['machine']}): mean ± std "
            "over seeds of the headline metric; the gap of this run beside them. A gap smaller "
            "than the spread can flip with the seed or the machine.", "",
            "| task | metric | this run's gap | study: pre-trained | study: scratch | "
            "study: gap beyond spread |", "|---|---|---:|---:|---:|---|"]
    mine = {(r["task"], r["metric"]): r for r in rows}
    for spec in TASKS:
        s, m = study["tasks"].get(spec.name), spec.metrics[0]
        r = mine.get((spec.title, m.label))
        if not s or not r:
            continue
        gap = (r["pretrained"] - r["scratch"]) if None not in (r["pretrained"], r["scratch"]) \
            else None
        head.append(f"| {spec.title} | {m.label} | {'-' if gap is None else f'{gap:+.1f}'} | "
                    f"{fmt_mean_std(s['pretrained'])} | {fmt_mean_std(s['scratch'])} | "
                    f"{fmt_beyond(s.get('beyond_spread'))} |")
    return head + [""]


def write_report(demo_dir: Path, rows: list, plots: list, study: Path | None = None) -> Path:
    lines = ["# hero demo report", "",
             "Toy corpus, CPU. Each task is fine-tuned twice with the same budget: from the "
             "demo's pre-trained checkpoint and from random initialisation. Numbers are the last "
             "validation of each run, in % (see `scripts/make_report.py` for how chance is "
             "computed). Toy-scale runs: expect trends, not paper numbers.", "",
             *table(rows), "", *spread_section(study, rows), *timings_section(demo_dir),
             "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = demo_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_table(rows: list) -> None:
    print(f"{'task':<38} {'metric':<22} {'pretrained':>10} {'scratch':>8} {'chance':>7}")
    for r in rows:
        print(f"{r['task']:<38} {r['metric']:<22} {fmt(r['pretrained']):>10} "
              f"{fmt(r['scratch']):>8} {fmt(r['chance']):>7}")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_dir", default="demo_output", help="the demo's output folder")
    parser.add_argument("--study", default=str(STUDY_SUMMARY),
                        help="study.json of a `make study` run, for the seed spread ('' = none)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    demo_dir = Path(opts.demo_dir)
    if not demo_dir.is_dir():
        raise SystemExit(f"--demo_dir {demo_dir} not found; run `make demo` first")
    return report(demo_dir, Path(opts.study) if opts.study else None)[0]


def report(demo_dir: Path, study: Path | None) -> tuple[Path, list]:
    """Write ``report.md`` and the plots of ``demo_dir``, print the table; (path, rows)."""
    rows, runs = collect(demo_dir)
    missing = sum(r[i] is None for r in rows for i in INITS)
    if missing:
        LOGGER.warning("%d of %d run metrics missing (shown as '-')", missing, 2 * len(rows))
    path = write_report(demo_dir, rows, make_plots(demo_dir, runs, rows), study)
    print_table(rows)
    print(f"report: {path}")
    return path, rows


if __name__ == "__main__":
    main()

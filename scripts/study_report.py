"""The report of ``make study`` (``scripts/study.py``): seeds and ablation, with error bars.

Usage (from the repository root)::

    python scripts/study_report.py --study_dir study_output

Reads ``{study_dir}/seed{s}/`` (each laid out like the demo's folder; its own ``report.md`` is
written by :mod:`scripts.make_report`) and ``seed{s}/ablation/{variant}/finetune/``, and writes
``study.md``, ``study.json`` and ``plots/{seeds,ablation}.png`` into ``--study_dir``.

Decisions:
- Each task is judged on its headline metric (the first of :data:`make_report.TASKS`: TVR and
  DiDeMo VCMR R@10 IoU 0.5, TVQA accuracy, VIOLIN val accuracy, TVC CIDEr, MSR-VTT VR R@1).
- The seed spread of a mean is the sample standard deviation over seeds (ddof 1). A gap is
  called *beyond the seed spread* when the mean gap exceeds the sum of the two standard
  deviations (the mean +- std intervals of pre-trained and scratch do not overlap).
- The ablation runs on the first seed only (budget); its rows are read against that seed's
  main run ("all four") and scratch run, with the main study's spread beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import make_report  # noqa: E402
from scripts.study import ABLATION_TASKS, ABLATIONS  # noqa: E402

HEADLINE = {spec.name: spec.metrics[0] for spec in make_report.TASKS}
TITLES = {spec.name: spec.title for spec in make_report.TASKS}
ABLATION_LABELS = {"mlm_mfm-nce": "MLM + MFM-NCE", "mlm_mfm-nce_fom": "MLM + MFM-NCE + FOM",
                   "mlm_mfm-nce_vsm": "MLM + MFM-NCE + VSM",
                   "all": "MLM + MFM-NCE + FOM + VSM (all four)",
                   "mlm_mffr_fom_vsm": "MLM + MFFR + FOM + VSM"}


def seed_dirs(study_dir: Path) -> list:
    return sorted((p for p in study_dir.glob("seed*") if p.is_dir()),
                  key=lambda p: int(p.name[4:]))


def run_value(run_dir: Path, task: str):
    return make_report.final_value(make_report.read_run(run_dir), HEADLINE[task])


def mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def task_summary(seeds: list, task: str) -> dict:
    """Per-seed values, mean and std of both inits, and whether the gap beats the spread."""
    out = {"metric": HEADLINE[task].label, "title": TITLES[task]}
    for init in make_report.INITS:
        vals = [run_value(s / "finetune" / f"{task}_{init}", task) for s in seeds]
        out[init] = {"values": vals, **dict(zip(("mean", "std"), mean_std(vals)))}
    pre, scr = out["pretrained"], out["scratch"]
    if pre["mean"] is not None and scr["mean"] is not None:
        out["gap"] = pre["mean"] - scr["mean"]
        out["beyond_spread"] = out["gap"] > pre["std"] + scr["std"]
    return out


def ablation_summary(seed: Path) -> dict:
    """variant -> task -> value, with "all" (the main run) and "scratch" for reference."""
    rows = {"scratch": {t: run_value(seed / "finetune" / f"{t}_scratch", t)
                        for t in ABLATION_TASKS}}
    for variant in ABLATIONS:
        rows[variant] = {t: run_value(seed / "ablation" / variant / "finetune" /
                                      f"{t}_pretrained", t) for t in ABLATION_TASKS}
    rows["all"] = {t: run_value(seed / "finetune" / f"{t}_pretrained", t)
                   for t in ABLATION_TASKS}
    return rows


def chance_of(rows: list) -> dict:
    """Headline chance level per task, from a seed's demo-report rows."""
    firsts = {}
    for row in rows:
        firsts.setdefault(row["task"], row["chance"])
    return {name: firsts.get(title) for name, title in TITLES.items()}


def seeds_table(summary: dict, chance: dict) -> list:
    lines = ["| task | metric | pre-trained | from scratch | gap | beyond seed spread | chance |",
             "|---|---|---:|---:|---:|---|---:|"]
    for task, s in summary.items():
        gap = f"{s['gap']:+.1f}" if "gap" in s else "-"
        lines.append(f"| {s['title']} | {s['metric']} | "
                     f"{make_report.fmt_mean_std(s['pretrained'])} | "
                     f"{make_report.fmt_mean_std(s['scratch'])} | {gap} | "
                     f"{make_report.fmt_beyond(s.get('beyond_spread'))} | "
                     f"{make_report.fmt(chance.get(task))} |")
    return lines


ABLATION_ORDER = ("scratch", "mlm_mfm-nce", "mlm_mfm-nce_fom", "mlm_mfm-nce_vsm", "all",
                  "mlm_mffr_fom_vsm")


def ablation_table(ablation: dict, summary: dict) -> list:
    head = " | ".join(f"{TITLES[t]} {HEADLINE[t].label}" for t in ABLATION_TASKS)
    lines = [f"| pre-training tasks | {head} |", "|---|" + "---:|" * len(ABLATION_TASKS)]
    labels = {"scratch": "none (from scratch)", **ABLATION_LABELS}
    for variant in ABLATION_ORDER:
        values = " | ".join(make_report.fmt(ablation[variant][t]) for t in ABLATION_TASKS)
        lines.append(f"| {labels[variant]} | {values} |")
    spread = " | ".join(fmt_std(summary[t]["pretrained"]["std"]) for t in ABLATION_TASKS)
    return lines + [f"| *seed spread of the pre-trained runs (std, main study)* | {spread} |"]


# (finding, task, variant, compared with, what the paper reports; training.md §7.2)
PAPER_FINDINGS = (
    ("adding VSM to MLM + MFM-NCE", "tvr", "mlm_mfm-nce_vsm", "mlm_mfm-nce",
     "VSM brings the largest gain on retrieval"),
    ("adding FOM to MLM + MFM-NCE", "tvqa", "mlm_mfm-nce_fom", "mlm_mfm-nce", "FOM helps QA"),
    ("MFM-NCE instead of MFFR", "tvr", "all", "mlm_mffr_fom_vsm", "MFM-NCE beats MFFR"),
    ("MFM-NCE instead of MFFR", "tvqa", "all", "mlm_mffr_fom_vsm", "MFM-NCE beats MFFR"),
)


def ablation_findings(ablation: dict, summary: dict) -> list:
    """One line per finding of the paper: the measured change, and whether it exceeds the seed
    spread (std of the pre-trained runs of that task in the main study)."""
    lines = ["Measured against the paper's findings (HERO §4; one seed each, so a change is "
             "only called real when it exceeds the seed spread of the main study):", ""]
    for what, task, variant, base, paper in PAPER_FINDINGS:
        new, old = ablation[variant][task], ablation[base][task]
        std = summary[task]["pretrained"]["std"]
        if new is None or old is None or std is None:
            continue
        delta = new - old
        verdict = ("beyond" if abs(delta) > std else "within") + f" the spread ± {std:.1f}"
        agrees = "agrees" if delta > std else ("contradicts" if delta < -std else "unresolved")
        lines.append(f"- {what}: {TITLES[task]} {HEADLINE[task].label} {old:.1f} -> "
                     f"{new:.1f} ({delta:+.1f}, {verdict}); paper: {paper} -> {agrees}.")
    return lines


def fmt_std(std) -> str:
    return "-" if std is None else f"± {std:.1f}"


def plot_seeds(summary: dict, path: Path) -> Path:
    """Per task: mean +- std bars of pre-trained and scratch, each seed as a dot."""
    plt = make_report._pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(2.3 * len(summary), 3.4))
    for ax, s in zip(axes, summary.values()):
        for j, init in enumerate(make_report.INITS):
            d = s[init]
            if d["mean"] is None:
                continue
            ax.bar(j, d["mean"], yerr=d["std"], color=f"C{j}", capsize=4, label=init)
            vals = [v for v in d["values"] if v is not None]
            ax.plot([j] * len(vals), vals, "k.", markersize=4)
        ax.set_xticks([0, 1], ["pre-trained", "scratch"], fontsize=7)
        ax.set_title(f"{s['title']}\n{s['metric']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ablation(ablation: dict, path: Path) -> Path:
    plt = make_report._pyplot()
    fig, axes = plt.subplots(1, len(ABLATION_TASKS), figsize=(5 * len(ABLATION_TASKS), 3.6))
    labels = {"scratch": "scratch", "mlm_mfm-nce": "MLM+NCE", "mlm_mfm-nce_fom": "+FOM",
              "mlm_mfm-nce_vsm": "+VSM", "all": "all four", "mlm_mffr_fom_vsm": "MFFR for NCE"}
    for ax, task in zip(axes, ABLATION_TASKS):
        vals = [ablation[v][task] or 0.0 for v in ABLATION_ORDER]
        ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)), [labels[v] for v in ABLATION_ORDER], rotation=30,
                      ha="right", fontsize=7)
        ax.set_title(f"{TITLES[task]}: {HEADLINE[task].label}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def machine() -> str:
    return f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, Python " \
           f"{platform.python_version()}"


def write_markdown(study_dir: Path, data: dict, plots: list) -> Path:
    n_beyond = sum(bool(s.get("beyond_spread")) for s in data["tasks"].values())
    lines = ["# hero toy study", "",
             f"{len(data['seeds'])} seeds ({', '.join(map(str, data['seeds']))}) of the demo's "
             "corpus, pre-training and fine-tuning (scripts/study.py); "
             f"{data['wall_s']} on {data['machine']}. Headline metric per task, in %, last "
             "validation; mean ± sample std over seeds. *Beyond seed spread*: the gap exceeds the "
             "sum of the two stds.", "",
             *seeds_table(data["tasks"], data["chance"]), "",
             f"Pre-trained beats scratch beyond the seed spread on **{n_beyond} of "
             f"{len(data['tasks'])}** tasks.", ""]
    if data.get("ablation"):
        lines += ["## Pre-training task ablation (seed "
                  f"{data['seeds'][0]}, fine-tuned on TVR and TVQA)", "",
                  *ablation_table(data["ablation"], data["tasks"]), "",
                  *ablation_findings(data["ablation"], data["tasks"]), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = study_dir / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(study_dir: Path, wall_s) -> dict:
    seeds = seed_dirs(study_dir)
    if not seeds:
        raise SystemExit(f"--study_dir {study_dir}: no seed*/ folders; run `make study`")
    rows = [make_report.report(seed, None)[1] for seed in seeds]
    data = {"seeds": [int(s.name[4:]) for s in seeds], "machine": machine(), "wall_s": wall_s,
            "tasks": {t: task_summary(seeds, t) for t in HEADLINE},
            "chance": chance_of(rows[0])}
    if (seeds[0] / "ablation").is_dir():
        data["ablation"] = ablation_summary(seeds[0])
    return data


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study_dir", default="study_output")
    parser.add_argument("--wall_s", default="? s", help="the study's wall time, with its unit "
                        "(for the report)")
    opts = parser.parse_args(argv)
    study_dir = Path(opts.study_dir)
    data = build(study_dir, opts.wall_s)
    (study_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = [plot_seeds(data["tasks"], study_dir / "plots" / "seeds.png")]
    if data.get("ablation"):
        plots.append(plot_ablation(data["ablation"], study_dir / "plots" / "ablation.png"))
    (study_dir / "study.json").write_text(json.dumps(data, indent=1))
    path = write_markdown(study_dir, data, plots)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()

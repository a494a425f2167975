"""The toy study (``make study``): does pre-training pay off, beyond the seed spread?

Usage (from the repository root)::

    python scripts/study.py [--out study_output] [--seeds 0 1 2] [--jobs 2] [--no_ablation]

For each seed ``s`` it runs what ``make demo`` runs (scripts/toy/README.md says why the toy world
is built the way it is): corpus ``s`` -> LMDBs -> pre-training (mlm, mfm-nce, fom, vsm) -> the six
fine-tuning tasks from the pre-trained checkpoint and from scratch, training seed ``77 + s``
(seed 0: the demo's corpus and seeds; the demo pre-trains with two threads and every study job
runs on one, and the different float summation order, amplified by training, moves the
numbers by about a seed spread). For seed 0 it also pre-trains the ablation variants of HERO's
Table 3 (:data:`ABLATIONS`) and fine-tunes TVR and TVQA from each. The budgets are the
demo configs' (``config/*-demo.json``). Then :mod:`scripts.study_report` writes
``{out}/study.md``, ``{out}/study.json`` and the plots.

Jobs run ``--jobs`` at a time (one CPU thread each), as their inputs become ready; each writes
its output to ``{out}/logs/<job>.log``. A finished job leaves ``{out}/.jobs/<job>.done`` and is
reused by the next run (delete the marker, or the folder, to redo it); an unfinished one is
redone from a clean folder. A failing job stops the study (running ones finish first), named
with the end of its log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]
TRAIN_SEED = 77
FINETUNES = {"tvr": ("train_vcmr.py", "train-tvr-demo.json"),
             "tvqa": ("train_videoQA.py", "train-tvqa-demo.json"),
             "violin": ("train_violin.py", "train-violin-demo.json"),
             "tvc": ("train_tvc.py", "train-tvc-demo.json"),
             "didemo_video_only": ("train_vcmr.py", "train-didemo_video_only-demo.json"),
             "msrvtt_video_only": ("train_vr.py", "train-msrvtt_video_only-demo.json")}
ABLATION_TASKS = ("tvr", "tvqa")
# variant -> pre-training tasks (with the demo config's ratio of each); "all" is the main run
ABLATIONS = {"mlm_mfm-nce": ("mlm", "mfm-nce"),
             "mlm_mfm-nce_fom": ("mlm", "mfm-nce", "fom"),
             "mlm_mfm-nce_vsm": ("mlm", "mfm-nce", "vsm"),
             "mlm_mffr_fom_vsm": ("mlm", "mffr", "fom", "vsm")}


@dataclass
class Job:
    name: str
    argv: list
    out_dir: Path           # emptied before the job runs
    deps: list = field(default_factory=list)
    weight: float = 1.0     # expected run time, relative: heavy jobs start first


def pretrain_steps() -> int:
    return json.loads((REPO / "config" / "pretrain-demo.json").read_text())["num_train_steps"]


def demo_config(name: str, out: Path, cfg_dir: Path, edit=None) -> Path:
    """config/NAME with its ``demo_output/`` paths pointed at ``out``; ``edit`` changes it."""
    cfg = json.loads((REPO / "config" / name).read_text().replace('"demo_output/', f'"{out}/'))
    if edit:
        edit(cfg)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / name
    path.write_text(json.dumps(cfg, indent=1))
    return path


def only_tasks(tasks: tuple):
    """A config edit: pre-train on ``tasks`` only, each with its ratio from the demo config
    (mffr takes mfm-nce's)."""
    def edit(cfg):
        for target in cfg["targets"]:
            for split in target["splits"]:
                ratio = dict(zip(split["tasks"], split["ratio"]))
                ratio["mffr"] = ratio.get("mfm-nce", 1)
                split["tasks"], split["ratio"] = list(tasks), [ratio[t] for t in tasks]
    return edit


def train_job(name: str, script: str, config: Path, run: Path, seed: int, deps: list,
              weight: float, ckpt: str | None = None) -> Job:
    """An entry script run into ``run`` with the seed's training seed (and ``--checkpoint``
    when ``ckpt`` is given; "" = from scratch)."""
    argv = [sys.executable, script, "--config", str(config), "--output_dir", str(run)]
    argv += [] if ckpt is None else ["--checkpoint", ckpt]
    return Job(name, argv + ["--seed", str(TRAIN_SEED + seed)], run, deps, weight)


def last_checkpoint(pretrain_dir: Path) -> str:
    return str(pretrain_dir / "ckpt" / f"model_step_{pretrain_steps()}.pt")


def seed_jobs(out: Path, seed: int) -> list:
    """Corpus, DBs, pre-training and the 12 fine-tuning runs of one seed (a demo's layout)."""
    sdir = out / f"seed{seed}"
    cfgs = sdir / "configs"
    data = Job(f"s{seed}-data", [sys.executable, "-c", BUILD_DATA, str(sdir), str(seed)],
               sdir / "dbs", weight=0.2)
    pre = train_job(f"s{seed}-pretrain", "pretrain.py",
                    demo_config("pretrain-demo.json", sdir, cfgs), sdir / "pretrain", seed,
                    [data.name], 5)
    jobs = [data, pre]
    for task, (script, config) in FINETUNES.items():
        for init in ("pretrained", "scratch"):
            ckpt = last_checkpoint(pre.out_dir) if init == "pretrained" else ""
            jobs.append(train_job(f"s{seed}-{task}-{init}", script,
                                  demo_config(config, sdir, cfgs),
                                  sdir / "finetune" / f"{task}_{init}", seed,
                                  [pre.name if ckpt else data.name], 1.5, ckpt))
    return jobs


def ablation_jobs(out: Path, seed: int) -> list:
    """Each :data:`ABLATIONS` variant pre-trained on seed ``seed``'s data, then TVR and TVQA."""
    sdir = out / f"seed{seed}"
    jobs = []
    for variant, tasks in ABLATIONS.items():
        vdir = sdir / "ablation" / variant
        cfg = demo_config("pretrain-demo.json", sdir, vdir / "configs", only_tasks(tasks))
        pre = train_job(f"s{seed}-ablation-{variant}-pretrain", "pretrain.py", cfg,
                        vdir / "pretrain", seed, [f"s{seed}-data"], 5)
        jobs.append(pre)
        for task in ABLATION_TASKS:
            script, config = FINETUNES[task]
            jobs.append(train_job(f"s{seed}-ablation-{variant}-{task}", script,
                                  demo_config(config, sdir, sdir / "configs"),
                                  vdir / "finetune" / f"{task}_pretrained", seed, [pre.name],
                                  1.5, last_checkpoint(pre.out_dir)))
    return jobs


# corpus + DBs of one seed, into a temporary folder renamed at the end
BUILD_DATA = """
import shutil, subprocess, sys
from pathlib import Path
from scripts.toy.build import make_corpus
sdir, seed = Path(sys.argv[1]), int(sys.argv[2])
shutil.rmtree(sdir / "raw", ignore_errors=True)
make_corpus(sdir / "raw", seed=seed, size="demo")
subprocess.run(["bash", "scripts/build_toy_dbs.sh", str(sdir / "raw"), str(sdir / "dbs")],
               check=True)
"""


def chain_weights(jobs: list) -> dict:
    """Job name -> its weight plus the heaviest chain of jobs that depend on it."""
    children = {j.name: [c for c in jobs if j.name in c.deps] for j in jobs}
    chain: dict = {}

    def weigh(job: Job) -> float:
        if job.name not in chain:
            chain[job.name] = job.weight + max((weigh(c) for c in children[job.name]),
                                               default=0.0)
        return chain[job.name]

    for job in jobs:
        weigh(job)
    return chain


class Scheduler:
    """Runs jobs ``slots`` at a time in dependency order; of the ready jobs, the one with the
    heaviest chain of jobs still to follow it first (so a seed's data and pre-training do not
    wait behind other seeds' short fine-tuning jobs)."""

    def __init__(self, out: Path, jobs: list, slots: int):
        self.out, self.slots = out, slots
        self.pending = {j.name: j for j in jobs}
        self.running: dict = {}
        self.done = {j.name for j in jobs if self.marker(j).exists()}
        self.chain = chain_weights(jobs)
        self.env = {**os.environ, "PYTHON": sys.executable,
                    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // slots)),
                    "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def marker(self, job: Job) -> Path:
        return self.out / ".jobs" / f"{job.name}.done"

    def start(self, job: Job) -> None:
        shutil.rmtree(job.out_dir, ignore_errors=True)
        log_path = self.out / "logs" / f"{job.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "w")
        proc = subprocess.Popen(job.argv, cwd=REPO, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.running[job.name] = (job, proc, log, time.time())
        print(f"  start  {job.name}", flush=True)

    def ready(self) -> list:
        jobs = [j for n, j in self.pending.items()
                if n not in self.done and n not in self.running
                and all(d in self.done for d in j.deps)]
        return sorted(jobs, key=lambda j: -self.chain[j.name])

    def reap(self) -> list:
        """Finished jobs' names; a failed one raises after the others have finished."""
        failed = []
        for name, (job, proc, log, t0) in list(self.running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del self.running[name]
            if proc.returncode != 0:
                failed.append(job)
                continue
            self.marker(job).parent.mkdir(parents=True, exist_ok=True)
            self.marker(job).write_text(f"{time.time() - t0:.0f}\n")
            self.done.add(name)
            print(f"  done   {name} ({time.time() - t0:.0f} s)", flush=True)
        return failed

    def run(self) -> int:
        """Run what is not finished yet; returns the number of jobs reused."""
        reused = [n for n in self.pending if n in self.done]
        if reused:
            print(f"  reusing {len(reused)} finished job(s) (markers in {self.out}/.jobs)")
        failed = []
        while len(self.done) < len(self.pending):
            if not failed:
                for job in self.ready()[:self.slots - len(self.running)]:
                    self.start(job)
            if not self.running:
                break
            time.sleep(1)
            failed += self.reap()
        if failed:
            raise SystemExit(self.failure(failed[0]))
        return len(reused)

    def failure(self, job: Job) -> str:
        log = self.out / "logs" / f"{job.name}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        return (f"study: job {job.name} failed; the end of {log}:\n{tail}\n"
                "Fix it and re-run: finished jobs are reused.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="study_output", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each "
                        "on 2 cores)")
    parser.add_argument("--no_ablation", action="store_true")
    opts = parser.parse_args(argv)
    out = Path(opts.out).resolve()
    jobs = [j for s in opts.seeds for j in seed_jobs(out, s)]
    if not opts.no_ablation:
        jobs += ablation_jobs(out, opts.seeds[0])
    t0 = time.time()
    print(f"study -> {out}: {len(jobs)} jobs, {opts.jobs} at a time")
    reused = Scheduler(out, jobs, opts.jobs).run()
    wall = f"{time.time() - t0:.0f} s"
    print(f"study jobs finished in {wall}")
    if reused:  # the wall time of this run says nothing about the study's cost
        wall += f" (this run, reusing {reused} of {len(jobs)} finished jobs)"
    from scripts import study_report
    study_report.main(["--study_dir", str(out), "--wall_s", wall])


if __name__ == "__main__":
    main()

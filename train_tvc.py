"""Fine-tune HERO on TVC video captioning (training.md §1.3, §4.6, §5.9; model.md §9.5).

    torchrun --nproc_per_node 8 train_tvc.py --config config/train-tvc-8gpu.json
    python train_tvc.py --config config/train-tvc-demo.json               # toy corpus, CPU
    python train_tvc.py --config config/train-tvc-demo.json --checkpoint ''  # from scratch

Items are **videos** with all their captions (``max_cap_per_vid`` −1) or a random sample; the
loss is the label-smoothed (``lsr``) per-token loss averaged over the non-ignored target tokens
of the micro-batch. Validation every ``valid_steps``: greedy decoding (``max_gen_step`` steps)
of every clip of ``val_db`` on all ranks, scored on rank 0 by ``TVCEval`` against ``val_ref``;
TB keys are the bare metric names (``Bleu_1``..``CIDEr``) and the captions go to
``results/results_{step}.jsonl`` (TVC submission lines). TB also gets upstream's ``loss``
(running) and, every 100 updates, ``perf/vid_per_s`` and ``perf/cap_per_s``.

Parser: upstream's own argparse for TVC (same flag names as the shared one, TVC defaults:
adamw, weight decay 0.01, grad_norm 2, sub_ctx_len 1, ...), built here on the shared
machinery, plus ``--sub_txt_db``, ``--vfeat_db``, ``--train_db``, ``--val_db``, ``--val_ref``,
``--test_db`` (unused, as upstream), ``--max_gen_step``, ``--max_cap_per_vid`` and ``--lsr``.
``opts.task = 'tvc'`` and ``opts.rank`` are added to hps.json, as upstream.

Deviations, on purpose:
- ``--toker``: the RoBERTa tokenizer used to detokenise the decoded captions, a Hugging Face
  model name read from the local cache (``roberta-base``, what upstream-built caption DBs
  record) or a local folder (utils/tokenizer.py). Default: the ``toker`` recorded in
  ``train_db/meta.json``. It is resolved at start-up, so a missing tokenizer stops the run before
  training rather than at the first validation, and stored in hps.json as given, where
  ``inf_tvc.py`` finds it.
- Resume: upstream TVC had no restorer; the engine's exact resume works here too
  (``--save_steps``, default 500, writes the training state; ``--resume`` continues it). The
  output-dir policy is the engine's: a folder that already holds a run is refused unless
  ``--resume`` or ``--overwrite`` (upstream refused any non-empty folder).
- ``--checkpoint ''`` (or no checkpoint) trains from scratch.
- The last update's ``model_step_N.pt`` is saved only if N is not a validation step (no
  ``_final`` suffix), as upstream.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from functools import cached_property
from pathlib import Path

from config.config import ConfigError, SharedConfigs, parse_with_config
from data.data import load_video_sub_dataset
from data.loader import PrefetchLoader, build_dataloader
from data.resumable import build_resumable_loader
from data.tvc import TvcTrainDataset, TvcValDataset
from data.txt_db import CaptionTokLmdb
from eval.captioning import validate_tvc
from eval.tvc import TVCEval, read_references
from model.model import VFEAT_DIM, max_frm_seq_len_from_state_dict
from model.tvc import HeroForTvc
from train_videoQA import init_state_dict
from utils.distributed import all_gather_object, get_rank
from utils.engine import PERF_EVERY, TrainTask, add_run_args
from utils.entry import run_training
from utils.errors import run_main
from utils.logger import TB_LOGGER
from utils.save import atomic_write_text
from utils.tokenizer import load_toker, resolve_toker

LOGGER = logging.getLogger(__name__)
TASK = "tvc"
TVC_DEFAULTS = dict(optim="adamw", weight_decay=0.01, grad_norm=2.0, lr_mul=1.0, sub_ctx_len=1,
                    seed=42, gradient_accumulation_steps=16, train_batch_size=16,
                    val_batch_size=20, valid_steps=1000, warmup_steps=4000)


def caption_db_toker(db_dir) -> str | None:
    """The tokenizer (name or folder) a caption DB's ``meta.json`` records (``toker``, else
    ``tokenizer``)."""
    meta = Path(str(db_dir)) / "meta.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return info.get("toker") or info.get("tokenizer")


def write_captions(output_dir, step: int, results: list) -> Path:
    """Rank 0: ``results/results_{step}.jsonl``, one TVC submission line per clip."""
    path = Path(output_dir) / "results" / f"results_{step}.jsonl"
    if get_rank() == 0:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in results))
    return path


def most_frequent_caption(caption_db_dir) -> str:
    """The caption text occurring most often in a caption DB's clips (ties: the first in clip
    order); the constant output of the chance-level baseline the demo compares against."""
    db = CaptionTokLmdb(str(caption_db_dir))
    counts = Counter(cap["text"] for clips in db.vid2clips.values() for clip in clips
                     for cap in db.get_clip(clip)["captions"])
    if not counts:
        raise ValueError(f"caption DB {caption_db_dir} holds no caption")
    return counts.most_common(1)[0][0]


def constant_caption_scores(caption: str, ref_path, use_java: bool | None = None) -> dict:
    """Scores of predicting ``caption`` for every clip of ``ref_path`` (TVCEval)."""
    results = [{"clip_id": clip, "descs": [{"desc": caption}]}
               for clip in read_references(ref_path)]
    return TVCEval(ref_path, use_java)(results)


class TvcTask(TrainTask):
    """TVC wiring: video-level items, label-smoothed decoder loss, greedy-decoding validation."""

    honour_lr_mul = True
    restore_before_validation = False
    final_ckpt_suffix = None
    path_flags = ("model_config", "checkpoint", "sub_txt_db", "vfeat_db", "train_db", "val_db",
                  "val_ref")  # --toker may be a model name: resolve_toker checks it
    required_keys = ("model_config", "sub_txt_db", "vfeat_db", "train_db", "val_db", "val_ref")

    def __init__(self, opts):
        super().__init__(opts)
        self.val_loader = self.evaluator = self.toker = None
        self.counts = {"vid": 0, "cap": 0}
        self.t_start = None

    # ------------------------------------------------------------------ inputs
    @cached_property
    def video_db(self):
        """Video features + subtitles, shared by training and validation."""
        opts = self.opts
        return load_video_sub_dataset(opts.vfeat_db, opts.sub_txt_db, opts.vfeat_interval, opts)

    def build_train_loaders(self) -> dict:
        opts = self.opts
        dataset = TvcTrainDataset(self.video_db, CaptionTokLmdb(opts.train_db, opts.max_txt_len),
                                  opts.max_cap_per_vid)
        loader = build_resumable_loader(dataset, TvcTrainDataset.collate, opts, TASK,
                                        device=self.device)
        return {TASK: (loader, 1)}

    def _build_validation(self) -> None:
        """Val loader, tokenizer and (rank 0) the evaluator, once, at the first validation."""
        opts = self.opts
        dataset = TvcValDataset(self.video_db, CaptionTokLmdb(opts.val_db, -1))
        self.val_loader = PrefetchLoader(build_dataloader(dataset, TvcValDataset.collate, False,
                                                          opts), self.device)
        self.toker = load_toker(opts.toker)
        self.evaluator = TVCEval(opts.val_ref) if get_rank() == 0 else None

    # ------------------------------------------------------------------ model and loss
    def build_model(self):
        state = init_state_dict(self.opts.checkpoint)
        return HeroForTvc.from_pretrained(self.opts.model_config, state, VFEAT_DIM,
                                          max_frm_seq_len_from_state_dict(state),
                                          lsr=self.opts.lsr)

    def compute_loss(self, model, task: str, batch):
        if self.t_start is None:  # throughput of this session (counts are not resumed)
            self.t_start = time.time()
        self.counts["vid"] += len(batch["clip_ranges"])
        self.counts["cap"] += int(batch["cap_input_ids"].size(0))
        return model(batch, TASK, compute_loss=True).mean(), {}

    def log_update(self, global_step: int, meters: dict) -> None:
        """Upstream's TVC scalars: ``loss`` every update, video/caption throughput every 100."""
        TB_LOGGER.add_scalar("loss", meters[f"loss/{TASK}"].val)
        if global_step % PERF_EVERY == 0:
            elapsed = max(time.time() - self.t_start, 1e-9)
            gathered = all_gather_object(dict(self.counts))
            for key in ("vid", "cap"):
                TB_LOGGER.add_scalar(f"perf/{key}_per_s", sum(c[key] for c in gathered) / elapsed)

    # ------------------------------------------------------------------ validation
    def validate(self, model, global_step: int, final: bool = False) -> dict:
        if self.val_loader is None:
            self._build_validation()
        opts = self.opts
        val_log, results = validate_tvc(model, self.val_loader, self.evaluator, self.toker,
                                        opts.max_gen_step, opts.fp16,
                                        getattr(opts, "bf16", False))
        path = write_captions(opts.output_dir, global_step, results)
        LOGGER.info("%d val captions written to %s", len(results), path)
        return val_log


def build_parser():
    """Upstream train_tvc's flags and defaults on the shared parser (see module doc)."""
    cfg = SharedConfigs("HERO TVC captioning fine-tuning")
    p = cfg.parser
    p.set_defaults(**TVC_DEFAULTS)
    for key in ("sub_txt_db", "vfeat_db", "train_db", "val_db", "test_db"):
        p.add_argument(f"--{key}", type=str, default=None)
    p.add_argument("--val_ref", type=str, default=None, help="raw val jsonl with references")
    p.add_argument("--max_gen_step", type=int, default=30, help="greedy decoding steps")
    p.add_argument("--max_cap_per_vid", type=int, default=-1,
                   help="captions sampled per training video (-1 = all)")
    p.add_argument("--lsr", type=float, default=0.1, help="label smoothing")
    p.add_argument("--toker", type=str, default=None,
                   help="RoBERTa tokenizer: a Hugging Face model name (roberta-base) or a local "
                        "folder with vocab.json and merges.txt (default: train_db/meta.json's "
                        "toker)")
    add_run_args(p)
    return p


def parse_args(argv=None):
    opts = parse_with_config(build_parser(), argv)
    opts.checkpoint = opts.checkpoint or None
    opts.task = TASK
    opts.rank = int(os.environ.get("RANK", 0))
    origin = "--toker"
    if not opts.toker and opts.train_db and os.path.isdir(opts.train_db):
        opts.toker = caption_db_toker(opts.train_db)
        origin = f"toker (recorded in {opts.train_db}/meta.json; --toker overrides it)"
        if not opts.toker:
            raise ConfigError(f"{opts.train_db}/meta.json names no tokenizer ('toker'); pass "
                              "--toker roberta-base or --toker DIR (a local RoBERTa tokenizer "
                              "folder)")
    if opts.toker:
        resolve_toker(opts.toker, origin)
    return opts


def main(argv=None):
    return run_training(TvcTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

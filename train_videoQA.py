"""Fine-tune HERO on video QA: TVQA, or How2QA (training.md §4.4, §5.7; model.md §9.3).

    torchrun --nproc_per_node 8 train_videoQA.py --config config/train-tvqa-8gpu.json
    python train_videoQA.py --config config/train-tvqa-demo.json          # toy corpus, CPU
    python train_videoQA.py --config config/train-tvqa-demo.json --checkpoint ''  # from scratch

One item per question; each of its 5 answers becomes its own (video, subtitle + QA) sequence.
Loss = ``qa_loss + lw_st_ed × temporal_loss`` (5-way answer CE + mean of the start/end CEs over
frames, −1 targets ignored); the meters ``loss/{task}_qa`` and ``loss/{task}_st_ed`` are raw.
How2QA (``--task how2qa``) uses the same datasets and model: the spec gives no How2QA-specific
behaviour, only the task name (the released code has no How2QA config).
Engine flags (upstream's videoQA): ``lr_mul`` on the QA heads, training state saved before
validation, ``model_step_N_final.pt`` always saved at the end.
Validation every ``valid_steps`` on val (and test when ``test_query_txt_db`` is set): TB keys
``{split}_{task}/{task}_{split}_valid/{loss,acc,ex_per_s}``.

Decisions:
- A micro-batch whose span targets are all −1 (no parsable ``ts``) makes upstream's temporal CE
  NaN (mean over zero targets). Here its temporal loss counts as 0 (the QA loss still trains);
  such micro-batches are counted, logged on the first occurrence and at every validation.
- Predictions ``{qid: answer_index}`` gathered from every rank are written once, by rank 0, to
  ``results/{split}_results_{step}[_final]_all.json`` (upstream: one shard file per rank,
  ``..._rank{r}.json``; the union is the same).
- ``--checkpoint ''`` (or no checkpoint) trains from scratch (random init).
"""
from __future__ import annotations

import logging
import sys
from functools import cached_property
from pathlib import Path

import torch

from config.config import SharedConfigs
from data.data import load_video_sub_dataset
from data.loader import PrefetchLoader, build_dataloader
from data.resumable import build_resumable_loader
from data.txt_db import QaQueryTokLmdb
from data.vcmr import get_video_ids
from data.videoQA import (
    VideoQaDataset,
    VideoQaEvalDataset,
    video_qa_collate,
    video_qa_eval_collate,
)
from eval.common import write_json_atomic
from eval.qa import validate_videoQA
from model.model import VFEAT_DIM, max_frm_seq_len_from_state_dict, read_state_dict
from model.videoQA import HeroForVideoQA
from utils.distributed import get_rank
from utils.engine import TrainTask, describe_batch
from utils.entry import parse_task_args, run_training
from utils.errors import run_main

LOGGER = logging.getLogger(__name__)


def init_state_dict(checkpoint) -> dict:
    """The starting weights: ``--checkpoint`` as a state dict, or ``{}`` (from scratch)."""
    return read_state_dict(checkpoint) if checkpoint else {}


def write_predictions(output_dir, split: str, step: int, results: dict, final: bool) -> Path:
    """Rank 0 writes the gathered ``{qid: prediction}`` of one validation (see module doc)."""
    tag = f"{step}_final" if final else str(step)
    path = Path(output_dir) / "results" / f"{split}_results_{tag}_all.json"
    if get_rank() == 0:
        write_json_atomic(path, results)
    return path


class VideoQaTask(TrainTask):
    """TVQA / How2QA wiring; :class:`train_violin.ViolinTask` reuses it with other parts."""

    honour_lr_mul = True
    restore_before_validation = True
    final_ckpt_suffix = "_final"
    train_dataset_cls, train_collate = VideoQaDataset, staticmethod(video_qa_collate)
    eval_dataset_cls, eval_collate = VideoQaEvalDataset, staticmethod(video_qa_eval_collate)

    path_flags = ("model_config", "checkpoint", "sub_txt_db", "vfeat_db", "train_query_txt_db",
                  "val_query_txt_db", "test_query_txt_db")
    required_keys = ("model_config", "sub_txt_db", "vfeat_db", "train_query_txt_db",
                     "val_query_txt_db")

    def __init__(self, opts):
        super().__init__(opts)
        self.val_loaders = None
        self.no_span_batches = 0

    # ------------------------------------------------------------------ inputs
    @cached_property
    def video_db(self):
        """Video features + subtitles, shared by the training and validation sets."""
        opts = self.opts
        return load_video_sub_dataset(opts.vfeat_db, opts.sub_txt_db, opts.vfeat_interval, opts)

    def dataset(self, query_txt_db, max_txt_len: int, dataset_cls, **kwargs):
        query_db = QaQueryTokLmdb(query_txt_db, max_txt_len)
        return dataset_cls(get_video_ids(query_txt_db), self.video_db, query_db, **kwargs)

    def build_train_loaders(self) -> dict:
        opts = self.opts
        dataset = self.dataset(opts.train_query_txt_db, opts.max_txt_len, self.train_dataset_cls)
        loader = build_resumable_loader(dataset, self.train_collate, opts, opts.task,
                                        device=self.device)
        return {opts.task: (loader, 1)}

    def val_splits(self) -> dict:
        """split -> query DB; val always, test when given (no length filter at validation)."""
        dbs = {"val": self.opts.val_query_txt_db,
               "test": getattr(self.opts, "test_query_txt_db", None)}
        return {split: path for split, path in dbs.items() if path}

    def build_val_loaders(self) -> dict:
        return {split: PrefetchLoader(build_dataloader(
                    self.dataset(path, -1, self.eval_dataset_cls), self.eval_collate, False,
                    self.opts), self.device)
                for split, path in self.val_splits().items()}

    # ------------------------------------------------------------------ model and loss
    def build_model(self):
        state = init_state_dict(self.opts.checkpoint)
        return HeroForVideoQA.from_pretrained(self.opts.model_config, state, VFEAT_DIM,
                                              max_frm_seq_len_from_state_dict(state))

    def compute_loss(self, model, task: str, batch):
        qa_loss, temporal_loss = model(batch, task, compute_loss=True)
        if (batch["ts_targets"] < 0).all(dim=0).any():
            temporal_loss = self._no_span_target(qa_loss, batch)
        loss = qa_loss + self.opts.lw_st_ed * temporal_loss
        return loss, {"qa": float(qa_loss.detach()), "st_ed": float(temporal_loss.detach())}

    def _no_span_target(self, qa_loss, batch) -> torch.Tensor:
        """Temporal loss 0 for a micro-batch without any span target (see module doc)."""
        self.no_span_batches += 1
        if self.no_span_batches == 1:
            LOGGER.warning("micro-batch without any span target (all ts_targets -1; %s): its "
                           "temporal loss counts as 0 instead of NaN; further ones are counted "
                           "and reported at each validation", describe_batch(batch))
        return qa_loss.new_zeros(())

    # ------------------------------------------------------------------ validation
    def validate_split(self, model, split: str, loader):
        return validate_videoQA(model, loader, self.opts.task, fp16=self.opts.fp16,
                                bf16=getattr(self.opts, "bf16", False))

    def tb_key(self, split: str, key: str) -> str:
        task = self.opts.task
        return f"{split}_{task}/{task}_{split}_{key}"

    def validate(self, model, global_step: int, final: bool = False) -> dict:
        if self.val_loaders is None:
            self.val_loaders = self.build_val_loaders()
        if self.no_span_batches:
            LOGGER.info("%d training micro-batches so far had no span target (temporal loss "
                        "counted as 0)", self.no_span_batches)
        metrics = {}
        for split, loader in self.val_loaders.items():
            val_log, results, _ = self.validate_split(model, split, loader)
            path = write_predictions(self.opts.output_dir, split, global_step, results, final)
            LOGGER.info("%s predictions (%d) written to %s", split, len(results), path)
            metrics.update({self.tb_key(split, k): v for k, v in val_log.items()})
        return metrics


def parse_args(argv=None):
    return parse_task_args("HERO video QA fine-tuning (TVQA / How2QA)",
                           SharedConfigs.get_videoQA_args, argv, empty_checkpoint_is_none=True)


def main(argv=None):
    return run_training(VideoQaTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

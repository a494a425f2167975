"""VCMR fine-tuning (training.md §4.2): TVR, How2R, DiDeMo video+subtitle and video-only.

    torchrun --nproc_per_node 8 train_vcmr.py --config config/train-tvr-8gpu.json
    python train_vcmr.py --config config/train-tvr-demo.json                 # toy corpus, CPU
    python train_vcmr.py --config config/train-tvr-demo.json --checkpoint '' # from scratch

Upstream specifics kept: ``HeroForVcmr`` is built with span weight 0 and hard negatives off;
:meth:`VcmrTask.schedule` switches the span loss on from ``train_span_start_step`` and each
hard-negative stage from ``hard_negtiave_start_step`` (§3.8). ``lr_mul`` is ignored, the
training state is saved after validation and the last checkpoint is ``model_step_N_final.pt``.
Validation every ``valid_steps``: loss validation on the val queries
(``valid_{task}/{task}_valid/loss_overall`` ...), then full-corpus evaluation
(:func:`eval.retrieval.validate_full_vcmr`) of val and, when ``test_query_txt_db`` is set,
test (DiDeMo evaluates test at every validation). Each evaluating rank writes
``results/{val,test}_results_{step}_rank{r}.json``; the final evaluation (only when the last
update was not a validation step) skips the loss validation and adds ``_final``.

Decisions: the test split's name (TensorBoard keys, ``video2idx`` entry) is ``test_public``
when the DB path contains it, else ``test``. ``--checkpoint ''`` (or null) trains from
random initialisation. How2R has no released config; it is wired like TVR.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import time
from functools import cached_property

from torch.utils.data import DataLoader

from config.config import SharedConfigs
from data.data import load_video_only_dataset, load_video_sub_dataset
from data.loader import PrefetchLoader, build_dataloader
from data.resumable import build_resumable_loader
from data.txt_db import QueryTokLmdb
from data.vcmr import (
    VcmrDataset,
    VcmrEvalDataset,
    VcmrFullEvalDataset,
    VcmrVideoOnlyDataset,
    VcmrVideoOnlyEvalDataset,
    VcmrVideoOnlyFullEvalDataset,
    get_video_ids,
    vcmr_collate,
    vcmr_eval_collate,
    vcmr_full_eval_collate,
)
from eval.common import write_json_atomic
from eval.retrieval import numeric_metrics, validate_full_vcmr
from model.model import VFEAT_DIM, max_frm_seq_len_from_state_dict, read_state_dict
from model.vcmr import HeroForVcmr
from utils.dist_setup import unwrap_model
from utils.distributed import get_rank
from utils.engine import TrainTask
from utils.entry import parse_task_args, run_training
from utils.errors import run_main

LOGGER = logging.getLogger(__name__)
QUERY_DB_KEYS = ("train_query_txt_db", "val_query_txt_db", "test_query_txt_db")
DATASET_KINDS = ("train", "loss_val", "full_eval")


def test_split_name(query_txt_db: str) -> str:
    """``test_public`` for a DB folder named like TVR's unlabelled split, else ``test``."""
    return "test_public" if "test_public" in os.path.basename(os.path.normpath(
        query_txt_db)) else "test"


class VcmrTask(TrainTask):
    """Everything VCMR-specific; :mod:`train_vr` subclasses it for MSR-VTT."""

    honour_lr_mul = False
    restore_before_validation = False
    final_ckpt_suffix = "_final"

    model_cls = HeroForVcmr
    query_db_cls = QueryTokLmdb
    terms = ("st_ed", "neg_ctx", "neg_q")
    # dataset classes by video_only, in DATASET_KINDS order
    dataset_classes = {False: (VcmrDataset, VcmrEvalDataset, VcmrFullEvalDataset),
                       True: (VcmrVideoOnlyDataset, VcmrVideoOnlyEvalDataset,
                              VcmrVideoOnlyFullEvalDataset)}
    full_eval_batch_key = "vcmr_eval_q_batch_size"

    def __init__(self, opts):
        super().__init__(opts)
        self.video_only = opts.task.endswith("video_only")
        self._val_loaders = None
        self._full_eval_loaders = None
        self._n_constant = 0

    # ------------------------------------------------------------------ inputs
    @property
    def required_keys(self) -> tuple:
        """Options the run cannot start without; video-only corpora have no subtitle DB."""
        keys = ("model_config", "vfeat_db", "train_query_txt_db", "val_query_txt_db")
        return keys if self.video_only else (*keys, "sub_txt_db")

    def required_paths(self) -> dict:
        opts = self.opts
        paths = {"model_config": opts.model_config, "checkpoint": opts.checkpoint or None,
                 "vfeat_db": opts.vfeat_db}
        if not self.video_only:
            paths["sub_txt_db"] = opts.sub_txt_db
        for key in QUERY_DB_KEYS:
            paths[key] = getattr(opts, key, None)
        return paths

    @cached_property
    def video_db(self):
        """One video (+subtitle) reader shared by training and every evaluation split.

        Video-only corpora take ``CLS``/``SEP`` from the training query DB's ``meta.json``.
        """
        opts = self.opts
        if self.video_only:
            return load_video_only_dataset(opts.vfeat_db, opts.train_query_txt_db,
                                           opts.vfeat_interval, opts)
        return load_video_sub_dataset(opts.vfeat_db, opts.sub_txt_db, opts.vfeat_interval, opts)

    def make_dataset(self, kind: str, db_path: str, max_txt_len: int = -1, **kwargs):
        """A ``train``, ``loss_val`` or ``full_eval`` dataset over the query DB ``db_path``."""
        cls = self.dataset_classes[self.video_only][DATASET_KINDS.index(kind)]
        return cls(get_video_ids(db_path), self.video_db,
                   self.query_db_cls(db_path, max_txt_len), **kwargs)

    def build_train_loaders(self) -> dict:
        opts = self.opts
        dataset = self.make_dataset("train", opts.train_query_txt_db, opts.max_txt_len)
        loader = build_resumable_loader(dataset, vcmr_collate, opts, opts.task,
                                        device=self.device)
        return {opts.task: (loader, 1)}

    # ------------------------------------------------------------------ model
    def model_kwargs(self) -> dict:
        """Constructor arguments: config weights, span weight 0, hard negatives off."""
        opts = self.opts
        return dict(ranking_loss_type=opts.ranking_loss_type, margin=opts.margin,
                    lw_neg_ctx=opts.lw_neg_ctx, lw_neg_q=opts.lw_neg_q, lw_st_ed=0,
                    drop_svmr_prob=opts.drop_svmr_prob, use_hard_negative=False,
                    hard_pool_size=opts.hard_pool_size[0],
                    hard_neg_weight=opts.hard_neg_weights[0], use_all_neg=opts.use_all_neg)

    def build_model(self):
        opts = self.opts
        state = read_state_dict(opts.checkpoint) if opts.checkpoint else {}
        if not state:
            LOGGER.info("no --checkpoint: %s starts from random initialisation",
                        self.model_cls.__name__)
        return self.model_cls.from_pretrained(
            opts.model_config, state, VFEAT_DIM, max_frm_seq_len_from_state_dict(state),
            **self.model_kwargs())

    def schedule(self, model, global_step: int) -> None:
        """Hard negatives per stage and the span-loss weight (training.md §3.8 step 1)."""
        opts, model = self.opts, unwrap_model(model)
        for i, start in enumerate(opts.hard_negtiave_start_step):
            if start != -1 and global_step >= start:
                model.set_hard_negative(True, opts.hard_pool_size[i], opts.hard_neg_weights[i])
        span_start = getattr(opts, "train_span_start_step", -1)
        if span_start != -1 and global_step >= span_start:
            model.set_train_st_ed(opts.lw_st_ed)

    def all_gathers(self, model, task: str) -> bool:
        """The ranking losses score every query against all ranks' videos (model.md §9.1)."""
        model = unwrap_model(model)
        return model.use_video_scores and model.gather_gpus

    def term_weights(self, model) -> tuple:
        return model.lw_st_ed, model.lw_neg_ctx, model.lw_neg_q

    def compute_loss(self, model, task: str, batch):
        out = model(batch, task=self.opts.task, compute_loss=True)
        loss = sum(out).mean()
        if not loss.requires_grad:
            loss = self._constant_loss(loss, batch)
        weights = self.term_weights(unwrap_model(model))
        components = {term: float(value.detach().mean()) / (w if w else 1.0)
                      for term, value, w in zip(self.terms, out, weights)}
        return loss, components

    def _constant_loss(self, loss, batch):
        """A micro-batch with nothing to learn from (one video, so no negatives, and the span
        loss skipped by ``drop_svmr_prob``) gives zero gradients instead of failing backward;
        such batches are counted; the count is logged at every validation."""
        self._n_constant += 1
        if self._n_constant == 1:
            LOGGER.warning("micro-batch of %d quer(ies) gives a constant loss (no in-batch "
                           "negative, span loss skipped): it contributes zero gradients",
                           batch["query_input_ids"].size(0))
        return loss.detach().requires_grad_()

    # ------------------------------------------------------------------ validation
    def validate(self, model, global_step: int, final: bool = False) -> dict:
        if self._n_constant:
            LOGGER.info("%d training micro-batch(es) so far had a constant loss (zero "
                        "gradients)", self._n_constant)
        metrics = {} if final else self.loss_validation(model)
        suffix = "_final" if final else ""
        for split, loader in self.full_eval_loaders().items():
            if not (self.opts.distributed_eval or get_rank() == 0):
                continue
            val_log, submission = self.full_eval(model, loader, split)
            path = os.path.join(self.opts.output_dir, "results",
                                f"{split}_results_{global_step}_rank{get_rank()}{suffix}.json")
            write_json_atomic(path, submission)
            numbers, texts = numeric_metrics(val_log)
            for key, text in texts.items():  # desc_type_ratio: log text, not a TB scalar
                LOGGER.info("  %s: %s", key, text)
            metrics.update(numbers)
        return metrics

    def full_eval(self, model, loader, split):
        """Full-corpus metrics; ``_rank_avg`` over the ranks of ``--virtual_world_size``, as an
        N-process run averages them (issue 16)."""
        return validate_full_vcmr(model, loader, split, self.opts,
                                  ranks=self.validation_world().size)

    def full_eval_loaders(self) -> dict:
        """split -> query loader over the split's whole corpus (val, then test if given)."""
        if self._full_eval_loaders is None:
            opts = self.opts
            dbs = {"val": opts.val_query_txt_db}
            if getattr(opts, "test_query_txt_db", None):
                dbs[test_split_name(opts.test_query_txt_db)] = opts.test_query_txt_db
            self._full_eval_loaders = {split: self._full_eval_loader(db)
                                       for split, db in dbs.items()}
        return self._full_eval_loaders

    def _full_eval_loader(self, db_path: str) -> DataLoader:
        opts = self.opts
        dataset = self.make_dataset("full_eval", db_path, distributed=opts.distributed_eval)
        return DataLoader(dataset, batch_size=getattr(opts, self.full_eval_batch_key),
                          shuffle=False, num_workers=opts.n_workers,
                          collate_fn=vcmr_full_eval_collate,
                          pin_memory=opts.pin_mem and self.device.type == "cuda")

    def loss_validation(self, model) -> dict:
        """Summed loss terms over the val queries of all ranks (with ``--virtual_world_size``,
        all N virtual ranks', :meth:`utils.virtual_world.VirtualWorld.validation_sums`),
        normalised by their counts."""
        world = self.validation_world()
        if self._val_loaders is None:
            self._val_loaders = world.build_each(self._loss_val_loader)
        start = time.time()
        totals = world.validation_sums(self._val_loaders,
                                       functools.partial(self._loss_val_sums, model),
                                       self.all_gathers(model, self.opts.task))
        name = self.opts.task
        return {f"valid_{name}/{name}_{k}": v for k, v in
                self.finish_loss_validation(totals, time.time() - start, model).items()}

    def _loss_val_loader(self):
        dataset = self.make_dataset("loss_val", self.opts.val_query_txt_db)
        return PrefetchLoader(build_dataloader(dataset, vcmr_eval_collate, False, self.opts),
                              self.device)

    def _loss_val_sums(self, model, batch) -> dict:
        """One batch's loss terms summed over its items, and their counts."""
        out = model(batch, task=self.opts.task, compute_loss=True)
        n_q = batch["query_input_ids"].size(0)
        sums = {"ex": n_q}
        for term, value in zip(self.terms, out):
            sums[term] = value.sum()
            sums[f"n_{term}"] = n_q if term == "st_ed" else value.numel()
        return sums

    def finish_loss_validation(self, totals, secs, model) -> dict:
        """Each term per item, shown unweighted; ``loss_overall`` is the weighted sum."""
        out, overall = {}, 0.0
        for term, w in zip(self.terms, self.term_weights(unwrap_model(model))):
            value = totals[term] / max(totals[f"n_{term}"], 1)
            overall += value
            out[f"valid/loss_{term}"] = value / w if w else value
        return {"valid/loss_overall": overall, **out,
                "valid/ex_per_s": totals["ex"] / max(secs, 1e-9)}


def parse_args(argv=None):
    return parse_task_args("HERO VCMR fine-tuning (TVR, How2R, DiDeMo)",
                           SharedConfigs.get_vcmr_args, argv)


def main(argv=None):
    return run_training(VcmrTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

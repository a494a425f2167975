"""HERO pre-training (training.md §4.1): mlm, mfm-nce, mffr, fom and vsm mixed by ratio.

    torchrun --nproc_per_node 16 pretrain.py --config config/pretrain-tv-16gpu.json
    python pretrain.py --config config/pretrain-demo.json            # toy corpus, CPU

Task names are ``{task}_{target}_{split}`` (``mlm_tv_all``); the model task is the part before
the first ``_``; a task's pool multiplicity is ``targets_ratio[target] × split.ratio[task]``.
The model is built with span weight 0 and hard negatives off; the schedule switches them on
(``train_span_start_step``, ``hard_negtiave_start_step``). Initialisation: ``--checkpoint`` is
loaded as a HERO state dict, or, with ``--load_partial_pretrained``, as RoBERTa into the
cross-modal transformer only (``--skip_layer_loading`` takes every other layer).
Engine flags (upstream's pretrain): ``lr_mul`` ignored, training state saved after validation,
final ``model_step_N`` saved only if N was not a validation step.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from config.config import ConfigError, SharedConfigs
from data.data import load_video_sub_dataset
from data.fom import FomDataset, FomEvalDataset, fom_collate, fom_eval_collate
from data.loader import PrefetchLoader, build_dataloader
from data.mfm import MfmDataset, mfm_collate
from data.mlm import VideoMlmDataset, mlm_collate
from data.resumable import build_resumable_loader
from data.vsm import VsmDataset, vsm_collate
from model.encoder import mfm_nce_logits
from model.model import VFEAT_DIM, max_frm_seq_len_from_state_dict, read_state_dict
from model.pretrain import HeroForPretraining
from utils.dist_setup import unwrap_model
from utils.engine import TrainTask
from utils.entry import parse_task_args, run_training
from utils.errors import run_main

LOGGER = logging.getLogger(__name__)
TASKS = ("mlm", "mfm-nce", "mffr", "fom", "vsm")
VSM_TERMS = ("st_ed", "neg_ctx", "neg_q")


def model_task(name: str) -> str:
    return name.split("_", 1)[0]


def build_dataset(task: str, video_ids, vid_sub_db, opts, is_train: bool):
    """(dataset, collate) of one pre-training task (data.md §10)."""
    if task == "mlm":
        return VideoMlmDataset(video_ids, vid_sub_db, opts.mask_prob), mlm_collate
    if task in ("mfm-nce", "mffr"):
        return MfmDataset(video_ids, vid_sub_db, opts.mask_prob), mfm_collate
    if task == "fom":
        if is_train:
            return FomDataset(video_ids, vid_sub_db, opts.mask_prob), fom_collate
        return FomEvalDataset(video_ids, vid_sub_db, opts.mask_prob), fom_eval_collate
    if task == "vsm":
        return VsmDataset(video_ids, vid_sub_db), vsm_collate
    raise ConfigError(f"unknown pre-training task {task!r} in 'targets'; expected one of "
                      f"{', '.join(TASKS)}")


def read_ids(opts, rel_path):
    path = os.path.join(opts.txt_db, rel_path)
    if not os.path.isfile(path):
        raise ConfigError(f"split file not found: {path} (from 'targets', relative to --txt_db)")
    with open(path) as f:
        return json.load(f)


class PretrainTask(TrainTask):
    """Everything pretrain-specific; the loop itself is :class:`utils.engine.Trainer`."""

    honour_lr_mul = False
    restore_before_validation = False
    final_ckpt_suffix = None
    required_keys = ("model_config", "txt_db", "img_db")  # + 'targets', checked at parse time

    def __init__(self, opts):
        super().__init__(opts)
        self._video_dbs = {}
        self.val_loaders = None

    # ------------------------------------------------------------------ inputs
    def required_paths(self) -> dict:
        opts = self.opts
        paths = {"model_config": opts.model_config, "checkpoint": opts.checkpoint,
                 "txt_db": opts.txt_db, "img_db": opts.img_db}
        for target in opts.targets:
            name = target.get("name", "?")
            paths[f"targets[{name}].sub_txt_db"] = os.path.join(opts.txt_db or "",
                                                                target["sub_txt_db"])
            paths[f"targets[{name}].vfeat_db"] = os.path.join(opts.img_db or "",
                                                              target["vfeat_db"])
        return paths

    def _video_sub_dbs(self, target) -> list:
        """One video+subtitle dataset per feature shard (a single one without vfeat_shards)."""
        if target["name"] not in self._video_dbs:
            root = os.path.join(self.opts.img_db, target["vfeat_db"])
            shards = [os.path.join(root, s) for s in target.get("vfeat_shards", [])] or [root]
            sub_db = os.path.join(self.opts.txt_db, target["sub_txt_db"])
            self._video_dbs[target["name"]] = [
                load_video_sub_dataset(p, sub_db, target["vfeat_interval"], self.opts)
                for p in shards]
        return self._video_dbs[target["name"]]

    def _split_ids(self, target, split, key) -> list:
        """Video ids per shard; validation uses shard 0 only (training.md §2.1)."""
        idx = split[key]
        files = idx if isinstance(idx, list) else [idx]
        if key == "val_idx":
            files = files[:1]
        return [read_ids(self.opts, f) for f in files]

    def _task_datasets(self, is_train: bool):
        """Yields (name, ratio, dataset, collate) for every task of every target split."""
        key = "train_idx" if is_train else "val_idx"
        for t_ratio, target in zip(self.opts.targets_ratio, self.opts.targets):
            dbs = self._video_sub_dbs(target)
            for split in target["splits"]:
                ratios = split.get("ratio") or [1] * len(split["tasks"])
                ids = self._split_ids(target, split, key)
                for task, ratio in zip(split["tasks"], ratios):
                    parts = [build_dataset(task, i, db, self.opts, is_train)
                             for i, db in zip(ids, dbs)]
                    dataset = parts[0][0] if len(parts) == 1 else ConcatDataset(
                        [p[0] for p in parts])
                    name = f"{task}_{target['name']}_{split['name']}"
                    yield name, t_ratio * ratio, dataset, parts[0][1]

    def build_train_loaders(self) -> dict:
        return {name: (build_resumable_loader(ds, collate, self.opts, name, device=self.device),
                       ratio)
                for name, ratio, ds, collate in self._task_datasets(is_train=True)}

    def build_val_loaders(self) -> dict:
        return {name: PrefetchLoader(build_dataloader(ds, collate, False, self.opts),
                                     self.device)
                for name, _, ds, collate in self._task_datasets(is_train=False)}

    # ------------------------------------------------------------------ model
    def build_model(self):
        opts = self.opts
        kwargs = dict(ranking_loss_type=opts.ranking_loss_type, margin=opts.margin,
                      lw_neg_ctx=opts.lw_neg_ctx, lw_neg_q=opts.lw_neg_q, lw_st_ed=0,
                      drop_svmr_prob=opts.drop_svmr_prob, use_hard_negative=False,
                      hard_pool_size=opts.hard_pool_size[0],
                      hard_neg_weight=opts.hard_neg_weights[0], use_all_neg=opts.use_all_neg)
        state = read_state_dict(opts.checkpoint) if opts.checkpoint else {}
        if opts.load_partial_pretrained:
            model = HeroForPretraining(opts.model_config, VFEAT_DIM, **kwargs)
            if state:
                model.load_roberta(state, skip_layers=opts.skip_layer_loading)
            return model
        return HeroForPretraining.from_pretrained(
            opts.model_config, state, VFEAT_DIM, max_frm_seq_len_from_state_dict(state),
            **kwargs)

    def schedule(self, model, global_step: int) -> None:
        """Hard negatives per stage and the span-loss weight (training.md §3.8 step 1)."""
        opts = self.opts
        for i, start in enumerate(opts.hard_negtiave_start_step):
            if start != -1 and global_step >= start:
                model.set_hard_negative(True, opts.hard_pool_size[i], opts.hard_neg_weights[i])
        if opts.train_span_start_step != -1 and global_step >= opts.train_span_start_step:
            model.set_train_st_ed(opts.lw_st_ed)

    def all_gathers(self, model, task: str) -> bool:
        """VSM's ranking losses score every query against all ranks' videos (model.md §8.4)."""
        model = unwrap_model(model)
        return model_task(task) == "vsm" and model.use_video_scores and model.gather_gpus

    def compute_loss(self, model, task: str, batch):
        kind = model_task(task)
        out = model(batch, task=kind, compute_loss=True)
        if kind != "vsm":
            if kind == "mffr":
                out = torch.sqrt(out.sum(dim=1))
            return out.mean(), {}
        loss = (out[0] + out[1] + out[2]).mean()
        return loss, vsm_components(unwrap_model(model), out)

    # ------------------------------------------------------------------ validation
    def validate(self, model, global_step: int, final: bool = False) -> dict:
        """Every task's validation sums over all ranks' shards (with ``--virtual_world_size``,
        all N virtual ranks', :meth:`utils.virtual_world.VirtualWorld.validation_sums`)."""
        world = self.validation_world()
        if self.val_loaders is None:
            self.val_loaders = world.build_each(self.build_val_loaders)
        metrics = {}
        for name in self.val_loaders[0]:
            start = time.time()
            step = functools.partial(VALIDATORS[model_task(name)], model)
            totals = world.validation_sums([rank[name] for rank in self.val_loaders], step,
                                           self.all_gathers(model, name))
            values = FINALIZERS[model_task(name)](totals, time.time() - start, model)
            metrics.update({f"valid_{name}/{name}_{k}": v for k, v in values.items()})
        return metrics


def vsm_components(model, out) -> dict:
    """Running-meter values, each divided by its (non-zero) weight as upstream logs them."""
    weights = (model.lw_st_ed, model.lw_neg_ctx, model.lw_neg_q)
    return {term: float(value.detach().mean()) / (w if w else 1.0)
            for term, value, w in zip(VSM_TERMS, out, weights)}


def _frame_stats(preds, targets) -> dict:
    preds, targets = preds.float(), targets.float()
    return {"l2": (preds - targets).norm(dim=1).sum(),
            "cosine": F.cosine_similarity(preds, targets, dim=1).sum(), "n": preds.size(0)}


def val_mlm(model, batch) -> dict:
    logits = model(batch, task="mlm", compute_loss=False).float()
    labels = batch["txt_labels"]
    return {"loss": F.cross_entropy(logits, labels, reduction="sum"),
            "correct": (logits.argmax(-1) == labels).sum(), "n": labels.numel()}


def val_mffr(model, batch) -> dict:
    preds = model(batch, task="mffr", compute_loss=False)
    return _frame_stats(preds, batch["feat_targets"])


def val_mfm_nce(model, batch) -> dict:
    """NCE loss/accuracy from upstream's ``(prediction_feat, neg_pred_feat)`` pair, with the
    logits of the training loss (model.md §7.2, training.md §4.1)."""
    preds, negatives = model(batch, task="mfm-nce", compute_loss=False)
    logits = mfm_nce_logits(preds, batch["feat_targets"], negatives)
    labels = torch.arange(logits.size(0), device=logits.device)
    stats = _frame_stats(preds, batch["feat_targets"])
    stats["loss"] = F.cross_entropy(logits.float() / model.v_encoder.nce_temp, labels,
                                    reduction="sum")
    stats["correct"] = (logits.argmax(-1) == labels).sum()
    return stats


def val_fom(model, batch) -> dict:
    logits = model(batch, task="fom", compute_loss=False).float()
    targets = batch["targets"].reshape(-1)
    keep = targets != -1
    return {"loss": F.cross_entropy(logits[keep], targets[keep], reduction="sum"),
            "correct": (logits[keep].argmax(-1) == targets[keep]).sum(), "n": keep.sum(),
            "ex": batch["c_attn_masks"].size(0)}


def val_vsm(model, batch) -> dict:
    st_ed, ctx, neg_q = model(batch, task="vsm", compute_loss=True)
    n_q = batch["query_input_ids"].size(0)
    return {"st_ed": st_ed.sum(), "n_st_ed": n_q, "neg_ctx": ctx.sum(), "n_neg_ctx": ctx.numel(),
            "neg_q": neg_q.sum(), "n_neg_q": neg_q.numel(), "ex": batch["c_attn_masks"].size(0)}


def fin_mlm(t, secs, model) -> dict:
    n = max(t["n"], 1)
    return {"loss": t["loss"] / n, "acc": t["correct"] / n, "tok_per_s": t["n"] / secs}


def fin_mffr(t, secs, model) -> dict:
    n = max(t["n"], 1)
    return {"loss": t["l2"] / n, "cosine": t["cosine"] / n, "feat_per_s": t["n"] / secs}


def fin_mfm_nce(t, secs, model) -> dict:
    n = max(t["n"], 1)
    return {"loss": t["loss"] / n, "acc": t["correct"] / n, "l2": t["l2"] / n,
            "cosine": t["cosine"] / n, "feat_per_s": t["n"] / secs}


def fin_fom(t, secs, model) -> dict:
    n = max(t["n"], 1)
    return {"valid/loss": t["loss"] / n, "valid/acc": t["correct"] / n,
            "valid/ex_per_s": t["ex"] / secs}


def fin_vsm(t, secs, model) -> dict:
    """Each term normalised by its count, then by its weight; overall is the weighted sum."""
    out, overall = {}, 0.0
    for term, w in zip(VSM_TERMS, (model.lw_st_ed, model.lw_neg_ctx, model.lw_neg_q)):
        value = t[term] / max(t[f"n_{term}"], 1)
        overall += value
        out[f"valid/loss_{term}"] = value / w if w else value
    return {"valid/loss_overall": overall, **out, "valid/ex_per_s": t["ex"] / secs}


VALIDATORS = {"mlm": val_mlm, "mffr": val_mffr, "mfm-nce": val_mfm_nce, "fom": val_fom,
              "vsm": val_vsm}
FINALIZERS = {"mlm": fin_mlm, "mffr": fin_mffr, "mfm-nce": fin_mfm_nce, "fom": fin_fom,
              "vsm": fin_vsm}


def parse_args(argv=None):
    return parse_task_args("HERO pre-training", SharedConfigs.get_pretrain_args, argv)


def main(argv=None):
    return run_training(PretrainTask, parse_args, argv)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])

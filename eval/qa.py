"""Validation of video QA (TVQA / How2QA) and VIOLIN (training.md §5.7, §5.8).

Both run the model over an eval loader (``qids`` in every batch), sum loss / correct / count on
each rank, all-gather the sums and the per-question outputs, and return
``(val_log, results, logits)``: ``results`` is upstream's submission dict ``{qid: answer}``
(answer index for QA, 0/1 for VIOLIN) and ``logits`` is ``{qid: [logits]}`` when
``save_logits`` else None. Every rank gets the gathered values.

Decisions:
- QA: upstream computes no loss/accuracy when a target is < 0 (a test split without labels);
  here loss and accuracy cover the labelled questions, unlabelled ones are counted and logged
  once, and with no labelled question at all ``val_log`` holds only ``valid/ex_per_s``.
- A target outside the logits' answer range is an error naming the question id.
- Mixed precision is ``torch.autocast`` (``fp16``/``bf16``); losses are computed in fp32.

The second half holds the shared command-line driver of ``eval_videoQA.py`` and
``eval_violin.py`` (flags of training.md §1.4, outputs of §5.7).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from config.config import add_bool, config_warnings, parse_with_config
from data.data import load_video_sub_dataset
from data.loader import PrefetchLoader, move_to_device
from data.txt_db import QaQueryTokLmdb
from data.vcmr import get_video_ids
from eval.common import (
    autocast,
    build_eval_model,
    check_split,
    checkpoint_tag,
    eval_mode,
    init_distributed,
    load_hps,
    model_device,
    require_hps,
    results_file,
    write_json_atomic,
)
from utils.distributed import all_gather_object, get_rank
from utils.logger import console_logging

LOGGER = logging.getLogger(__name__)


class QaEvalError(ValueError):
    """A batch cannot be scored (bad target, missing ids)."""


def check_targets(targets: torch.Tensor, qids, num_classes: int, what: str,
                  lowest: int = -1) -> None:
    """Labels must be a class index or, from ``lowest`` -1, unlabelled; name the first bad id."""
    bad = ((targets < lowest) | (targets >= num_classes)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise QaEvalError(f"{what} {qids[i]}: target {int(targets[i])} is outside the "
                          f"{num_classes} possible answers")


def gather_sums(sums: dict) -> dict:
    """Element-wise sum of every rank's ``sums`` dict."""
    gathered = all_gather_object(sums)
    return {k: sum(s[k] for s in gathered) for k in sums}


def gather_dicts(local: dict | None) -> dict | None:
    """Union of every rank's ``{qid: value}`` (ids are disjoint across rank shards)."""
    if local is None:
        return None
    merged = {}
    for part in all_gather_object(local):
        merged.update(part)
    return merged


def _batches(loader, desc: str):
    return tqdm(loader, desc=desc, disable=get_rank() != 0, leave=False)


def validate_videoQA(model, val_loader, task: str = "tvqa", save_logits: bool = False,
                     fp16: bool = False, bf16: bool = False):
    """Accuracy / loss of 5-way video QA; ``val_log`` keys ``valid/loss``, ``valid/acc``,
    ``valid/ex_per_s``. Loss = summed CE / #labelled questions."""
    return _validate(model, val_loader, task, _score_qa, save_logits, fp16, bf16,
                     desc=f"validate {task}", what=f"{task} questions", prefix="valid/")


def validate_violin(model, val_loader, split: str = "test", save_logits: bool = False,
                    fp16: bool = False, bf16: bool = False):
    """VIOLIN entailment: pred = sigmoid(logit) > 0.5; loss = summed BCE / n; keys
    ``valid/{split}_loss``, ``valid/{split}_acc``, ``valid/{split}_ex_per_s``."""
    return _validate(model, val_loader, "violin", _score_violin, save_logits, fp16, bf16,
                     desc=f"validate violin {split}", what="statements",
                     prefix=f"valid/{split}_")


@torch.no_grad()
def _validate(model, val_loader, task: str, score, save_logits, fp16, bf16, *, desc, what,
              prefix):
    """The loop both validators share; ``score(sums, logits, targets, qids)`` checks the
    targets, adds to ``sums`` and returns ``(predictions, logits to save)``."""
    device = model_device(model)
    sums = {"loss": 0.0, "correct": 0, "labelled": 0, "n_ex": 0}
    results, logits_out = {}, ({} if save_logits else None)
    start = time.time()
    for batch in _batches(val_loader, desc):
        batch = move_to_device(batch, device)
        qids = [str(q) for q in batch["qids"]]
        with eval_mode(model), autocast(device, fp16, bf16):
            logits = model(batch, task, compute_loss=False)
        preds, logits = score(sums, logits.float(), batch["targets"].view(-1), qids)
        _record(results, logits_out, qids, preds, logits)
    sums = gather_sums(sums)
    val_log = _val_log(sums, time.time() - start, prefix, what)
    return val_log, gather_dicts(results), gather_dicts(logits_out)


def _score_qa(sums: dict, logits, targets, qids):
    """Summed CE and correct count of the labelled rows; every row is counted and predicted."""
    check_targets(targets, qids, logits.size(1), "question")
    labelled = targets >= 0
    sums["n_ex"] += targets.numel()
    if labelled.any():
        sums["loss"] += F.cross_entropy(logits[labelled], targets[labelled],
                                        reduction="sum").item()
        sums["correct"] += (logits[labelled].argmax(-1) == targets[labelled]).sum().item()
        sums["labelled"] += int(labelled.sum())
    return logits.argmax(dim=-1).tolist(), logits


def _score_violin(sums: dict, logits, targets, qids):
    """Every statement is labelled (0/1); BCE on the sigmoid, prediction at 0.5."""
    check_targets(targets, qids, 2, "statement", lowest=0)
    probs = torch.sigmoid(logits.view(-1))
    preds = (probs > 0.5).long()
    sums["n_ex"] += targets.numel()
    sums["labelled"] += targets.numel()
    sums["loss"] += F.binary_cross_entropy(probs, targets.float(), reduction="sum").item()
    sums["correct"] += (preds == targets).sum().item()
    return preds.tolist(), logits.view(-1, 1)


def _record(results: dict, logits_out, qids, preds, logits) -> None:
    for qid, pred in zip(qids, preds):
        results[qid] = int(pred)
    if logits_out is not None:
        for qid, row in zip(qids, logits.cpu().tolist()):
            logits_out[qid] = row


def _val_log(sums: dict, elapsed: float, prefix: str, what: str) -> dict:
    """``{prefix}ex_per_s`` always; ``{prefix}loss`` and ``{prefix}acc`` over labelled items."""
    val_log = {f"{prefix}ex_per_s": sums["n_ex"] / max(elapsed, 1e-9)}
    unlabelled = sums["n_ex"] - sums["labelled"]
    if unlabelled:
        LOGGER.info("%d of %d %s have no label (target -1): predictions only, not scored",
                    unlabelled, sums["n_ex"], what)
    if sums["labelled"]:
        val_log[f"{prefix}loss"] = sums["loss"] / sums["labelled"]
        val_log[f"{prefix}acc"] = sums["correct"] / sums["labelled"]
    return val_log


# ---------------------------------------------------------------------------------------------
# command-line drivers of eval_videoQA.py / eval_violin.py (training.md §1.4)
# ---------------------------------------------------------------------------------------------
DATA_KEYS = ("vfeat_interval", "max_clip_len", "vfeat_version", "compressed_db", "sub_ctx_len")


def build_qa_parser(desc: str, defaults: dict, splits, tasks=None) -> argparse.ArgumentParser:
    """Upstream's eval flags; ``tasks`` None means no ``--task`` flag (VIOLIN)."""
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--sub_txt_db", default=defaults["sub_txt_db"])
    p.add_argument("--vfeat_db", default=defaults["vfeat_db"])
    p.add_argument("--query_txt_db", default=defaults["query_txt_db"])
    p.add_argument("--split", default=defaults["split"], choices=splits)
    if tasks:
        p.add_argument("--task", default=tasks[0], choices=tasks)
    p.add_argument("--checkpoint", default=None,
                   help="file path, or step of {output_dir}/ckpt/model_step_{N}.pt")
    p.add_argument("--batch_size", type=int, default=10, help="questions per batch")
    p.add_argument("--output_dir", default=None, help="training run folder")
    add_bool(p, "fp16", help="torch.autocast fp16")
    add_bool(p, "bf16", help="torch.autocast bf16")
    p.add_argument("--n_workers", type=int, default=4)
    add_bool(p, "pin_mem")
    add_bool(p, "save_logits", help="also write {qid: logits} as a pickle")
    p.add_argument("--config", default=None, help="JSON file with any of these flags")
    return p


def parse_qa_args(parser, argv=None):
    opts = parse_with_config(parser, argv)
    if opts.output_dir is None:
        raise SystemExit("--output_dir (the training run folder with log/hps.json) is required")
    return opts


def build_eval_loader(opts, hps, dataset_cls, collate, device, task: str, **dataset_kwargs):
    """Eval loader over ``--query_txt_db`` (no length filter) with the run's data settings."""
    data_opts = SimpleNamespace(**{**vars(hps), "task": task})
    video_db = load_video_sub_dataset(opts.vfeat_db, opts.sub_txt_db, hps.vfeat_interval,
                                      data_opts)
    query_db = QaQueryTokLmdb(opts.query_txt_db, -1)
    dataset = dataset_cls(get_video_ids(opts.query_txt_db), video_db, query_db,
                          **dataset_kwargs)
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                        num_workers=opts.n_workers, collate_fn=collate,
                        pin_memory=opts.pin_mem and torch.cuda.is_available())
    return PrefetchLoader(loader, device)


def write_qa_outputs(opts, val_log: dict, results: dict, logits) -> Path:
    """Rank 0: ``results_{split}[_w_logit]/results_{ckpt}_all.json`` (+ ``logits_{ckpt}_all.pkl``
    and ``metrics_{ckpt}_all.json`` beside it)."""
    suffix = "_w_logit" if logits is not None else ""
    path = results_file(opts.output_dir, f"{opts.split}{suffix}", opts.checkpoint)
    if get_rank() != 0:
        return path
    write_json_atomic(path, results)
    tag = checkpoint_tag(opts.checkpoint)
    write_json_atomic(path.with_name(f"metrics_{tag}_all.json"), val_log, indent=4)
    if logits is not None:
        pkl = path.with_name(f"logits_{tag}_all.pkl")
        tmp = pkl.with_name(f".{pkl.name}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(logits, f)
        os.replace(tmp, pkl)
    LOGGER.info("%s: %s; predictions written to %s", opts.split, val_log, path)
    return path


def run_qa_eval(opts, model_cls, validate, task: str, dataset_cls, collate, **dataset_kwargs):
    """Shared body of the two scripts; returns ``(val_log, results, logits)``. The checkpoint
    is loaded (strictly, see eval/common.py) before any DB is opened, so a wrong one fails fast."""
    console_logging()
    for message in config_warnings(opts):
        LOGGER.warning(message)
    device = init_distributed()
    hps = load_hps(opts.output_dir)
    require_hps(hps, DATA_KEYS, opts.output_dir)
    check_split(opts.split, opts.query_txt_db)
    model, _ = build_eval_model(model_cls, opts.output_dir, opts.checkpoint, device)
    loader = build_eval_loader(opts, hps, dataset_cls, collate, device, task, **dataset_kwargs)
    val_log, results, logits = validate(model, loader, opts.save_logits, opts.fp16, opts.bf16)
    write_qa_outputs(opts, val_log, results, logits)
    return val_log, results, logits

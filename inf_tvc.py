"""TVC captioning inference: greedy-decode the clips of a TVC jsonl (training.md §1.4, §5.9).

Usage (from the repository root)::

    python inf_tvc.py --model_dir /storage/tvc_default --ckpt_step 7000 \
        --target_clip /txt/tvc_val_release.jsonl --output tvc_val_predictions.jsonl \
        [--toker roberta-base|/path/to/roberta_tokenizer] [--no_fp16]

Multi-GPU: ``torchrun --nproc_per_node N inf_tvc.py ...`` (videos are sharded by rank, all clips
of a video on one rank, and the captions gathered). The model is
``{model_dir}/ckpt/model_step_{ckpt_step}.pt`` built from ``{model_dir}/log/model_config.json``
and loaded strictly (a checkpoint without the caption decoder, e.g. a pretrained one, is refused);
subtitle/video DBs and data settings come from ``log/hps.json``. Rank 0 writes one line per clip,
``{"vid_name", "clip_id", "ts", "descs": [{"desc"}]}`` (the official TVC submission format), to
``--output``, and, when the target lines carry reference ``descs`` (val), logs Bleu_1..4,
METEOR, ROUGE_L and CIDEr (eval/tvc.py) and writes them to ``{output stem}_metrics.json``.

Decisions: fp16 is on by default as upstream (``--no_fp16`` turns it off) but is
``torch.autocast`` and is skipped on a machine without CUDA (logged). ``--toker`` (a Hugging Face
model name read from the local cache, e.g. ``roberta-base`` as upstream-built caption DBs record,
or a local folder; utils/tokenizer.py) defaults to the tokenizer recorded in hps.json
(``toker``), else in the training caption DB's meta.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from torch.utils.data import DataLoader

from data.data import load_video_sub_dataset
from data.loader import PrefetchLoader
from data.tvc import TvcEvalDataset
from eval.captioning import decode_tvc
from eval.common import (
    EvalSetupError,
    build_eval_model,
    init_distributed,
    load_hps,
    require_hps,
    write_json_atomic,
)
from eval.qa import DATA_KEYS
from eval.tvc import TVCEval
from model.tvc import HeroForTvc
from utils.distributed import get_rank
from utils.errors import run_main
from utils.logger import console_logging
from utils.save import atomic_write_text
from utils.tokenizer import load_toker

LOGGER = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TVC greedy captioning inference")
    p.add_argument("--model_dir", required=True, help="training run folder (log/, ckpt/)")
    p.add_argument("--ckpt_step", required=True, type=int, help="uses ckpt/model_step_{N}.pt")
    p.add_argument("--output", required=True, help="predictions jsonl to write")
    p.add_argument("--batch_size", type=int, default=8, help="videos per batch per rank")
    p.add_argument("--max_gen_step", type=int, default=30, help="greedy decoding steps")
    p.add_argument("--n_workers", type=int, default=4)
    p.add_argument("--no_pin_mem", action="store_true")
    p.add_argument("--no_fp16", action="store_true", help="decode in fp32")
    p.add_argument("--target_clip", required=True,
                   help="TVC jsonl of the clips to caption (vid_name, clip_id, ts[, descs])")
    p.add_argument("--toker", default=None,
                   help="RoBERTa tokenizer: a Hugging Face model name (roberta-base) or a local "
                        "folder with vocab.json and merges.txt (default: the one in hps.json)")
    return p.parse_args(argv)


def tokenizer_source(opts, hps) -> tuple[str, str]:
    """(tokenizer name or folder, where it came from): ``--toker``, else hps.json's ``toker``,
    else the training caption DB's meta.json (``toker``, else ``tokenizer``)."""
    if opts.toker:
        return opts.toker, "--toker"
    if getattr(hps, "toker", None):
        return hps.toker, f"toker (recorded in {opts.model_dir}/log/hps.json; --toker overrides it)"
    for key in ("train_db", "val_db"):
        meta = os.path.join(str(getattr(hps, key, "")), "meta.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                info = json.load(f)
            toker = info.get("toker") or info.get("tokenizer")
            if toker:
                return toker, f"toker (recorded in {meta}; --toker overrides it)"
    raise EvalSetupError(f"{opts.model_dir}/log/hps.json records no tokenizer (toker) and no "
                         "caption DB meta.json names one; pass --toker roberta-base or "
                         "--toker DIR (a local RoBERTa tokenizer folder)")


def has_references(path) -> bool:
    """True when any line of the clip file carries ``descs`` (val); test_public has none."""
    with open(path) as f:
        return any(line.strip() and json.loads(line).get("descs") for line in f)


def build_loader(opts, hps, device):
    video_db = load_video_sub_dataset(hps.vfeat_db, hps.sub_txt_db, hps.vfeat_interval, hps)
    dataset = TvcEvalDataset(video_db, opts.target_clip)
    loader = DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                        num_workers=opts.n_workers, collate_fn=TvcEvalDataset.collate,
                        pin_memory=not opts.no_pin_mem and torch.cuda.is_available())
    return PrefetchLoader(loader, device)


def reference_evaluator(opts):
    """``TVCEval`` of ``--target_clip`` on rank 0 when it has references, built before decoding
    so a bad reference file fails early; None otherwise."""
    if get_rank() != 0:
        return None
    if not has_references(opts.target_clip):
        LOGGER.info("%s has no reference descs: predictions only", opts.target_clip)
        return None
    return TVCEval(opts.target_clip)


def write_outputs(opts, results, evaluator) -> dict | None:
    """Rank 0: the jsonl, then the scores when there are references."""
    atomic_write_text(opts.output, "".join(json.dumps(r) + "\n" for r in results))
    LOGGER.info("%d captions written to %s", len(results), opts.output)
    if evaluator is None:
        return None
    scores = evaluator(results)
    stem = os.path.splitext(opts.output)[0]
    write_json_atomic(f"{stem}_metrics.json", scores, indent=4)
    LOGGER.info("scores against %s: %s", opts.target_clip,
                ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return scores


def main(argv=None):
    """Returns ``(results, scores)``; scores None without references or off rank 0."""
    console_logging()
    opts = parse_args(argv)
    device = init_distributed()
    hps = load_hps(opts.model_dir)
    require_hps(hps, DATA_KEYS + ("sub_txt_db", "vfeat_db"), opts.model_dir)
    toker = load_toker(*tokenizer_source(opts, hps))
    model, _ = build_eval_model(HeroForTvc, opts.model_dir, opts.ckpt_step, device,
                                lsr=getattr(hps, "lsr", 0.1))
    loader = build_loader(opts, hps, device)
    evaluator = reference_evaluator(opts)
    fp16 = not opts.no_fp16 and device.type == "cuda"
    if not opts.no_fp16 and not fp16:
        LOGGER.info("no CUDA device: decoding in fp32")
    results = decode_tvc(model, loader, toker, opts.max_gen_step, fp16=fp16)
    scores = write_outputs(opts, results, evaluator) if get_rank() == 0 else None
    return results, scores


if __name__ == "__main__":
    run_main(main)

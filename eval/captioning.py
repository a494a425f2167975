"""TVC greedy decoding over a clip loader and its validation (training.md §4.6, §5.9).

:func:`decode_tvc` runs ``HeroForTvc`` greedy decoding (``max_gen_step`` steps, no early stop,
cut before the first EOS) on every batch of a ``TvcValDataset``/``TvcEvalDataset`` loader,
detokenises with the local RoBERTa tokenizer (``convert_ids_to_tokens`` then
``convert_tokens_to_string``: byte-level BPE, no special-token filtering) and all-gathers the
result lines ``{"vid_name", "clip_id": int, "ts": [st, ed], "descs": [{"desc": text}]}`` (the
TVC submission format) from every rank, in rank order.

Decisions:
- Decoding uses the key/value cache by default (``use_cache=False`` runs upstream's full
  recompute per step; both give the same ids, see ``HeroForTvc.greedy_ids``).
- Mixed precision is ``torch.autocast`` instead of casting inputs and memory to half.
- The model may emit one of the 7 padded-vocabulary ids that the tokenizer does not know
  (upstream's tokenizer would fail on them); they are dropped from the text, counted and logged.

A barely trained decoder (the toy demo's 24 updates) has a nearly flat next-token distribution
that hardly depends on the prefix, so greedy decoding follows position and clip only and blends
the caption templates; its Bleu_4 can then be ~0 next to a fair Bleu_3 (eval/tvc.py explains).
"""
from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from data.loader import move_to_device
from eval.common import autocast, eval_mode, model_device
from utils.distributed import all_gather_object, broadcast_object, get_rank

LOGGER = logging.getLogger(__name__)
MAX_GEN_STEP = 30


def ids_to_text(toker, ids, unknown: list) -> str:
    """Byte-level BPE detokenisation; ids outside the vocabulary are dropped and counted in
    ``unknown`` (a one-element list used as a counter)."""
    tokens = toker.convert_ids_to_tokens(list(ids))
    kept = [t for t in tokens if t is not None]
    unknown[0] += len(tokens) - len(kept)
    return toker.convert_tokens_to_string(kept)


def result_lines(batch: dict, texts) -> list[dict]:
    """One submission line per clip of the batch (clip lists are flat, video by video)."""
    keys = ("vid_names", "clip_ids", "all_ts")
    if any(len(batch[k]) != len(texts) for k in keys):
        raise ValueError(f"batch has {len(texts)} decoded clips but "
                         f"{[len(batch[k]) for k in keys]} entries in {keys}")
    return [{"vid_name": vid, "clip_id": int(clip), "ts": list(ts), "descs": [{"desc": text}]}
            for vid, clip, ts, text in zip(batch["vid_names"], batch["clip_ids"],
                                           batch["all_ts"], texts)]


@torch.no_grad()
def decode_tvc(model, loader, toker, max_gen_step: int = MAX_GEN_STEP, fp16: bool = False,
               bf16: bool = False, use_cache: bool = True) -> list[dict]:
    """Greedy captions of every clip of ``loader`` on every rank, gathered (see module doc)."""
    device = model_device(model)
    decode = model.decode if use_cache else model.decode_full_recompute
    local, unknown = [], [0]
    for batch in tqdm(loader, desc="decode tvc", disable=get_rank() != 0, leave=False):
        batch = move_to_device(batch, device)
        with eval_mode(model), autocast(device, fp16, bf16):
            ids = decode(batch, max_gen_step)
        local += result_lines(batch, [ids_to_text(toker, row, unknown) for row in ids])
    if unknown[0]:
        LOGGER.warning("%d decoded ids are outside the tokenizer vocabulary (padded-vocab rows) "
                       "and were dropped from the captions on rank %d", unknown[0], get_rank())
    return [line for part in all_gather_object(local) for line in part]


def validate_tvc(model, loader, evaluator, toker, max_gen_step: int = MAX_GEN_STEP,
                 fp16: bool = False, bf16: bool = False):
    """Decode on all ranks, score on rank 0 with ``evaluator`` (a ``TVCEval``), and return
    ``(val_log, results)`` on every rank; ``val_log`` keys are the bare metric names
    (``Bleu_1``...``CIDEr``), upstream's TensorBoard keys."""
    start = time.time()
    results = decode_tvc(model, loader, toker, max_gen_step, fp16, bf16)
    elapsed = time.time() - start
    val_log = evaluator(results) if get_rank() == 0 else None
    LOGGER.info("decoded %d clips in %.1f s (%.1f captions/s)", len(results), elapsed,
                len(results) / max(elapsed, 1e-9))
    return broadcast_object(val_log), results

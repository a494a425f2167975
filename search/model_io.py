"""The model side of an index: which run and checkpoint built it, and loading them back.

An index's frame representations are only meaningful with the weights that encoded them, so
the index records the checkpoint's identity (resolved path, size, SHA-256) and both building
more videos into it and loading it check that the checkpoint found is still that one.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from eval.common import build_eval_model, load_hps, require_hps, resolve_checkpoint
from eval.retrieval_cli import model_kwargs
from search.index import HPS_KEYS, SearchIndexError


def file_sha256(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(model_dir, ckpt, known: dict | None = None) -> dict:
    """``{"model_dir", "path", "size", "mtime_ns", "sha256"}`` of ``--ckpt`` (a step of
    ``model_dir`` or a file), absolute paths so an index works from any directory. When
    ``known`` (an index's record) has the same path, size and mtime, its hash is reused: hashing
    a full-size checkpoint takes seconds, and every load would pay them."""
    path = resolve_checkpoint(ckpt, model_dir)
    stat = path.stat()
    found = {"model_dir": os.path.abspath(model_dir), "path": os.path.abspath(path),
             "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    same_file = known and all(known.get(k) == found[k] for k in ("path", "size", "mtime_ns"))
    found["sha256"] = known["sha256"] if same_file else file_sha256(path)
    return found


def check_same_checkpoint(recorded: dict, found: dict, where) -> None:
    """Refuse a checkpoint other than the index's, naming both (issue 19)."""
    if recorded["sha256"] != found["sha256"]:
        raise SearchIndexError(
            f"the index {where} was built with the checkpoint {recorded['path']} (sha256 "
            f"{recorded['sha256'][:12]}), not {found['path']} (sha256 {found['sha256'][:12]}): "
            "its frame representations only fit that model. Pass that checkpoint, or build a "
            "new index with another --out")


def index_hps(model_dir) -> dict:
    """The hps a query needs, from ``{model_dir}/log/hps.json`` (named if lacking)."""
    hps = load_hps(model_dir)
    require_hps(hps, HPS_KEYS, model_dir)
    if not (hps.lw_neg_ctx or hps.lw_neg_q):
        raise SearchIndexError(
            f"{Path(model_dir) / 'log' / 'hps.json'} has lw_neg_ctx = lw_neg_q = 0: the model "
            "has no video scores, so full-corpus moment retrieval (VCMR) is impossible with it "
            "(as in eval_vcmr.py); fine-tune with non-zero lw_neg_ctx/lw_neg_q")
    return {k: getattr(hps, k) for k in HPS_KEYS}, hps


def build_model(model_dir, ckpt, device):
    """The eval model of eval_vcmr.py (strict loading, dropout off, eval mode)."""
    from model.vcmr import HeroForVcmr

    _, hps = index_hps(model_dir)
    model, _ = build_eval_model(HeroForVcmr, model_dir, ckpt, device,
                                **model_kwargs(hps, "vcmr"))
    return model


def load_index_model(meta: dict, where, device=None):
    """(model, tokenizer, device) of an index: the recorded checkpoint, checked unchanged."""
    from eval.common import get_device
    from utils.tokenizer import load_toker

    rec = meta["checkpoint"]
    if not os.path.isfile(rec["path"]):
        raise SearchIndexError(f"the checkpoint of the index {where}, {rec['path']}, is gone; "
                               "restore it or rebuild the index with scripts/build_index.py")
    found = checkpoint_identity(rec["model_dir"], rec["path"], known=rec)
    check_same_checkpoint(rec, found, where)
    device = get_device(device)
    model = build_model(rec["model_dir"], rec["path"], device)
    toker = load_toker(meta["toker"], f"tokenizer of the index {where} ({meta['toker']!r})")
    return model, toker, device

"""Shared driver of ``eval_vcmr.py`` and ``eval_vr.py`` (training.md §1.4, §5.1, §5.6).

Model hyper-parameters and data settings (``vfeat_interval``, ``max_clip_len``, ``q2c_alpha``,
``max_vcmr_video``/``max_vr_video``, NMS and window settings, ``distributed_eval``...) come
from ``{output_dir}/log/hps.json``; ``task``, ``full_eval_tasks`` and the batch sizes from the
command line (or ``--config``). Rank 0 writes the merged results to
``{output_dir}/results_{split}/results_{checkpoint}_all.json`` and the metrics (the
TensorBoard-style ``val_log``) next to it as ``metrics_{checkpoint}_all.json``; with
``eval_with_query_type`` each ``..._by_type`` group there ends with its ``desc_type_ratio``
string, placed as training.md §5.3 places it in ``eval_retrieval``'s result.
"""
from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from config.config import add_bool, config_warnings, parse_with_config
from data.data import load_video_only_dataset, load_video_sub_dataset
from data.txt_db import QueryTokLmdb, VrQueryTokLmdb
from data.vcmr import (
    VcmrFullEvalDataset,
    VcmrVideoOnlyFullEvalDataset,
    get_video_ids,
    vcmr_full_eval_collate,
)
from data.vr import VrFullEvalDataset, VrVideoOnlyFullEvalDataset
from eval.common import (
    build_eval_model,
    check_split,
    checkpoint_tag,
    init_distributed,
    load_hps,
    require_hps,
    results_file,
    write_json_atomic,
)
from eval.retrieval import gather_submission, validate_full_vcmr, validate_full_vr
from eval.vcmr_ranking import IMPLS
from utils.distributed import get_rank
from utils.logger import console_logging

LOGGER = logging.getLogger(__name__)
DATA_KEYS = ("vfeat_interval", "max_clip_len")
DATA_DEFAULTS = dict(vfeat_version="resnet_slowfast", compressed_db=False, sub_ctx_len=0)
HPS_KEYS = {
    "vcmr": DATA_KEYS + ("q2c_alpha", "max_vcmr_video", "min_pred_l", "max_pred_l",
                         "max_before_nms", "max_after_nms", "nms_thd", "lw_neg_ctx",
                         "lw_neg_q"),
    "vr": DATA_KEYS + ("lw_neg_ctx", "lw_neg_q"),
}
DEFAULTS = {
    "vcmr": dict(sub_txt_db="/txt/tv_subtitles.db", vfeat_db="/video/tv",
                 query_txt_db="/txt/tvr_val.db", splits=["val", "test_public", "test"],
                 tasks=["tvr", "how2r", "didemo_video_sub", "didemo_video_only"]),
    "vr": dict(sub_txt_db="/txt/msrvtt_subtitles.db", vfeat_db="/video/msrvtt",
               query_txt_db="/txt/msrvtt_val.db", splits=["val", "test"],
               tasks=["msrvtt_video_sub", "msrvtt_video_only"]),
}


def build_parser(kind: str) -> argparse.ArgumentParser:
    d = DEFAULTS[kind]
    p = argparse.ArgumentParser(description=f"full-corpus {kind.upper()} evaluation")
    p.add_argument("--sub_txt_db", default=d["sub_txt_db"])
    p.add_argument("--vfeat_db", default=d["vfeat_db"])
    p.add_argument("--query_txt_db", default=d["query_txt_db"])
    p.add_argument("--split", default="val", choices=d["splits"])
    p.add_argument("--task", default=d["tasks"][0], choices=d["tasks"])
    p.add_argument("--checkpoint", default=None, help="file path, or step of "
                   "{output_dir}/ckpt/model_step_{N}.pt")
    p.add_argument("--batch_size", type=int, default=80, help="queries per batch")
    p.add_argument(f"--{kind}_eval_video_batch_size", type=int, default=50)
    if kind == "vcmr":
        p.add_argument("--full_eval_tasks", nargs="+", choices=["VCMR", "SVMR", "VR"],
                       default=["VCMR", "SVMR", "VR"])
    p.add_argument("--output_dir", default=None, help="training run folder")
    add_bool(p, "fp16", help="torch.autocast fp16")
    add_bool(p, "bf16", help="torch.autocast bf16")
    p.add_argument("--n_workers", type=int, default=4)
    add_bool(p, "pin_mem")
    p.add_argument("--ranking_impl", default="fast", choices=IMPLS,
                   help="vectorised ranking or the plain reference (same results)")
    p.add_argument("--config", default=None, help="JSON file with any of these flags")
    return p


def parse_args(kind: str, argv=None):
    opts = parse_with_config(build_parser(kind), argv)
    if opts.output_dir is None:
        raise SystemExit("--output_dir (the training run folder) is required")
    return opts


def build_query_loader(opts, hps, kind: str) -> DataLoader:
    """Full-eval query loader over the split's corpus, with the run's data settings."""
    data_opts = SimpleNamespace(**{**DATA_DEFAULTS, **vars(hps), "task": opts.task})
    video_only = opts.task.endswith("video_only")
    query_db = (VrQueryTokLmdb if kind == "vr" else QueryTokLmdb)(opts.query_txt_db, -1)
    if video_only:
        video_db = load_video_only_dataset(opts.vfeat_db, opts.query_txt_db,
                                           hps.vfeat_interval, data_opts)
    else:
        video_db = load_video_sub_dataset(opts.vfeat_db, opts.sub_txt_db, hps.vfeat_interval,
                                          data_opts)
    dataset_cls = {("vcmr", False): VcmrFullEvalDataset,
                   ("vcmr", True): VcmrVideoOnlyFullEvalDataset,
                   ("vr", False): VrFullEvalDataset,
                   ("vr", True): VrVideoOnlyFullEvalDataset}[kind, video_only]
    dataset = dataset_cls(get_video_ids(opts.query_txt_db), video_db, query_db,
                          distributed=bool(getattr(hps, "distributed_eval", False)))
    return DataLoader(dataset, batch_size=opts.batch_size, shuffle=False,
                      num_workers=opts.n_workers, collate_fn=vcmr_full_eval_collate,
                      pin_memory=opts.pin_mem and torch.cuda.is_available())


def model_kwargs(hps, kind: str) -> dict:
    """Constructor arguments from hps.json; hard negatives and the span loss are off."""
    kwargs = dict(lw_neg_ctx=hps.lw_neg_ctx, lw_neg_q=hps.lw_neg_q,
                  ranking_loss_type=getattr(hps, "ranking_loss_type", "hinge"),
                  margin=getattr(hps, "margin", 0.1),
                  use_all_neg=getattr(hps, "use_all_neg", True))
    if kind == "vcmr":
        kwargs.update(lw_st_ed=0, drop_svmr_prob=getattr(hps, "drop_svmr_prob", 0))
    return kwargs


def run(kind: str, argv=None):
    """Evaluate one checkpoint; returns ``(val_log, merged submission)``. The checkpoint is
    loaded (strictly, see eval/common.py) before any DB is opened, so a wrong one fails fast."""
    console_logging()
    opts = parse_args(kind, argv)
    for message in config_warnings(opts):
        LOGGER.warning(message)
    device = init_distributed()
    hps = load_hps(opts.output_dir)
    require_hps(hps, HPS_KEYS[kind], opts.output_dir)
    check_split(opts.split, opts.query_txt_db)
    if kind == "vcmr":
        from model.vcmr import HeroForVcmr as model_cls
        validate = validate_full_vcmr
    else:
        from model.vr import HeroForVr as model_cls
        validate = validate_full_vr
    model, _ = build_eval_model(model_cls, opts.output_dir, opts.checkpoint, device,
                                **model_kwargs(hps, kind))
    loader = build_query_loader(opts, hps, kind)
    val_log, submission = validate(model, loader, opts.split, opts, hps, impl=opts.ranking_impl)
    merged = gather_submission(submission, bool(getattr(hps, "distributed_eval", False)))
    if get_rank() == 0:
        path = write_json_atomic(results_file(opts.output_dir, opts.split, opts.checkpoint),
                                 merged)
        metrics_path = path.with_name(f"metrics_{checkpoint_tag(opts.checkpoint)}_all.json")
        write_json_atomic(metrics_path, val_log, indent=4)
        LOGGER.info("results written to %s, metrics to %s", path, metrics_path)
    return val_log, merged

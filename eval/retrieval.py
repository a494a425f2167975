"""Full-corpus evaluation: ``validate_full_vcmr`` (training.md §5.1) and ``validate_full_vr``
(§5.6), used by ``eval_vcmr.py`` / ``eval_vr.py`` and by validation during training.

Both return ``(val_log, eval_submission)``: ``val_log`` maps TensorBoard keys
(``valid_{split}_{TASK}/{TASK}_{key}``, ``valid/vcmr_{split}_ex_per_s``...) to numbers, except
``valid_{split}_{TASK}_by_type/{TASK}_by_type_desc_type_ratio``, a string (training.md §5.3;
split off with :func:`numeric_metrics` before TensorBoard), and
``eval_submission`` is this rank's results dict (``video2idx`` + task lists, §5.5).

Decisions:
- §5.4 / P7: with ``distributed_eval`` every rank's predictions and GT are all-gathered and the
  metrics under upstream's keys are the **exact global** numbers (re-scored on the merged
  lists). Upstream's query-count-weighted average of rounded per-rank metrics is also logged,
  under ``valid_{split}_{TASK}_rank_avg/...``, when there is more than one rank. With
  ``--virtual_world_size N`` (issue 16) the ranks averaged are the N virtual ones: each
  process scores the query shard of every rank of N that its own shard contains
  (:func:`rank_shards`), so a virtual run logs what an N-process run logs.
- q1 / P6: the saved file follows upstream: with GT and ``nms_thd != -1`` its VCMR and SVMR
  lists are the post-NMS ones; NMS runs on the top-``max_after_nms`` lists; test splits
  without GT are never NMS'd and have no SVMR list.
- "No GT" is sticky as upstream: from the first batch holding a target < 0, SVMR and metrics
  are off; SVMR lists made before that are dropped (logged) rather than saved partially.
- VCMR needs VR (and non-zero ``lw_neg_*``), as upstream; a request that cannot be served is
  logged once.
- Queries whose GT video is not in the corpus are counted and logged; they stay in the lists
  (no SVMR predictions) and count as misses.
- ``desc_id`` is ``int(qid)`` for VCMR/SVMR/VR of moment tasks (the raw string if not numeric)
  and the raw qid string for MSR-VTT VR.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.loader import move_to_device
from data.vcmr import VideoCorpusDataset, split_video2idx, video_corpus_collate
from eval.common import autocast, eval_mode, model_device
from eval.nms import post_process_nms
from eval.vcmr_ranking import encode_video_corpus, rank_batch, span_probs
from utils.distributed import all_gather_object, get_world_size
from utils.tvr_standalone_eval import eval_retrieval

LOGGER = logging.getLogger(__name__)
TASKS = ("VCMR", "SVMR", "VR")
IOU_THDS = (0.5, 0.7)


@dataclass
class FullEvalSetting:
    """Everything the procedure reads from the eval flags and hps.json (training.md §1.4)."""

    tasks: tuple
    k_videos: int
    video_batch_size: int
    vfeat_interval: float = 1.5
    max_clip_len: int = 100
    alpha: float = 20.0
    use_exp: bool = True
    min_l: int = 2
    max_l: int = 16
    max_before_nms: int = 200
    max_after_nms: int = 100
    nms_thd: float = -1
    use_desc_type: bool = False
    distributed: bool = False
    n_workers: int = 0
    pin_mem: bool = False
    fp16: bool = False
    bf16: bool = False
    impl: str = "fast"
    ranks: int = 0  # the ranks ``_rank_avg`` averages over (virtual world); 0: real world


def vcmr_setting(opts, model_opts=None, impl="fast") -> FullEvalSetting:
    """Flags from ``opts`` (CLI: tasks, video batch size), the rest from ``model_opts`` (hps)."""
    m = model_opts or opts
    return FullEvalSetting(
        tasks=tuple(getattr(opts, "full_eval_tasks", None) or TASKS),
        k_videos=m.max_vcmr_video, video_batch_size=opts.vcmr_eval_video_batch_size,
        vfeat_interval=m.vfeat_interval, max_clip_len=m.max_clip_len, alpha=m.q2c_alpha,
        min_l=m.min_pred_l, max_l=m.max_pred_l, max_before_nms=m.max_before_nms,
        max_after_nms=m.max_after_nms, nms_thd=m.nms_thd,
        use_desc_type=bool(getattr(m, "eval_with_query_type", False)),
        distributed=bool(getattr(m, "distributed_eval", False)), **_runtime(opts, impl))


def vr_setting(opts, model_opts=None, impl="fast") -> FullEvalSetting:
    m = model_opts or opts
    return FullEvalSetting(
        tasks=("VR",), k_videos=getattr(m, "max_vr_video", 100),
        video_batch_size=opts.vr_eval_video_batch_size, vfeat_interval=m.vfeat_interval,
        max_clip_len=m.max_clip_len, use_exp=False,
        distributed=bool(getattr(m, "distributed_eval", False)), **_runtime(opts, impl))


def _runtime(opts, impl):
    return {"n_workers": getattr(opts, "n_workers", 0), "pin_mem": getattr(opts, "pin_mem", False),
            "fp16": getattr(opts, "fp16", False), "bf16": getattr(opts, "bf16", False),
            "impl": impl}


# --------------------------------------------------------------------------- corpus
def corpus_index(dataset, split):
    """(sorted local video names, global ``video2idx`` of the split); checks both agree."""
    video2idx = split_video2idx(dataset.vid2idx, split)
    vids = sorted(dataset.video_ids)
    if not vids:
        raise ValueError(f"empty corpus for split {split!r}: {dataset.query_db.db_dir} names no "
                         "video (query2video.json / video_ids.json)")
    unknown = [v for v in vids if v not in video2idx]
    if unknown:
        raise KeyError(f"{len(unknown)} corpus video(s) have no global index for split {split!r} "
                       f"(e.g. {unknown[:5]}); check the subtitle DB's vid2dur_idx.json or "
                       "the video DB's id2nframe.json")
    return vids, video2idx


def encode_corpus(model, dataset, vids, setting, device):
    loader = DataLoader(VideoCorpusDataset(vids, dataset.video_db),
                        batch_size=setting.video_batch_size, shuffle=False,
                        num_workers=setting.n_workers, collate_fn=video_corpus_collate,
                        pin_memory=setting.pin_mem and device.type == "cuda")
    amp = lambda: autocast(device, setting.fp16, setting.bf16)
    return encode_video_corpus(model, loader, device, setting.max_clip_len, amp)


# --------------------------------------------------------------------------- query loop
class _Collector:
    """Accumulates per-query prediction dicts and the bookkeeping of the query loop."""

    def __init__(self, tasks):
        self.lists = {t: [] for t in tasks}
        self.has_gt = True
        self.n_absent = 0
        self.n_queries = 0


def _desc_id(qid, raw: bool):
    if raw:
        return qid
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def _gt_local(vids, vid2local, col):
    """Local GT video index per query (−1 if none); absent videos are counted."""
    out = []
    for vid in vids:
        if vid != -1 and vid not in vid2local:
            col.n_absent += 1
        out.append(vid2local.get(vid, -1))
    return out


def _score_batch(model, batch, frames, masks, setting, need_spans, need_scores):
    query = model.encode_queries(batch["query_input_ids"], batch["query_pos_ids"],
                                 batch["query_attn_masks"])
    p_st = p_ed = scores = None
    if need_spans:
        p_st, p_ed = span_probs(*model.get_st_ed(query, frames, masks, cross=True))
    if need_scores:
        scores = model.get_video_scores(query, frames, masks)
    return scores, p_st, p_ed


def _add_predictions(col, ranked, batch, to_global, video2idx, setting, raw_ids):
    """Step C: ``[video_idx_global, st_sec, ed_sec, score]`` rows, one dict per query."""
    fi = setting.vfeat_interval
    for n, qid in enumerate(batch["qids"]):
        head = {"desc_id": _desc_id(qid, raw_ids), "desc": ""}
        if "VR" in ranked and "VR" in col.lists:
            col.lists["VR"].append({**head, "predictions": [
                [to_global[v], 0, 0, s] for v, s in ranked["VR"][n]]})
        if "VCMR" in ranked and "VCMR" in col.lists:
            col.lists["VCMR"].append({**head, "predictions": [
                [to_global[v], i * fi, (j + 1) * fi, s] for v, i, j, s in ranked["VCMR"][n]]})
        if "SVMR" in ranked and "SVMR" in col.lists:
            gt_idx = video2idx.get(batch["vids"][n], -1)
            col.lists["SVMR"].append({**head, "predictions": [
                [gt_idx, i * fi, (j + 1) * fi, s] for i, j, s in ranked["SVMR"][n]]})


@torch.no_grad()
def run_queries(model, loader, frames, masks, local_vids, video2idx, setting, raw_ids=False):
    """Step B + C over every query batch; returns the collector with the prediction lists."""
    device = frames.device
    tasks = _servable_tasks(model, setting)
    col = _Collector(tasks)
    vid2local = {v: i for i, v in enumerate(local_vids)}
    to_global = [video2idx[v] for v in local_vids]
    for batch in tqdm(loader, desc="rank queries", leave=False):
        if col.has_gt and bool((batch["targets"] < 0).any()):
            col.has_gt = False
        batch = move_to_device(batch, device)
        need_svmr = "SVMR" in tasks and col.has_gt
        with autocast(device, setting.fp16, setting.bf16):
            scores, p_st, p_ed = _score_batch(model, batch, frames, masks, setting,
                                              "VCMR" in tasks or need_svmr, "VR" in tasks)
        gt_local = _gt_local(batch["vids"], vid2local, col) if need_svmr else None
        ranked = rank_batch(setting, scores, p_st if "VCMR" in tasks else None, p_ed, None,
                            setting.impl) if scores is not None else {}
        if gt_local is not None:
            ranked.update(rank_batch(setting, None, p_st, p_ed, gt_local, setting.impl))
        _add_predictions(col, ranked, batch, to_global, video2idx, setting, raw_ids)
        col.n_queries += len(batch["qids"])
    return col


def _servable_tasks(model, setting):
    tasks = list(setting.tasks)
    if not model.use_video_scores and ("VR" in tasks or "VCMR" in tasks):
        LOGGER.warning("lw_neg_ctx and lw_neg_q are 0: no video scores, so VR and VCMR are "
                       "skipped (upstream behaviour)")
        tasks = [t for t in tasks if t not in ("VR", "VCMR")]
    if "VCMR" in tasks and "VR" not in tasks:
        LOGGER.warning("VCMR is computed only together with VR (upstream); add VR to "
                       "--full_eval_tasks to get VCMR")
        tasks.remove("VCMR")
    return tuple(t for t in TASKS if t in tasks)


# --------------------------------------------------------------------------- metrics
def ground_truth_for(dataset, patch_vr=False):
    """GT lines of this rank's queries from ``query_data.jsonl`` (MSR-VTT: patched ids)."""
    query_db = dataset.query_db
    missing = [q for q in dataset.qids if q not in query_db.query_data]
    if missing:
        raise KeyError(f"{query_db.db_dir}/query_data.jsonl lacks {len(missing)} of "
                       f"{len(dataset.qids)} evaluated queries (e.g. {missing[:5]})")
    gts = [query_db.query_data[q] for q in dataset.qids]
    if not patch_vr:
        return gts
    no_clip = [q for q, g in zip(dataset.qids, gts) if "clip_name" not in g]
    if no_clip:
        raise KeyError(f"{query_db.db_dir}/query_data.jsonl: {len(no_clip)} MSR-VTT lines lack "
                       f"'clip_name' (e.g. query {no_clip[:5]})")
    return [{**g, "desc_id": q, "vid_name": g["clip_name"]} for q, g in zip(dataset.qids, gts)]


def merge_submissions(submissions):
    """Concatenate every task list in rank order; ``video2idx`` from the first (rank 0)."""
    merged = {}
    for task in TASKS:
        rows = [e for sub in submissions for e in sub.get(task, [])]
        if rows:
            merged[task] = rows
    merged["video2idx"] = submissions[0]["video2idx"]
    return merged


def rank_weighted_average(per_rank, counts):
    """Upstream's §5.4 aggregation: Σ n_r·m_r / Σ n_r for every numeric metric. The string
    ``desc_type_ratio`` is not averaged; a by-type key a rank lacks (no query of that type
    there) counts 0 for it, as an empty type scores 0."""
    total = sum(counts)
    out = {}
    for name, values in per_rank[0].items():
        if not isinstance(values, dict):
            continue
        keys = dict.fromkeys(k for m in per_rank for k, v in m[name].items()
                             if not isinstance(v, str))
        out[name] = {k: sum(n * m[name].get(k, 0.0) for m, n in zip(per_rank, counts)) / total
                     for k in keys}
    return out


def rank_shards(submission, gts, per_process: int) -> list:
    """``(submission, gts)`` of each of the ``per_process`` ranks of N (N = W·per_process)
    whose query shard lies in this process's shard (rank R of W), by index ``i``: rank
    ``R + i·W`` of N.

    Why: a dataset shard is ``qids[r::world]`` (data.md §11.2), so the shard of rank g of N is
    the slice ``[g // W :: N / W]`` of process ``g % W``'s queries, whose task lists and GT are
    in query order (one entry per query when metrics are computed)."""
    if per_process == 1:
        return [(submission, gts)]
    for task in TASKS:
        if task in submission and len(submission[task]) != len(gts):
            raise RuntimeError(f"{task}: {len(submission[task])} predictions for {len(gts)} "
                               "queries; per-rank metrics need one per query in query order")
    return [({**{t: rows[i::per_process] for t, rows in submission.items() if t in TASKS},
              "video2idx": submission["video2idx"]}, gts[i::per_process])
            for i in range(per_process)]


def _shard_metrics(submission, gts, per_process, kwargs) -> list:
    """``(query count, metrics)`` of this process's ranks (:func:`rank_shards`); ``None`` for
    an empty shard, which weighs nothing in the average."""
    return [(len(g), eval_retrieval(sub, g, **kwargs) if g else None)
            for sub, g in rank_shards(submission, gts, per_process)]


def score_submission(submission, gts, setting):
    """(exact metrics, upstream rank-weighted average or None); all ranks take part. The
    average is over ``setting.ranks`` ranks (the virtual world; the real one if 0)."""
    kwargs = dict(iou_thds=IOU_THDS, verbose=False, match_number=True,
                  use_desc_type=setting.use_desc_type)
    world = get_world_size()
    ranks = setting.ranks or world
    if not (setting.distributed and ranks > 1):
        return eval_retrieval(submission, gts, **kwargs), None
    local = _shard_metrics(submission, gts, ranks // world, kwargs)
    gathered = all_gather_object((submission, gts, local))
    subs, all_gts, by_process = map(list, zip(*gathered))
    merged_gts = [g for rank_gts in all_gts for g in rank_gts]
    exact = eval_retrieval(merge_submissions(subs), merged_gts, **kwargs)
    per_rank = [by_process[g % world][g // world] for g in range(ranks)]
    per_rank = [(n, m) for n, m in per_rank if m is not None]
    return exact, rank_weighted_average([m for _, m in per_rank], [n for n, _ in per_rank])


def flatten_metrics(metrics, split, suffix=""):
    """TensorBoard keys ``valid_{split}_{NAME}{suffix}/{NAME}_{key}``. ``desc_type_ratio``
    stays where §5.3 puts it (``..._by_type/{TASK}_by_type_desc_type_ratio``) as a string;
    :func:`numeric_metrics` keeps what TensorBoard can take."""
    return {f"valid_{split}_{name}{suffix}/{name}_{key}": value
            for name, values in (metrics or {}).items() if isinstance(values, dict)
            for key, value in values.items()}


def numeric_metrics(val_log):
    """``(numbers, strings)`` of a ``val_log``: TensorBoard scalars and the text-only entries
    (``desc_type_ratio``), so callers log the latter as text."""
    numbers = {k: v for k, v in val_log.items() if not isinstance(v, str)}
    return numbers, {k: v for k, v in val_log.items() if isinstance(v, str)}


def _log_metrics(split, setting, submission, gts, suffix=""):
    exact, rank_avg = score_submission(submission, gts, setting)
    log = flatten_metrics(exact, split, suffix)
    log.update(flatten_metrics(rank_avg, split, suffix + "_rank_avg"))
    shown = "VCMR" if "VCMR" in exact else next(t for t in TASKS if t in exact)
    LOGGER.info("%s %s%s: %s", split, shown, suffix, exact[shown])
    if f"{shown}_by_type" in exact:
        LOGGER.info("%s %s_by_type%s: %s", split, shown, suffix, exact[f"{shown}_by_type"])
    return log


# --------------------------------------------------------------------------- VCMR / VR
def _truncate(lists, n):
    """Step D: every per-query list cut to ``n`` (new dicts; empty task lists dropped)."""
    return {t: [{**e, "predictions": e["predictions"][:n]} for e in rows]
            for t, rows in lists.items() if rows}


def _has_gt(col, setting):
    flags = all_gather_object(col.has_gt) if setting.distributed else [col.has_gt]
    return all(flags)


def finish_vcmr(col, dataset, video2idx, setting, split):
    """Steps D–F: truncation, metrics, NMS. Returns (submission, val_log)."""
    lists = dict(col.lists)
    has_gt = _has_gt(col, setting)
    if not has_gt and lists.pop("SVMR", None):
        LOGGER.info("queries without GT in %s: SVMR and metrics skipped", split)
    if col.n_absent:
        LOGGER.warning("%d queries of %s name a video absent from the corpus: no SVMR "
                       "predictions, counted as misses", col.n_absent, split)
    submission = {**_truncate(lists, setting.max_after_nms), "video2idx": video2idx}
    if not has_gt or len(submission) == 1:
        return submission, {}
    gts = ground_truth_for(dataset)
    val_log = _log_metrics(split, setting, submission, gts)
    if setting.nms_thd != -1:
        for task in ("VCMR", "SVMR"):
            if task in submission:
                submission[task] = post_process_nms(submission[task], task, setting.nms_thd,
                                                    setting.max_before_nms,
                                                    setting.max_after_nms)
        val_log.update(_log_metrics(split, setting, submission, gts,
                                    f"_nms_{setting.nms_thd}"))
    return submission, val_log


def _rank_all_queries(model, val_loader, split, setting, raw_ids):
    """The prologue both validators share: unwrap DDP, encode the corpus and rank every query in
    eval mode. Returns ``(collector, video2idx, start time)``."""
    model = getattr(model, "module", model)
    start = time.time()
    dataset = val_loader.dataset
    vids, video2idx = corpus_index(dataset, split)
    with eval_mode(model):
        frames, masks, local_vids = encode_corpus(model, dataset, vids, setting,
                                                  model_device(model))
        col = run_queries(model, val_loader, frames, masks, local_vids, video2idx, setting,
                          raw_ids)
    return col, video2idx, start


def _queries_per_s(col, start) -> float:
    return col.n_queries / max(time.time() - start, 1e-9)


def validate_full_vcmr(model, val_loader, split, opts, model_opts=None, impl="fast", ranks=0):
    """Full-corpus VCMR/SVMR/VR of ``val_loader``'s queries (§5.1): (val_log, submission).
    ``ranks``: the virtual world size during training (``_rank_avg`` over its ranks)."""
    setting = vcmr_setting(opts, model_opts, impl)
    setting.ranks = ranks
    col, video2idx, start = _rank_all_queries(model, val_loader, split, setting, raw_ids=False)
    submission, val_log = finish_vcmr(col, val_loader.dataset, video2idx, setting, split)
    val_log[f"valid/vcmr_{split}_ex_per_s"] = _queries_per_s(col, start)
    return val_log, submission


def validate_full_vr(model, val_loader, split, opts, model_opts=None, impl="fast", ranks=0):
    """MSR-VTT video retrieval (§5.6): raw cosine scores, VR metrics only; ``ranks`` as for
    :func:`validate_full_vcmr`."""
    setting = vr_setting(opts, model_opts, impl)
    setting.ranks = ranks
    col, video2idx, start = _rank_all_queries(model, val_loader, split, setting, raw_ids=True)
    submission = {**_truncate(col.lists, setting.k_videos), "video2idx": video2idx}
    val_log = {}
    if "VR" in submission:
        val_log = _log_metrics(split, setting, submission,
                               ground_truth_for(val_loader.dataset, patch_vr=True))
    val_log[f"valid/vr_{split}_ex_per_s"] = _queries_per_s(col, start)
    return val_log, submission


def gather_submission(submission, distributed: bool):
    """All ranks' results merged in rank order (eval scripts), or this rank's alone."""
    if not (distributed and get_world_size() > 1):
        return submission
    return merge_submissions(all_gather_object(submission))

"""Retrieval metrics of TVR / DiDeMo / MSR-VTT submissions (training.md §5.3).

Usage (from the repository root)::

    python utils/tvr_standalone_eval.py --submission_path P.json --gt_path G.jsonl \
        --save_path S.json [--not_verbose]

The submission is ``{"video2idx": {name: idx}, "VCMR"|"SVMR"|"VR": [{"desc_id", "desc",
"predictions": [[video_idx, st, ed, score], ...]}]}``; the ground truth is one JSON per line
with ``desc_id``, ``vid_name``, ``ts`` (not needed for VR) and ``type`` (with desc types).

Keys: ``{TASK}[{thd}-r{K}]`` (VCMR, SVMR), ``VR[r{K}]``, K in 1/5/10/100, values
``round(100·fraction, 2)``; with ``use_desc_type`` also ``{TASK}_by_type`` (``{type}-...``,
divided by the number of queries of that type), each ending with the string
``desc_type_ratio`` (training.md §5.3, as upstream). ``eval_main`` is upstream's name of the CLI.

Decisions:
- IoU is float32 (interface.md); a GT ``ts`` that is a list of **≥ 4** ``[st, ed]`` pairs
  (DiDeMo) counts a prediction correct when at least 2 pairs reach the threshold; a list of
  fewer pairs uses the same rule with ``min(2, n)`` pairs; a flat list other than ``[st, ed]``
  is refused (P19).
- SVMR rows whose video is not the GT video are dropped before taking the top 100.
- ``match_number=False`` evaluates the queries shared by submission and GT; the others are
  counted and logged. With ``match_number=True`` any mismatch raises, naming examples.
- A GT video absent from ``video2idx`` makes the query a miss; such queries are counted and
  logged, never dropped.
- ``desc_type_ratio`` is ``"v X t Y vt Z"``, each ``str(round(100 * share, 2))`` (``45.1``,
  not ``45.10``), the shares of the queries scored for that task (all GT queries when
  ``match_number``); it is the last key of each ``{TASK}_by_type`` dict.
- Invalid data raises ``ValueError`` naming the task, ``desc_id`` and field: predictions with
  non-finite or negative times or ``ed < st``, GT spans with ``ed < st``, negative times or a
  start after the GT ``duration``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import Counter

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval.nms import temporal_iou_f32  # noqa: E402

LOGGER = logging.getLogger(__name__)
TASKS = ("VCMR", "SVMR", "VR")
KS = (1, 5, 10, 100)
MAX_PRED_PER_QUERY = 100
MULTI_GT_HITS = 2  # DiDeMo: correct when >= 2 annotator intervals reach the threshold
TYPE_ORDER = ("v", "t", "vt")


def _fail(msg):
    raise ValueError(msg)


def parse_gt_spans(gt: dict):
    """GT spans of one query as an (n, 2) float list, or None when it has no ``ts``."""
    ts = gt.get("ts")
    if ts is None:
        return None
    qid = gt.get("desc_id")
    if (isinstance(ts, (list, tuple)) and len(ts) == 2
            and all(isinstance(x, (int, float)) for x in ts)):
        spans = [list(ts)]
    elif (isinstance(ts, (list, tuple)) and ts
          and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ts)):
        spans = [list(p) for p in ts]
    else:
        _fail(f"GT desc_id {qid}: ts {ts!r} is neither [st, ed] nor a list of [st, ed] pairs "
              "(DiDeMo ts must stay a list of pairs, training.md P19)")
    duration = gt.get("duration")
    for st, ed in spans:
        if not (0 <= st <= ed) or (duration is not None and st > duration):
            _fail(f"GT desc_id {qid}: span [{st}, {ed}] lies outside the video "
                  f"(duration {duration})")
    return spans


def validate_gt(ground_truth, need_ts: bool, use_desc_type: bool) -> None:
    """Every GT item needs ``desc_id`` and ``vid_name`` (+ ``ts`` for moments, ``type``)."""
    required = ["desc_id", "vid_name"] + (["ts"] if need_ts else [])
    required += ["type"] if use_desc_type else []
    if not ground_truth:
        _fail("ground truth is empty")
    for n, gt in enumerate(ground_truth):
        missing = [k for k in required if gt.get(k) is None]
        if missing:
            _fail(f"GT item {n} (desc_id {gt.get('desc_id')}) lacks field(s) {missing}"
                  + ("; VCMR/SVMR need 'ts'" if "ts" in missing else "")
                  + ("; pass use_desc_type=False for GT without 'type'"
                     if "type" in missing else ""))


def _check_predictions(task: str, qid, preds) -> None:
    for row in preds[:MAX_PRED_PER_QUERY]:
        if len(row) < 3:
            _fail(f"{task} desc_id {qid}: prediction {row!r} is not [video_idx, st, ed, score]")
        st, ed = row[1], row[2]
        if not (math.isfinite(st) and math.isfinite(ed)) or st < 0 or ed < st:
            _fail(f"{task} desc_id {qid}: prediction {row!r} has timestamps outside the "
                  "video (need 0 <= st <= ed)")


def _match_ids(task, results, ground_truth, match_number):
    """Submission dicts by str(desc_id), and the GT items to evaluate."""
    by_id = {}
    for res in results:
        if "desc_id" not in res or "predictions" not in res:
            _fail(f"{task} submission entry lacks 'desc_id' or 'predictions': {str(res)[:200]}")
        by_id[str(res["desc_id"])] = res["predictions"]
    gt_ids = {str(g["desc_id"]) for g in ground_truth}
    unknown, absent = sorted(set(by_id) - gt_ids), sorted(gt_ids - set(by_id))
    if (unknown or absent) and match_number:
        _fail(f"{task}: submission and GT query ids differ: {len(unknown)} unknown query id(s) "
              f"in the submission (e.g. {unknown[:5]}), {len(absent)} GT query id(s) without "
              f"predictions (e.g. {absent[:5]}); pass match_number=False to score the overlap")
    if unknown or absent:
        LOGGER.warning("%s: scoring %d shared queries; %d submission-only and %d GT-only query "
                       "ids are not scored", task, len(gt_ids) - len(absent), len(unknown),
                       len(absent))
    return by_id, [g for g in ground_truth if str(g["desc_id"]) in by_id]


def _pred_arrays(task, by_id, gts, gt_vidx):
    """(N, 100) video indices (−1 = padding) and (N, 100, 2) float32 spans."""
    n = len(gts)
    vids = np.full((n, MAX_PRED_PER_QUERY), -1, dtype=np.int64)
    spans = np.zeros((n, MAX_PRED_PER_QUERY, 2), dtype=np.float32)
    for i, gt in enumerate(gts):
        preds = by_id[str(gt["desc_id"])]
        if task == "SVMR":
            preds = [p for p in preds if p[0] == gt_vidx[i]]
        preds = preds[:MAX_PRED_PER_QUERY]
        if task != "VR":
            _check_predictions(task, gt["desc_id"], preds)
        if preds:
            arr = np.asarray([p[:3] for p in preds], dtype=np.float64)
            vids[i, :len(preds)] = arr[:, 0].astype(np.int64)
            spans[i, :len(preds)] = arr[:, 1:3]
    return vids, spans


def _iou_f32(spans, gt):
    """Float32 IoU of (N, P, 2) predictions against (N, 2) GT spans -> (N, P)."""
    inter = np.maximum(np.float32(0), np.minimum(spans[..., 1], gt[:, None, 1])
                       - np.maximum(spans[..., 0], gt[:, None, 0]))
    hull = np.maximum(spans[..., 1], gt[:, None, 1]) - np.minimum(spans[..., 0], gt[:, None, 0])
    out = np.zeros(inter.shape, dtype=np.float32)
    np.divide(inter, hull, out=out, where=hull > 0)
    return out


def _correct_at_thd(vid_match, spans, gt_spans, thd):
    """(N, 100) bool: IoU × vid_match >= thd (≥ 2 GT pairs for multi-annotator GT)."""
    thd32 = np.float32(thd)
    out = np.zeros(vid_match.shape, dtype=bool)
    single = [i for i, g in enumerate(gt_spans) if len(g) == 1]
    if single:
        gt = np.asarray([gt_spans[i][0] for i in single], dtype=np.float32)
        out[single] = _iou_f32(spans[single], gt) * vid_match[single] >= thd32
    for i, g in enumerate(gt_spans):
        if len(g) > 1:
            hits = np.stack([temporal_iou_f32(spans[i], s) * vid_match[i] >= thd32 for s in g])
            out[i] = hits.sum(axis=0) >= min(MULTI_GT_HITS, len(g))
    return out


def _recall(correct, ks=KS):
    """Per K: (N,) bool, at least one correct prediction among the top K."""
    return {k: correct[:, :k].any(axis=1) for k in ks}


def _pct(count, total):
    return round(100 * count / total, 2) if total else 0.0


def _task_hits(task, by_id, gts, video2idx, iou_thds):
    """``{key_suffix: (N,) bool}``: '0.5-r1'... for moments, 'r1'... for VR."""
    gt_vidx = [video2idx.get(g["vid_name"], -1) for g in gts]
    vids, spans = _pred_arrays(task, by_id, gts, gt_vidx)
    gt_arr = np.asarray(gt_vidx, dtype=np.int64)[:, None]
    vid_match = (vids == gt_arr) & (vids >= 0) & (gt_arr >= 0)
    if task == "VR":
        return {f"r{k}": hit for k, hit in _recall(vid_match).items()}
    gt_spans = [parse_gt_spans(g) for g in gts]
    hits = {}
    for thd in iou_thds:
        correct = _correct_at_thd(vid_match, spans, gt_spans, thd)
        hits.update({f"{thd}-r{k}": hit for k, hit in _recall(correct).items()})
    return hits


def _by_type(hits, gts):
    """Per-type recalls, then ``desc_type_ratio`` of these queries (training.md §5.3)."""
    types = [g["type"] for g in gts]
    counts = Counter(types)
    order = [t for t in TYPE_ORDER if t in counts] + sorted(set(counts) - set(TYPE_ORDER))
    type_arr = np.asarray(types)
    out = {f"{t}-{key}": _pct(int(hit[type_arr == t].sum()), counts[t])
           for t in order for key, hit in hits.items()}
    out["desc_type_ratio"] = desc_type_ratio(gts)
    return out


def desc_type_ratio(ground_truth) -> str:
    """``"v 45.1 t 33.33 vt 21.57"``: upstream prints ``round(100 * share, 2)`` with str(),
    so trailing zeros are dropped (training.md §5.3)."""
    counts = Counter(g["type"] for g in ground_truth)
    n = len(ground_truth)
    return " ".join(f"{t} {round(100 * (counts.get(t, 0) / n), 2) if n else 0.0}"
                    for t in TYPE_ORDER)


def _report_absent_videos(ground_truth, video2idx):
    absent = [g["desc_id"] for g in ground_truth if g["vid_name"] not in video2idx]
    if absent:
        LOGGER.warning("%d of %d GT queries name a video absent from video2idx (e.g. desc_id "
                       "%s); they count as misses", len(absent), len(ground_truth), absent[:5])
    return len(absent)


def eval_retrieval(submission, ground_truth, iou_thds=(0.5, 0.7), verbose=True,
                   match_number=True, use_desc_type=True):
    """Metrics of every task present in ``submission`` (order VCMR, SVMR, VR)."""
    tasks = [t for t in TASKS if submission.get(t)]
    if not tasks:
        _fail(f"submission has none of the task lists {TASKS} (keys: {sorted(submission)})")
    if "video2idx" not in submission:
        _fail("submission lacks 'video2idx' (the video name -> index map of its predictions)")
    video2idx = submission["video2idx"]
    validate_gt(ground_truth, need_ts=any(t != "VR" for t in tasks), use_desc_type=use_desc_type)
    _report_absent_videos(ground_truth, video2idx)
    metrics = {}
    for task in tasks:
        by_id, gts = _match_ids(task, submission[task], ground_truth, match_number)
        hits = _task_hits(task, by_id, gts, video2idx, iou_thds)
        metrics[task] = {key: _pct(int(hit.sum()), len(gts)) for key, hit in hits.items()}
        if use_desc_type:
            metrics[f"{task}_by_type"] = _by_type(hits, gts)
        if verbose:
            LOGGER.info("%s (%d queries): %s", task, len(gts), json.dumps(metrics[task]))
    return metrics


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="TVR-style retrieval metrics")
    parser.add_argument("--submission_path", required=True, help="results JSON")
    parser.add_argument("--gt_path", required=True, help="ground-truth JSONL")
    parser.add_argument("--save_path", required=True, help="where to write the metrics JSON")
    parser.add_argument("--not_verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    """CLI: metrics of ``--submission_path`` against ``--gt_path`` written to ``--save_path``
    (IoU 0.5/0.7, ``use_desc_type=True``, training.md §5.3); returns the metrics dict."""
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if opts.not_verbose else logging.INFO)
    with open(opts.submission_path) as f:
        submission = json.load(f)
    ground_truth = load_jsonl(opts.gt_path)
    metrics = eval_retrieval(submission, ground_truth, iou_thds=(0.5, 0.7),
                             verbose=not opts.not_verbose, match_number=True,
                             use_desc_type=True)
    if not opts.not_verbose:
        print(json.dumps(metrics, indent=4))
    with open(opts.save_path, "w") as f:
        json.dump(metrics, f, indent=4)
    return metrics


eval_main = main  # upstream's name: ``eval_main()`` parses sys.argv


if __name__ == "__main__":
    eval_main()

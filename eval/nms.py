"""Temporal IoU and temporal NMS for moment retrieval (training.md §5.2).

IoU uses the hull as denominator: ``inter / (max(e1,e2) − min(s1,s2))``, 0 when the hull is 0
(the hull is the union whenever the spans overlap, and the IoU is 0 when they do not).

Decisions:
- :func:`temporal_iou_f32` (used by the metrics) computes in float32 as upstream's numpy code
  does (interface.md), so predictions sitting exactly on a threshold count the same way.
  :func:`temporal_nms` compares Python floats against the threshold; spans on the 1.5 s grid
  give the same decisions in both precisions.
- The post-processing functions return new per-query dicts and never mutate their input; the
  caller decides which list ends up in the saved file (upstream's in-place effect, P6, is
  reproduced in :mod:`eval.retrieval`).
"""
from __future__ import annotations

import numpy as np

MAX_AFTER_NMS = 100


def temporal_iou(span_a, span_b) -> float:
    """IoU of two ``[st, ed]`` spans (Python floats), hull as denominator."""
    inter = max(0.0, min(span_a[1], span_b[1]) - max(span_a[0], span_b[0]))
    hull = max(span_a[1], span_b[1]) - min(span_a[0], span_b[0])
    return inter / hull if hull > 0 else 0.0


def temporal_iou_f32(preds, gt) -> np.ndarray:
    """IoU in float32 of spans ``preds`` (N, 2) against one span ``gt`` (2,) -> (N,)."""
    preds = np.asarray(preds, dtype=np.float32).reshape(-1, 2)
    gt = np.asarray(gt, dtype=np.float32)
    inter = np.maximum(np.float32(0), np.minimum(preds[:, 1], gt[1])
                       - np.maximum(preds[:, 0], gt[0]))
    hull = np.maximum(preds[:, 1], gt[1]) - np.minimum(preds[:, 0], gt[0])
    out = np.zeros(len(preds), dtype=np.float32)
    np.divide(inter, hull, out=out, where=hull > 0)
    return out


def temporal_nms(predictions, nms_threshold: float, max_after_nms: int = MAX_AFTER_NMS):
    """NMS of ``[st, ed, score, ...]`` rows exactly as §5.2.

    A single row is returned unchanged. Otherwise rows are sorted by score (stable, descending);
    while more than one candidate remains and fewer than ``max_after_nms`` are kept, the best
    is kept and every remaining row with IoU **strictly above** the threshold is removed; a last
    lone candidate is kept if there is room.
    """
    if len(predictions) <= 1:
        return list(predictions)
    remaining = sorted(predictions, key=lambda p: p[2], reverse=True)
    kept = []
    while len(remaining) > 1 and len(kept) < max_after_nms:
        best = remaining[0]
        remaining = [p for p in remaining[1:]
                     if temporal_iou(best[:2], p[:2]) <= nms_threshold]
        kept.append(best)
    if len(remaining) == 1 and len(kept) < max_after_nms:
        kept.append(remaining[0])
    return kept


def nms_vcmr_predictions(predictions, nms_threshold: float, max_before_nms: int,
                         max_after_nms: int = MAX_AFTER_NMS):
    """VCMR: NMS inside each video (groups in order of first appearance), then a stable sort
    of all survivors by score, descending, cut to ``max_after_nms``.

    Rows are ``[video_idx, st, ed, score]``.
    """
    groups: dict = {}
    for pred in predictions[:max_before_nms]:
        groups.setdefault(pred[0], []).append(pred[1:])
    merged = []
    for vid_idx, rows in groups.items():
        merged += [[vid_idx, *row] for row in temporal_nms(rows, nms_threshold, max_after_nms)]
    return sorted(merged, key=lambda p: p[3], reverse=True)[:max_after_nms]


def nms_svmr_predictions(predictions, nms_threshold: float, max_before_nms: int,
                         max_after_nms: int = MAX_AFTER_NMS):
    """SVMR: NMS over the (single-video) list; the video index is put back in front."""
    rows = predictions[:max_before_nms]
    if not rows:
        return []
    vid_idx = rows[0][0]
    kept = temporal_nms([p[1:] for p in rows], nms_threshold, max_after_nms)
    return [[vid_idx, *row] for row in kept[:max_after_nms]]


def post_process_nms(results, task: str, nms_threshold: float, max_before_nms: int,
                     max_after_nms: int = MAX_AFTER_NMS):
    """NMS every query dict of a ``VCMR`` or ``SVMR`` list; returns new dicts."""
    if task == "VCMR":
        fn = nms_vcmr_predictions
    elif task == "SVMR":
        fn = nms_svmr_predictions
    else:
        raise ValueError(f"NMS applies to VCMR and SVMR only, got task {task!r}")
    return [{**res, "predictions": fn(res["predictions"], nms_threshold, max_before_nms,
                                      max_after_nms)}
            for res in results]

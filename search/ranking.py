"""One query through eval_vcmr.py's own ranking code (issue 19: reuse, not re-implement).

:func:`eval.retrieval.run_queries` does steps B-C (query encoding, video scores with
``exp(q2c_alpha·s)``, top ``max_vcmr_video`` videos, span window, ``max_before_nms``) on a
one-batch "loader"; then :func:`finish` applies step D (cut to ``max_after_nms``) and the NMS
of ``finish_vcmr`` (``nms_thd``; -1 = off), exactly as eval_vcmr.py writes its VCMR list.
"""
from __future__ import annotations

import torch

from eval.common import eval_mode
from eval.nms import post_process_nms
from eval.retrieval import FullEvalSetting, _truncate, run_queries


class CachedFrameNorm:
    """The model, with the corpus frames' normalisation of ``get_video_scores`` done once.

    ``get_video_scores`` normalises every frame representation of the corpus on every call:
    for 1,000 videos x 100 frames that was ~60% of a CPU query. The proxy computes
    ``normalize(frames)`` once and then calls the model's own :func:`model.vsm.video_scores`,
    so the scores are bit-identical to eval_vcmr.py's (same function, same tensor). Any other
    attribute is the model's.
    """

    def __init__(self, model, frames):
        from model.vsm import normalize

        self._model, self._frames = model, frames
        with torch.no_grad():
            self._frames_norm = normalize(frames)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_video_scores(self, query, frame_embeddings, c_attn_masks, gather=False):
        from model.vsm import normalize, video_scores

        if frame_embeddings is not self._frames or gather:
            return self._model.get_video_scores(query, frame_embeddings, c_attn_masks, gather)
        return video_scores(normalize(query), self._frames_norm, c_attn_masks)


def setting_of(hps: dict, video_batch_size: int = 50) -> FullEvalSetting:
    """The eval setting of ``vcmr_setting`` from the hps stored in the index (VCMR + VR: VCMR
    is only computed together with VR, as in eval_vcmr.py)."""
    return FullEvalSetting(
        tasks=("VCMR", "VR"), k_videos=int(hps["max_vcmr_video"]),
        video_batch_size=video_batch_size, vfeat_interval=float(hps["vfeat_interval"]),
        max_clip_len=int(hps["max_clip_len"]), alpha=float(hps["q2c_alpha"]),
        min_l=int(hps["min_pred_l"]), max_l=int(hps["max_pred_l"]),
        max_before_nms=int(hps["max_before_nms"]), max_after_nms=int(hps["max_after_nms"]),
        nms_thd=float(hps["nms_thd"]))


def finish(vcmr_list: list, setting: FullEvalSetting) -> list:
    """Steps D and F of ``finish_vcmr`` on a VCMR list: truncation, then NMS when on."""
    rows = _truncate({"VCMR": vcmr_list}, setting.max_after_nms).get("VCMR", [])
    if rows and setting.nms_thd != -1:
        rows = post_process_nms(rows, "VCMR", setting.nms_thd, setting.max_before_nms,
                                setting.max_after_nms)
    return rows


@torch.no_grad()
def vcmr_predictions(index, batch) -> list:
    """``[[video_row, st_s, ed_s, score], ...]`` of the single query in ``batch``, best first;
    ``video_row`` indexes ``index.vids`` (the index's video2idx is the sorted order)."""
    setting = setting_of(index.hps)
    with eval_mode(index.model):
        col = run_queries(index.scorer, [batch], index.frames, index.masks, index.vids,
                          index.video2idx, setting)
    rows = finish(col.lists.get("VCMR", []), setting)
    return rows[0]["predictions"] if rows else []

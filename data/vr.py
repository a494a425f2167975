"""Video retrieval datasets: MSR-VTT (data.md §9.2; training.md §5.6).

VCMR's classes with three differences: the video index always comes from ``id2nframe.json``
(sorted names, restricted to the split's ``video_ids``), targets are always ``[-1, -1]`` (the
record's ``target`` is never read) and the query DB is ``MsrvttQueryTokLmdb``. The collates are
VCMR's.
"""
from __future__ import annotations

from .vcmr import (
    NO_TARGET,
    VcmrDataset,
    VcmrEvalDataset,
    VcmrFullEvalDataset,
    VideoCorpusDataset,
    require_video_only,
    vcmr_collate,
    vcmr_eval_collate,
    vcmr_full_eval_collate,
    video_corpus_collate,
    video_index,
)

vr_collate = vcmr_collate
vr_eval_collate = vcmr_eval_collate
vr_full_eval_collate = vcmr_full_eval_collate
vr_video_corpus_collate = video_corpus_collate

__all__ = [
    "VideoCorpusDataset", "VrDataset", "VrEvalDataset", "VrFullEvalDataset",
    "VrVideoOnlyDataset", "VrVideoOnlyEvalDataset", "VrVideoOnlyFullEvalDataset",
    "vr_collate", "vr_eval_collate", "vr_full_eval_collate", "vr_video_corpus_collate",
]


class _VrMixin:
    """Overrides shared by every VR dataset."""

    def _video_index(self):
        return video_index(self.video_ids, self.video_db, use_sub_index=False)

    def get_target(self, qid, example, num_frames):
        return NO_TARGET


class VrDataset(_VrMixin, VcmrDataset):
    """MSR-VTT training/loss-validation set, one query per item."""


class VrEvalDataset(_VrMixin, VcmrEvalDataset):
    """MSR-VTT loss-validation set; items carry their ``qids``."""


class VrFullEvalDataset(_VrMixin, VcmrFullEvalDataset):
    """MSR-VTT full-evaluation queries (sharded only if ``distributed``)."""


class VrVideoOnlyDataset(VrDataset):
    """MSR-VTT video-only training set over a :class:`~data.data.VideoFeatDataset`."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)


class VrVideoOnlyEvalDataset(VrEvalDataset):
    """MSR-VTT video-only loss-validation set."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)


class VrVideoOnlyFullEvalDataset(VrFullEvalDataset):
    """MSR-VTT video-only full-evaluation queries."""

    def __init__(self, video_ids, video_db, *args, **kwargs):
        require_video_only(video_db, type(self).__name__)
        super().__init__(video_ids, video_db, *args, **kwargs)

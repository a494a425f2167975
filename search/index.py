"""The moment index and its query side: :class:`MomentIndex`, :class:`Moment` (issue 19).

An index is a folder written by :mod:`search.build` (``scripts/build_index.py``)::

    INDEX/index.json       what a query needs besides tensors: the model run and checkpoint
                           identity, the VCMR hps, the tokenizer, one entry per video
                           (file path, frames, duration, shard), and the build settings
    INDEX/subtitles.json   {video: [[start_s, end_s, text], ...]} (absent for video-only)
    INDEX/shards/*.pt      encoded videos, one file per encoding batch: {"vids", "frames"
                           (b, L_b, D), "masks" (b, L_b)}

Why shards of whole encoding batches: the start/end convolution of the model sees up to two
frames past a video's end, and eval_vcmr.py feeds it the encoder's outputs for the padded
positions of the video's batch, then zeros (training.md P5). Keeping each batch's padded rows
and padding with zeros at load time reproduces eval_vcmr.py's corpus tensor exactly when the
batches are the same (a collection built in one go with the same video batch size), so the
index ranks the moments eval_vcmr.py ranks. Videos added later are encoded in their own batches.

A query runs the evaluation code itself: :func:`eval.retrieval.run_queries` (query encoding,
``exp(q2c_alpha·s)``, top ``max_vcmr_video`` videos, span window ``[min_pred_l, max_pred_l)``,
``max_before_nms``) on a one-query batch, then the steps D-F of ``finish_vcmr`` that apply
without ground truth *and* the NMS that eval_vcmr.py applies to splits with ground truth
(``nms_thd``, on the top ``max_after_nms`` list), since a person reading the results wants
distinct moments.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import HeroError

LOGGER = logging.getLogger(__name__)
FORMAT = 1
INDEX_FILE = "index.json"
SUBS_FILE = "subtitles.json"
SHARD_DIR = "shards"
# hps a query needs (eval/retrieval_cli.py HPS_KEYS["vcmr"] plus the window/NMS settings)
HPS_KEYS = ("vfeat_interval", "max_clip_len", "q2c_alpha", "max_vcmr_video", "min_pred_l",
            "max_pred_l", "max_before_nms", "max_after_nms", "nms_thd", "lw_neg_ctx",
            "lw_neg_q")


class SearchIndexError(HeroError):
    """An index folder is missing, incomplete, or does not fit the model or flags given."""


@dataclass
class Moment:
    """One retrieved moment: ``video`` (its name in the index), ``path`` (the source file when
    built from ``--videos``, else None), ``start``/``end`` in seconds, ``score`` (the VCMR
    score of eval_vcmr.py) and ``rank`` (1 = best)."""

    video: str
    path: str | None
    start: float
    end: float
    score: float
    rank: int


def read_index_json(folder) -> dict:
    """``INDEX/index.json`` as a dict; a missing or foreign file names the folder."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise SearchIndexError(f"{folder} is not a moment index (no {INDEX_FILE}); build one "
                               "with `python scripts/build_index.py ... --out "
                               f"{folder}`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SearchIndexError(f"{path} is not valid JSON ({exc}); rebuild the index") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SearchIndexError(f"{path} is not a format-{FORMAT} moment index; rebuild it with "
                               "scripts/build_index.py")
    return meta


def load_shards(folder, meta) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The corpus tensor of eval_vcmr.py: rows in sorted video order, each batch's padded
    rows kept, zeros past them; trimmed to the longest batch. Returns (frames, masks, vids)."""
    rows = {}
    for shard in dict.fromkeys(v["shard"] for v in meta["videos"].values()):
        path = Path(folder) / shard
        if not path.is_file():
            raise SearchIndexError(f"{path} is missing: the index {folder} is incomplete; "
                                   "rerun scripts/build_index.py with the same --out to resume")
        data = torch.load(path, map_location="cpu", weights_only=True)
        for n, vid in enumerate(data["vids"]):
            rows[vid] = (data["frames"][n], data["masks"][n])
    vids = sorted(meta["videos"])
    missing = [v for v in vids if v not in rows]
    if missing:
        raise SearchIndexError(f"{folder}: {len(missing)} video(s) of {INDEX_FILE} are in no "
                               f"shard (e.g. {missing[:3]}); rebuild the index")
    if not vids:
        raise SearchIndexError(f"{folder} holds no video; build it with scripts/build_index.py")
    max_len = max(rows[v][0].size(0) for v in vids)
    dim = rows[vids[0]][0].size(1)
    frames = torch.zeros(len(vids), max_len, dim, dtype=rows[vids[0]][0].dtype)
    masks = torch.zeros(len(vids), max_len, dtype=rows[vids[0]][1].dtype)
    for n, vid in enumerate(vids):
        f, m = rows[vid]
        frames[n, :f.size(0)] = f
        masks[n, :m.size(0)] = m
    return frames, masks, vids


class MomentIndex:
    """A searchable collection: the fine-tuned model, the encoded videos and the settings.

    Build one with ``scripts/build_index.py``, open it with :meth:`load`. ``frame_interval``
    is the seconds per feature frame (``vfeat_interval`` of the run).
    """

    def __init__(self, model, frames, masks, vids, meta, toker, subtitles=None, device="cpu"):
        """Use :meth:`load`; the constructor takes the pieces directly so benchmarks and tests
        can search a synthetic collection without writing one to disk."""
        self.model = model
        self.frames, self.masks, self.vids = frames, masks, list(vids)
        self.meta = meta
        self.toker = toker
        self._subtitles = subtitles or {}
        self.device = torch.device(device)
        self.hps = dict(meta["hps"])
        self.frame_interval = float(self.hps["vfeat_interval"])
        self.video2idx = {v: i for i, v in enumerate(self.vids)}
        self._cls = int(meta["cls_id"])
        from search.ranking import CachedFrameNorm

        self.scorer = CachedFrameNorm(model, frames)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, device=None) -> MomentIndex:
        """Open the index folder ``path``: model from the recorded run and checkpoint (which
        must still be the one the index was built with), tensors from the shards."""
        from search.model_io import load_index_model

        meta = read_index_json(path)
        model, toker, device = load_index_model(meta, path, device)
        frames, masks, vids = load_shards(path, meta)
        subs_path = Path(path) / SUBS_FILE
        subtitles = json.loads(subs_path.read_text()) if subs_path.is_file() else {}
        return cls(model, frames.to(device), masks.to(device), vids, meta, toker, subtitles,
                   device)

    # ------------------------------------------------------------------ queries
    def videos(self) -> list[str]:
        """Names of the indexed videos, sorted (the corpus order of eval_vcmr.py)."""
        return list(self.vids)

    def video_path(self, video: str) -> str | None:
        """The source video file of ``video`` (None when built from existing DBs)."""
        entry = self.meta["videos"].get(video)
        if entry is None:
            raise SearchIndexError(f"video {video!r} is not in the index")
        return entry.get("path")

    def subtitles(self, video: str, start: float, end: float) -> list[str]:
        """Subtitle lines of ``video`` overlapping ``[start, end]`` seconds ([] for video-only
        indexes or videos without subtitles)."""
        return [text for st, ed, text in self._subtitles.get(video, [])
                if st < end and ed > start]

    def tokenize(self, query: str) -> list[int]:
        """``[CLS] + tokens`` as prepro_query.py and the query datasets make them."""
        from utils.tokenizer import roberta_tokenize

        ids = roberta_tokenize(self.toker, query)
        if not ids:
            raise SearchIndexError(f"query {query!r} has no token: type some words")
        return [self._cls] + ids

    def query_batch(self, query: str) -> dict:
        """A one-query batch as :func:`data.vcmr.vcmr_full_eval_collate` makes it (no GT)."""
        from data.vcmr import vcmr_full_eval_collate

        ids = torch.tensor(self.tokenize(query), dtype=torch.long)
        item = (ids, torch.ones(len(ids), dtype=torch.long), -1,
                torch.tensor([-1, -1], dtype=torch.long))
        return vcmr_full_eval_collate([("query", [item])])

    def search(self, query: str, top_k: int = 10) -> list[Moment]:
        """The top ``top_k`` moments for ``query``, best first, by eval_vcmr.py's procedure."""
        from search.ranking import vcmr_predictions

        if top_k < 1:
            raise SearchIndexError(f"top_k must be >= 1, got {top_k}")
        preds = vcmr_predictions(self, self.query_batch(query))
        out = []
        for rank, (vidx, st, ed, score) in enumerate(preds[:top_k], 1):
            vid = self.vids[vidx]
            out.append(Moment(video=vid, path=self.meta["videos"][vid].get("path"),
                              start=float(st), end=float(ed), score=float(score), rank=rank))
        return out

    def __len__(self) -> int:
        return len(self.vids)

    def __repr__(self) -> str:
        return (f"MomentIndex({len(self.vids)} videos, checkpoint "
                f"{os.path.basename(self.meta['checkpoint']['path'])})")

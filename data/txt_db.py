"""Runtime wrappers of the text LMDBs (data.md §3, §6.1-§6.2).

Constructors take upstream's positional arguments and expose upstream's attribute names. The
LMDB itself is opened lazily per process (see ``data.db.LazyLmdb``), so every wrapper is safe to
use after a fork and picklable.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os

import torch
from tqdm import tqdm

from data.db import TXT_MAX_READERS, LazyLmdb, StorageError, read_json, read_jsonl

LOGGER = logging.getLogger(__name__)
META_KEYS = ("CLS", "EOS", "PAD", "BOS", "SEP", "MASK", "v_range")
SUB_FIELDS = ("unique_sub2frames", "unmatched_frames")


def _load_meta(meta_path: str, keys) -> dict:
    meta = read_json(meta_path, "meta.json")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise KeyError(f"{meta_path} lacks the tokenizer key(s) {missing}")
    return meta


def _txt_len(length) -> int:
    """TVQA stores ``[len_q, len_a0..a4]``: its length is ``len_q + max(len_a*)``."""
    if isinstance(length, list):
        return length[0] + max(length[1:])
    return length


def _inverse(query2video: dict) -> dict:
    video2query = {}
    for qid, vid in query2video.items():
        video2query.setdefault(vid, []).append(qid)
    return video2query


class TxtTokLmdb:
    """Any text DB except TVC: decoded records by id, special ids from ``meta.json``.

    ``max_txt_len != -1`` *drops* ids longer than it (a filter, not a truncation, as upstream);
    the number dropped is logged once, and a filter that keeps nothing is a StorageError. The
    order of ``id2len`` is the dataset order. Where ``id2len`` is the item list
    (``items_from_id2len``: the query DBs), a missing or empty ``id2len.json`` is a StorageError
    too: it would otherwise give an empty dataset (issue 13: StopIteration in training, 0
    queries scored in evaluation).
    """

    items_from_id2len = False

    def __init__(self, db_dir, max_txt_len=-1):
        self.db_dir = db_dir
        self.max_txt_len = max_txt_len
        self.db = LazyLmdb(db_dir, TXT_MAX_READERS)
        meta = _load_meta(os.path.join(db_dir, "meta.json"), META_KEYS)
        self.cls_ = meta["CLS"]
        self.sep = meta["SEP"]
        self.mask = meta["MASK"]
        self.bos = meta["BOS"]
        self.eos = meta["EOS"]
        self.pad = meta["PAD"]
        self.unk = meta.get("UNK")
        self.v_range = meta["v_range"]
        self.id2len = self._load_id2len()

    def _load_id2len(self) -> dict:
        path = os.path.join(self.db_dir, "id2len.json")
        id2len = read_json(path) if os.path.isfile(path) else {}
        if not isinstance(id2len, dict):
            raise StorageError(f"{path} is not a JSON object {{id: length}}: rebuild the DB "
                               f"with its prepro script")
        if not id2len and self.items_from_id2len:
            state = "empty" if os.path.isfile(path) else "missing"
            raise StorageError(f"{path} is {state}, so the query DB {self.db_dir} has no items: "
                               f"re-copy the DB folder with its side files, or rebuild it with "
                               f"its prepro script")
        if self.max_txt_len == -1 or not id2len:
            return id2len
        kept = {k: n for k, n in id2len.items() if _txt_len(n) <= self.max_txt_len}
        if not kept:
            what = "query" if self.items_from_id2len else "item"
            raise StorageError(f"no {what} in {self.db_dir} is at most max_txt_len="
                               f"{self.max_txt_len} tokens (0 of {len(id2len)} kept; lengths "
                               f"from {path}): raise max_txt_len (config key or --max_txt_len)")
        if len(kept) < len(id2len):
            LOGGER.info("%s: dropped %d of %d items longer than max_txt_len=%d",
                        self.db_dir, len(id2len) - len(kept), len(id2len), self.max_txt_len)
        return kept

    @property
    def ids(self) -> list:
        return list(self.id2len)

    def __getitem__(self, id_):
        return self.db.get_txt(str(id_))

    def __contains__(self, id_) -> bool:
        return self.db.get(str(id_)) is not None


class QueryTokLmdb(TxtTokLmdb):
    """TVR/DiDeMo queries: optional ``query2video.json`` and ``query_data.jsonl``."""

    items_from_id2len = True

    def __init__(self, db_dir, max_txt_len=-1):
        super().__init__(db_dir, max_txt_len)
        q2v_path = os.path.join(db_dir, "query2video.json")
        self.query2video = read_json(q2v_path) if os.path.isfile(q2v_path) else {}
        self.video2query = _inverse(self.query2video)
        self.query_data = self._load_query_data()

    def _query_key(self, line: dict) -> str:
        return str(line["desc_id"])

    def _load_query_data(self) -> dict:
        path = os.path.join(self.db_dir, "query_data.jsonl")
        if not os.path.isfile(path):
            return {}
        data = {}
        for n, line in enumerate(read_jsonl(path)):
            try:
                data[self._query_key(line)] = line
            except KeyError as exc:
                raise KeyError(f"{path} line {n + 1} lacks the id field {exc}") from exc
        return data


class QaQueryTokLmdb(TxtTokLmdb):
    """TVQA/VIOLIN: ``query2video.json`` is mandatory; no query_data."""

    items_from_id2len = True

    def __init__(self, db_dir, max_txt_len=-1):
        super().__init__(db_dir, max_txt_len)
        self.query2video = read_json(os.path.join(db_dir, "query2video.json"),
                                     "query2video.json")
        self.video2query = _inverse(self.query2video)


class VrQueryTokLmdb(QueryTokLmdb):
    """MSR-VTT: ``query_data`` keyed by ``sen_id``, or ``retrieval_key`` when a line lacks it."""

    def _query_key(self, line: dict) -> str:
        if "sen_id" in line:
            return str(line["sen_id"])
        return str(line["retrieval_key"])


MsrvttQueryTokLmdb = VrQueryTokLmdb


class CaptionTokLmdb:
    """TVC: ``cap.db`` (captions) and ``clip.db`` (clips) under one folder with ``meta.json``.

    Side files are re-read from disk on every property access, as upstream does. A caption's
    ``input_ids`` become ``[BOS] + tokens`` and ``tgt_ids`` ``tokens + [EOS]``, each truncated
    to ``max_txt_len`` independently (so a long target loses its EOS; upstream quirk).
    """

    def __init__(self, db_dir, max_txt_len=-1):
        self.db_dir = db_dir
        self.max_txt_len = max_txt_len
        self.cap_dir = os.path.join(db_dir, "cap.db")
        self.clip_dir = os.path.join(db_dir, "clip.db")
        self.cap_db = LazyLmdb(self.cap_dir, TXT_MAX_READERS)
        self.clip_db = LazyLmdb(self.clip_dir, TXT_MAX_READERS)
        meta = _load_meta(os.path.join(db_dir, "meta.json"), ("PAD", "BOS", "EOS"))
        self.pad = meta["PAD"]
        self.bos = meta["BOS"]
        self.eos = meta["EOS"]
        id2len_path = os.path.join(self.cap_dir, "id2len.json")
        self.id2len = read_json(id2len_path) if os.path.isfile(id2len_path) else {}

    def _truncate(self, ids: list) -> list:
        return ids if self.max_txt_len == -1 else ids[:self.max_txt_len]

    def __getitem__(self, id_):
        rec = self.cap_db.get_txt(str(id_))
        tokens = rec["input_ids"]
        rec["input_ids"] = torch.tensor(self._truncate([self.bos] + tokens), dtype=torch.long)
        rec["tgt_ids"] = torch.tensor(self._truncate(tokens + [self.eos]), dtype=torch.long)
        return rec

    def get_clip(self, clip_id):
        """The decoded ``clip.db`` record (``vid_name``, ``ts``, ``captions``, ...)."""
        return self.clip_db.get_txt(str(clip_id))

    @property
    def cap2vid(self) -> dict:
        return read_json(os.path.join(self.cap_dir, "cap2vid.json"), "cap2vid.json")

    @property
    def vid2caps(self) -> dict:
        return read_json(os.path.join(self.cap_dir, "vid2caps.json"), "vid2caps.json")

    @property
    def clip2vid(self) -> dict:
        return read_json(os.path.join(self.clip_dir, "clip2vid.json"), "clip2vid.json")

    @property
    def vid2clips(self) -> dict:
        return read_json(os.path.join(self.clip_dir, "vid2clips.json"), "vid2clips.json")


def _truncate_pairs(pairs: list, max_clip_len: int) -> list:
    """Keep a prefix of subtitles whose frames fall below ``max_clip_len`` (data.md §6.2).

    A pair survives if it keeps a frame, or if it never had one; the walk stops after the first
    subtitle with a frame >= max_clip_len, so kept indices stay contiguous from 0 (the model
    scatters segment rows by sub index). Kept pairs are ``(sub_idx, frames)`` tuples; with
    ``max_clip_len == -1`` the raw ``[sub_idx, frames]`` lists are returned untouched, as upstream.
    """
    if max_clip_len == -1:
        return pairs
    kept = []
    for i, frames in pairs:
        if not frames or max(frames) < max_clip_len:
            kept.append((i, frames))
            continue
        in_range = [f for f in frames if f < max_clip_len]
        if in_range or not frames:
            kept.append((i, in_range))
        if len(in_range) < len(frames):
            break
    return kept


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC while millions of small acyclic lists are built.

    Otherwise repeated full collections over the growing mapping make the scan several times
    slower; nothing created here can form a cycle, so nothing is leaked.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class SubTokLmdb(TxtTokLmdb):
    """Subtitle DB: reads every record once at construction to truncate to ``max_clip_len``.

    ``id2len`` comes from ``vid2len.json`` and is capped at ``max_clip_len`` (with -1 it becomes
    -1 and ``vid2vonly_frames`` is emptied: upstream's broken -1 path, reproduced).
    """

    def __init__(self, db_dir, max_clip_len=-1):
        super().__init__(db_dir, -1)
        self.max_clip_len = max_clip_len
        self.vid2max_len = read_json(os.path.join(db_dir, "vid2max_frame_sub_len.json"),
                                     "vid2max_frame_sub_len.json")
        self.id2len = read_json(os.path.join(db_dir, "vid2len.json"), "vid2len.json")
        self.vid2dur, self.vid2idx = self._load_vid2dur_idx()
        self.vid_sub2frame, self.vid2vonly_frames = self._compute_sub2frames(max_clip_len)
        self.id2len = {vid: min(n, max_clip_len) for vid, n in self.id2len.items()}

    def _load_vid2dur_idx(self):
        path = os.path.join(self.db_dir, "vid2dur_idx.json")
        if not os.path.isfile(path):
            return {}, {}
        vid2dur, vid2idx = {}, {}
        for split, videos in read_json(path).items():
            vid2dur[split] = [{"vid_name": v, "duration": d} for v, (d, _) in videos.items()]
            vid2idx[split] = {v: idx for v, (_, idx) in videos.items()}
        return vid2dur, vid2idx

    def _compute_sub2frames(self, max_clip_len: int):
        """One pass over every record in ``vid2len.json`` order, inside the reader's single
        read transaction, decoding only the two mapping fields with the GC paused: a few
        seconds for ~20k TV videos (a full decode with the GC on took 3-4x longer)."""
        vid_sub2frame, vid2vonly = {}, {}
        with _gc_paused():
            for vid in tqdm(self.id2len, desc=f"reading {os.path.basename(self.db_dir)}"):
                rec = self.db.get_fields(vid, SUB_FIELDS)
                vid_sub2frame[vid] = _truncate_pairs(rec["unique_sub2frames"], max_clip_len)
                vid2vonly[vid] = [f for f in rec["unmatched_frames"] if f < max_clip_len]
        return vid_sub2frame, vid2vonly


class VrSubTokLmdb(SubTokLmdb):
    """MSR-VTT subtitles: no truncation (computed with -1), then ``max_clip_len`` restored.

    ``id2len`` is re-read from ``vid2len.json`` and ``vid2dur``/``vid2idx`` are empty.
    """

    def __init__(self, db_dir, max_clip_len=-1):
        super().__init__(db_dir, -1)
        self.max_clip_len = max_clip_len
        self.id2len = read_json(os.path.join(db_dir, "vid2len.json"), "vid2len.json")
        self.vid2dur = {}
        self.vid2idx = {}

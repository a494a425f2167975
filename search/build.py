"""Build or extend a moment index (``scripts/build_index.py``, issue 19).

Two sources:

* ``--video_db DB [--sub_txt_db DB]``: databases that already exist (as released, or built by
  the prepro scripts); without ``--sub_txt_db`` the index is video-only (DiDeMo video-only
  models);
* ``--videos DIR [--subtitles DIR]``: video files; :mod:`search.from_videos` runs the project's
  own feature extraction and preprocessing into ``OUT/work/`` first, then continues as above.

Every video is encoded once with the model exactly as eval_vcmr.py encodes its corpus
(:func:`eval.retrieval.encode_corpus`, sorted names, ``--video_batch_size`` videos per batch,
one shard file per batch). The build is resumable and incremental: ``index.json`` is rewritten
(atomically) after every shard, and a rerun encodes only the videos it does not list yet. The
index records its checkpoint and refuses to mix in another one.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from eval.common import write_json_atomic
from eval.retrieval import encode_corpus
from eval.retrieval_cli import DATA_DEFAULTS
from search.index import FORMAT, INDEX_FILE, SHARD_DIR, SUBS_FILE, SearchIndexError
from search.model_io import build_model, check_same_checkpoint, checkpoint_identity, index_hps
from search.ranking import setting_of
from utils.save import atomic_write_text

LOGGER = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="build or extend a moment-search index")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", help="folder of video files (mp4/mkv/webm/avi/mov, recursive)")
    src.add_argument("--video_db", help="existing video feature DB (e.g. video_db/tv)")
    p.add_argument("--subtitles", help="with --videos: folder of <video name>.srt files")
    p.add_argument("--sub_txt_db", help="with --video_db: existing subtitle DB")
    p.add_argument("--video_ids", help="JSON list of the video names to index (default: all)")
    p.add_argument("--model_dir", required=True, help="fine-tuned TVR/How2R/DiDeMo run folder")
    p.add_argument("--ckpt", required=True, help="checkpoint step of --model_dir, or a file")
    p.add_argument("--out", required=True, help="index folder (created, or extended)")
    p.add_argument("--toker", default=None, help="RoBERTa tokenizer (default: the subtitle "
                   "DB's, else roberta-base)")
    p.add_argument("--video_batch_size", type=int, default=None,
                   help="videos per encoding batch (default: the run's "
                   "vcmr_eval_video_batch_size, else 50)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--resnet_ckpt", help="with --videos: torchvision resnet152 .pth")
    p.add_argument("--slowfast_ckpt", help="with --videos: pytorchvideo SLOWFAST_8x8_R50.pyth")
    p.add_argument("--random_weights", action="store_true",
                   help="with --videos: random feature extractors (smoke tests only)")
    p.add_argument("--tiny", action="store_true", help="with --random_weights: tiny networks")
    p.add_argument("--frame_size", type=int, default=None,
                   help="with --videos: extraction frame size (default 224)")
    return p


def check_flags(opts) -> None:
    if opts.subtitles and not opts.videos:
        raise SearchIndexError("--subtitles goes with --videos; with --video_db pass "
                               "--sub_txt_db")
    if opts.sub_txt_db and not opts.video_db:
        raise SearchIndexError("--sub_txt_db goes with --video_db; with --videos pass "
                               "--subtitles DIR_OF_SRT")
    for flag in ("videos", "subtitles", "video_db", "sub_txt_db", "model_dir", "video_ids"):
        value = getattr(opts, flag)
        if value and not os.path.exists(value):
            raise SearchIndexError(f"--{flag} {value}: no such file or folder")


# --------------------------------------------------------------------------- sources
def _db_toker(db_dir) -> str | None:
    path = os.path.join(str(db_dir), "meta.json")
    if not os.path.isfile(path):
        return None
    from data.db import read_json

    meta = read_json(path, "meta.json")
    return meta.get("toker") or meta.get("tokenizer")


def toker_of(opts, hps) -> str:
    """--toker, else the tokenizer of the subtitle DB, else the one the run's query DBs were
    built with (what the model was trained on), else roberta-base."""
    if opts.toker:
        return opts.toker
    for db in (opts.sub_txt_db, getattr(hps, "train_query_txt_db", None),
               getattr(hps, "val_query_txt_db", None)):
        found = _db_toker(db) if db else None
        if found:
            return found
    return "roberta-base"


def open_video_db(opts, hps, model, toker_meta):
    """The eval_vcmr.py video dataset of the sources (video + subtitles, or video only)."""
    from data.data import load_video_only_dataset, load_video_sub_dataset

    data_opts = SimpleNamespace(**{**DATA_DEFAULTS, **vars(hps)})
    data_opts.vfeat_dim = model.v_encoder.f_encoder.img_embeddings.img_linear.in_features
    if opts.sub_txt_db:
        return load_video_sub_dataset(opts.video_db, opts.sub_txt_db, hps.vfeat_interval,
                                      data_opts)
    return load_video_only_dataset(opts.video_db, toker_meta, hps.vfeat_interval, data_opts)


def collection(opts, video_db) -> list:
    """Names to index: ``--video_ids`` or every video the DBs hold, checked present."""
    names = sorted(video_db.img_db.name2nframe)
    if video_db.txt_db is not None:
        names = [v for v in names if v in video_db]
    if not opts.video_ids:
        return names
    from data.db import read_json

    wanted = read_json(opts.video_ids, "--video_ids")
    missing = [v for v in wanted if v not in video_db]
    if missing:
        raise SearchIndexError(f"--video_ids {opts.video_ids}: {len(missing)} video(s) are not "
                               f"in the DBs (e.g. {missing[:3]})")
    return sorted(set(wanted))


def subtitle_lines(video_db, vids) -> dict:
    """``{vid: [[start, end, text], ...]}`` from the subtitle DB records' raw ``sub`` field."""
    if video_db.txt_db is None:
        return {}
    out = {}
    for vid in vids:
        subs = video_db.txt_db[vid].get("sub") or []
        out[vid] = [[float(s["start"]), float(s["end"]), str(s["text"])] for s in subs]
    return out


# --------------------------------------------------------------------------- index state
def start_meta(out: Path, identity, hps_keys, toker, toker_meta, video_only, batch_size):
    """The existing ``index.json`` (checked: same checkpoint, same batch size kept) or a new
    one."""
    path = out / INDEX_FILE
    if path.is_file():
        from search.index import read_index_json

        meta = read_index_json(out)
        check_same_checkpoint(meta["checkpoint"], identity, out)
        if meta["video_only"] != video_only:
            kind = "video-only" if meta["video_only"] else "video + subtitle"
            raise SearchIndexError(f"the index {out} is {kind}; pass the same kind of sources "
                                   "(subtitles or none) to extend it")
        return meta
    return {"format": FORMAT, "checkpoint": identity, "hps": hps_keys, "toker": toker,
            "cls_id": int(toker_meta["CLS"]), "video_only": video_only,
            "video_batch_size": batch_size, "videos": {}}


def write_shard(out: Path, meta: dict, vids, frames, masks, info) -> None:
    """Shard file first, then index.json: an interrupted build leaves at worst an unlisted
    shard, which the rerun overwrites."""
    n = len({v["shard"] for v in meta["videos"].values()})
    rel = f"{SHARD_DIR}/{n:05d}.pt"
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    tmp = out / f"{rel}.tmp"
    torch.save({"vids": list(vids), "frames": frames.float().cpu().contiguous(),
                "masks": masks.cpu().contiguous()}, tmp)
    os.replace(tmp, out / rel)
    for vid in vids:
        meta["videos"][vid] = {**info[vid], "shard": rel}
    write_json_atomic(out / INDEX_FILE, meta, indent=1)


def merge_subtitles(out: Path, new: dict) -> None:
    import json

    path = out / SUBS_FILE
    subs = json.loads(path.read_text()) if path.is_file() else {}
    subs.update(new)
    atomic_write_text(path, json.dumps(subs))


# --------------------------------------------------------------------------- build
def _recorded_checkpoint(out: Path) -> dict | None:
    """The checkpoint record of an existing index at ``out`` (None for a new one)."""
    if not (out / INDEX_FILE).is_file():
        return None
    from search.index import read_index_json

    return read_index_json(out)["checkpoint"]


def encode_new(model, video_db, todo, out, meta, info, device) -> None:
    """Encode ``todo`` (sorted) in batches of the index's batch size, one shard each.

    Each call of :func:`eval.retrieval.encode_corpus` covers exactly one loader batch, so a
    shard holds the rows eval_vcmr.py computes for those videos (padding included)."""
    from tqdm import tqdm

    setting = setting_of(meta["hps"], meta["video_batch_size"])
    size = meta["video_batch_size"]
    corpus = SimpleNamespace(video_db=video_db)
    with torch.no_grad():
        for s in tqdm(range(0, len(todo), size), desc="encode video batches"):
            chunk = todo[s:s + size]
            frames, masks, vids = encode_corpus(model, corpus, chunk, setting, device)
            write_shard(out, meta, vids, frames, masks, info)


def build_index(opts, sources=None) -> dict:
    """Build or extend ``opts.out`` from existing DBs (``opts.video_db`` [``sub_txt_db``]);
    ``sources`` maps video names to their files (``--videos``). Returns index.json."""
    from eval.common import get_device
    from utils.tokenizer import load_toker, toker_meta

    out = Path(opts.out)
    hps_keys, hps = index_hps(opts.model_dir)
    recorded = _recorded_checkpoint(out)
    identity = checkpoint_identity(opts.model_dir, opts.ckpt, known=recorded)
    toker = toker_of(opts, hps)
    t_meta = toker_meta(load_toker(toker))
    batch = opts.video_batch_size or getattr(hps, "vcmr_eval_video_batch_size", 50)
    meta = start_meta(out, identity, hps_keys, toker, t_meta, not opts.sub_txt_db, batch)
    device = get_device(opts.device)
    model = build_model(opts.model_dir, identity["path"], device)
    video_db = open_video_db(opts, hps, model, t_meta)
    vids = collection(opts, video_db)
    todo = [v for v in vids if v not in meta["videos"]]
    LOGGER.info("%d video(s) to encode, %d already in %s", len(todo), len(vids) - len(todo), out)
    if not todo:
        return meta
    sources = sources or {}
    info = {v: {"path": sources.get(v), "n_frames": video_db.num_frames(v),
                "duration": video_db.num_frames(v) * float(hps.vfeat_interval)} for v in todo}
    out.mkdir(parents=True, exist_ok=True)
    if opts.sub_txt_db:
        merge_subtitles(out, subtitle_lines(video_db, todo))
    encode_new(model, video_db, todo, out, meta, info, device)
    return meta


def main(argv=None) -> dict:
    """``scripts/build_index.py``: returns the index.json written."""
    from utils.logger import console_logging

    console_logging()
    opts = build_parser().parse_args(argv)
    check_flags(opts)
    if opts.videos:
        from search.from_videos import prepare_dbs

        recorded = _recorded_checkpoint(Path(opts.out))  # refuse before extracting anything
        if recorded:
            check_same_checkpoint(recorded, checkpoint_identity(opts.model_dir, opts.ckpt,
                                                                known=recorded), opts.out)
        sources = prepare_dbs(opts)
        meta = build_index(opts, sources)
    else:
        meta = build_index(opts)
    LOGGER.info("index %s: %d videos", opts.out, len(meta["videos"]))
    print(f"index {opts.out}: {len(meta['videos'])} videos")
    return meta

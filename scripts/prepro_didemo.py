"""Convert the ORIGINAL DiDeMo annotations into HERO's DiDeMo query DBs (data.md §3.2).

Usage (from the repository root)::

    python scripts/prepro_didemo.py --ann_dir didemo --output_dir txt_db --ann_out ann/didemo \
        --toker roberta-base [--vid2nframe video_db/didemo/id2nframe.json]

Input: ``{ann_dir}/{train,val,test}_data.json``, lists of ``{"annotation_id", "description",
"video", "times"}`` where ``times`` holds the annotators' ``[first, last]`` 5-second segment
indices (inclusive).  Output: ``{ann_out}/didemo_{split}.jsonl`` (the query_data lines) and
``{output_dir}/didemo_{split}.db`` with the record layout of ``prepro_query.py --task tvr``.

Decisions (upstream's DiDeMo preprocessing is not public, data.md §14 q1, training.md P19):

* ``desc_id`` = ``annotation_id`` (int, the record key is its string); ``vid_name`` = ``video``
  without its file extension (the feature files are named by that stem); ``desc`` =
  ``description``.
* ``ts`` in the query lines (= ``query_data.jsonl``, the evaluation ground truth) stays the LIST
  of every annotator's ``[st, ed]`` in seconds, ``[5 * first, 5 * (last + 1)]``, so the
  "2 of >= 4 annotators" rule applies (P19).
* the record ``target`` (VCMR training) is ONE ``[st, ed]``: the interval most annotators gave,
  ties broken by annotator order.
* ``duration`` = ``n_frames * frame_length`` when ``--vid2nframe`` is given, and every interval
  is clipped to it; queries whose video has no features, or whose target starts after the
  video's end, are dropped (counted and logged).  Without it, duration is 30 s (6 segments)
  and nothing is clipped or dropped.
* side files: ``id2len.json``, ``query2video.json`` (every split has its videos, test
  included, so VCMR evaluation has ground truth) and ``video_ids.json`` (the split's distinct
  videos, sorted; used only by loaders when query2video.json is absent).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter

from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import (  # noqa: E402
    TxtLmdbWriter,
    make_output_dir,
    read_json,
    write_json,
    write_jsonl,
    write_meta,
)
from scripts.prepro_query import build_meta, make_record  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import TOKER_HELP, load_toker  # noqa: E402

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SEG_SEC = 5.0
MAX_DURATION = 30.0


def seconds(times: list, duration: float | None) -> list[list[float]]:
    pairs = [[SEG_SEC * first, SEG_SEC * (last + 1)] for first, last in times]
    if duration is not None:
        pairs = [[min(st, duration), min(ed, duration)] for st, ed in pairs]
    return pairs


def consensus(pairs: list[list[float]]) -> list[float]:
    """The interval given by most annotators (the first one on ties)."""
    counts = Counter(tuple(p) for p in pairs)
    best = max(counts.values())
    return list(next(p for p in pairs if counts[tuple(p)] == best))


def query_line(ann: dict, duration: float | None) -> tuple[dict, list[float]]:
    """The query_data line of one annotation and its training target."""
    pairs = seconds(ann["times"], duration)
    line = {"desc_id": ann["annotation_id"], "desc": ann["description"],
            "vid_name": os.path.splitext(ann["video"])[0],
            "duration": MAX_DURATION if duration is None else duration, "ts": pairs}
    return line, consensus(pairs)


def convert_split(anns: list, vid2nframe: dict | None, fl: float, path: str):
    """``(lines, {qid: target})`` for one split, dropping what has no video or moment."""
    lines, targets, no_video, empty = [], {}, 0, 0
    for ann in anns:
        vid = os.path.splitext(ann["video"])[0]
        duration = None
        if vid2nframe is not None:
            if vid not in vid2nframe:
                no_video += 1
                continue
            duration = round(vid2nframe[vid] * fl, 3)
        line, target = query_line(ann, duration)
        if target[1] <= target[0]:
            empty += 1
            continue
        lines.append(line)
        targets[str(line["desc_id"])] = target
    if no_video or empty:
        LOGGER.warning("%s: dropped %d queries whose video has no features and %d whose "
                       "moment starts after the video end", path, no_video, empty)
    return lines, targets


def write_query_db(lines: list, targets: dict, output: str, toker, meta: dict) -> None:
    """Records as prepro_query's ``tvr`` task builds them, with the consensus ``target``."""
    make_output_dir(output)
    write_meta(output, meta)
    id2len, query2video = {}, {}
    with TxtLmdbWriter(output) as db:
        for n, line in enumerate(tqdm(lines, desc=f"prepro {os.path.basename(output)}")):
            qid, rec, length, vid = make_record(line, "tvr", toker, output, n)
            rec["target"] = targets[qid]
            db[qid] = rec
            id2len[qid], query2video[qid] = length, vid
    write_json(os.path.join(output, "id2len.json"), id2len)
    write_json(os.path.join(output, "query2video.json"), query2video)
    write_json(os.path.join(output, "video_ids.json"), sorted(set(query2video.values())))
    write_jsonl(os.path.join(output, "query_data.jsonl"), lines)


def prepro_didemo(opts) -> None:
    toker = load_toker(opts.toker)
    vid2nframe = read_json(opts.vid2nframe, "--vid2nframe") if opts.vid2nframe else None
    os.makedirs(opts.ann_out, exist_ok=True)
    for split in opts.splits:
        path = os.path.join(opts.ann_dir, f"{split}_data.json")
        anns = read_json(path, f"DiDeMo {split} annotations")
        lines, targets = convert_split(anns, vid2nframe, opts.frame_length, path)
        jsonl = os.path.join(opts.ann_out, f"didemo_{split}.jsonl")
        write_jsonl(jsonl, lines)
        output = os.path.join(opts.output_dir, f"didemo_{split}.db")
        args = argparse.Namespace(annotation=jsonl, output=output, toker=opts.toker,
                                  task="didemo")
        write_query_db(lines, targets, output, toker, build_meta(args, toker))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ann_dir", required=True, help="folder with {split}_data.json")
    parser.add_argument("--output_dir", required=True, help="txt_db folder for didemo_*.db")
    parser.add_argument("--ann_out", required=True, help="folder for the converted jsonl files")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    parser.add_argument("--vid2nframe", default=None,
                        help="id2nframe.json of the DiDeMo video DB (durations, clipping)")
    parser.add_argument("--frame_length", type=float, default=1.5, help="seconds per frame")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    prepro_didemo(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

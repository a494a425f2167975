"""Convert the ORIGINAL MSR-VTT annotations into HERO's MSR-VTT query DBs (data.md §3.2, §9.2).

Usage (from the repository root)::

    python scripts/prepro_msrvtt.py --videodatainfo videodatainfo.json \
        --output_dir txt_db --ann_out ann/msrvtt --toker roberta-base \
        [--test_csv MSRVTT_JSFUSION_test.csv]

Input: ``videodatainfo.json`` (``videos``: ``video_id``, ``split`` train|validate|test,
``start time``/``end time``; ``sentences``: ``caption``, ``video_id``, ``sen_id``) and optionally
the 1k-A test csv (``key,vid_key,video_id,sentence``).  Output: ``{ann_out}/msrvtt_{split}.jsonl``
and ``{output_dir}/msrvtt_{train,val,test}.db`` built by ``prepro_query.py --task tvr``.

Decisions (upstream's MSR-VTT preprocessing is not public, data.md §14 q1):

* one query per sentence: ``desc_id = sen_id`` (int), with ``sen_id`` kept (the id the
  MSR-VTT query reader tries first), ``desc`` = caption, ``vid_name`` = ``clip_name`` =
  ``video_id`` (evaluation reads ``clip_name``), ``duration`` = end - start time.  No ``ts``:
  the record ``target`` is None (VR never reads it).
* train = split ``train``, val = ``validate``, test = ``test`` (all its sentences); with
  ``--test_csv`` the test DB holds the 1k-A queries instead, keyed by the csv ``key``
  (``desc_id = retrieval_key = key``, no ``sen_id``: the reader's fallback id).
* side files: prepro_query's ``id2len.json``, ``query2video.json``, ``query_data.jsonl``, plus
  ``video_ids.json`` (the split's distinct videos, sorted).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import read_json, write_json, write_jsonl  # noqa: E402
from scripts import prepro_query  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import TOKER_HELP  # noqa: E402

LOGGER = logging.getLogger(__name__)
SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def video_table(info: dict, path: str) -> dict[str, tuple[str, float]]:
    """``{video_id: (split, duration)}``; an unknown split value is an error."""
    table = {}
    for v in info["videos"]:
        if v["split"] not in SPLITS:
            raise ValueError(f"{path}: video {v['video_id']!r} has unknown split {v['split']!r}")
        table[v["video_id"]] = (SPLITS[v["split"]], round(v["end time"] - v["start time"], 3))
    return table


def sentence_lines(info: dict, path: str) -> dict[str, list[dict]]:
    videos = video_table(info, path)
    splits = {s: [] for s in ("train", "val", "test")}
    for s in info["sentences"]:
        if s["video_id"] not in videos:
            raise KeyError(f"{path}: sentence {s['sen_id']} names unknown video "
                           f"{s['video_id']!r}")
        split, duration = videos[s["video_id"]]
        splits[split].append({"desc_id": s["sen_id"], "sen_id": s["sen_id"],
                              "desc": s["caption"], "vid_name": s["video_id"],
                              "clip_name": s["video_id"], "duration": duration})
    return splits


def csv_lines(path: str, info: dict) -> list[dict]:
    """1k-A test queries keyed by ``retrieval_key``."""
    durations = {vid: dur for vid, (_, dur) in video_table(info, path).items()}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lines = []
    for row in rows:
        line = {"desc_id": row["key"], "retrieval_key": row["key"], "desc": row["sentence"],
                "vid_name": row["video_id"], "clip_name": row["video_id"]}
        if row["video_id"] in durations:
            line["duration"] = durations[row["video_id"]]
        lines.append(line)
    return lines


def prepro_msrvtt(opts) -> None:
    info = read_json(opts.videodatainfo, "--videodatainfo")
    splits = sentence_lines(info, opts.videodatainfo)
    if opts.test_csv:
        splits["test"] = csv_lines(opts.test_csv, info)
    os.makedirs(opts.ann_out, exist_ok=True)
    for split, lines in splits.items():
        if not lines:
            LOGGER.warning("%s: no %s sentences, msrvtt_%s.db not built", opts.videodatainfo,
                           split, split)
            continue
        jsonl = os.path.join(opts.ann_out, f"msrvtt_{split}.jsonl")
        write_jsonl(jsonl, lines)
        output = os.path.join(opts.output_dir, f"msrvtt_{split}.db")
        prepro_query.main(["--annotation", jsonl, "--task", "tvr", "--toker", opts.toker,
                           "--output", output])
        write_json(os.path.join(output, "video_ids.json"),
                   sorted({line["vid_name"] for line in lines}))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videodatainfo", required=True, help="MSR-VTT videodatainfo.json")
    parser.add_argument("--test_csv", default=None, help="1k-A test csv (replaces test)")
    parser.add_argument("--output_dir", required=True, help="txt_db folder for msrvtt_*.db")
    parser.add_argument("--ann_out", required=True, help="folder for the converted jsonl files")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    prepro_msrvtt(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

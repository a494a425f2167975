"""Convert the ORIGINAL VIOLIN annotation file into HERO's VIOLIN text DBs (data.md §3.4).

Usage (from the repository root)::

    python scripts/prepro_violin.py --annotation violin_annotation.json \
        --output_dir txt_db --ann_out ann/violin --toker roberta-base

Input: ``{clip_key: {"file", "split", "statement": [[true, false], ...],
"sub": [[text, start, end], ...], "span": [start, end], ...}}``.  Output: the statement jsonl
``{ann_out}/violin_{split}.jsonl`` and ``{ann_out}/violin_subtitles.jsonl`` (the
tvqa_preprocessed_subtitles format, for ``prepro_sub.py``), then ``prepro_query.py --task
violin`` builds ``{output_dir}/violin_{train,val,test}.db`` from the statement files.

Decisions (upstream never released this step, data.md §14 q2):

* one line per statement: ``desc_id = "{clip_key}-{k}-{label}"`` with k the pair index in
  ``statement`` and label 1 for the first (true) member, 0 for the second; so the training
  pair of an id is its last field x replaced by 1-x.  ``label`` is an int (0/1), ``vid_name`` is
  the clip's ``file``; lines go clip by clip, pair by pair, true first.
* split values ``train``/``val``/``validate``/``valid``/``test`` map to train/val/test; a clip
  without ``split`` is dropped (counted and logged); any other value is an error.
* subtitle times: with ``--sub_clock source`` (default) they are read as times in the source
  episode and shifted by ``span[0]`` to the clip clock; ``--sub_clock clip`` keeps them.  Starts
  before the clip are clipped to 0, lines ending before it are dropped (counted); lines are
  sorted by start, as ``prepro_sub.py`` requires.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import write_jsonl  # noqa: E402
from scripts import prepro_query  # noqa: E402
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import TOKER_HELP  # noqa: E402

LOGGER = logging.getLogger(__name__)
SPLITS = {"train": "train", "val": "val", "validate": "val", "valid": "val", "test": "test"}


def statement_lines(key: str, clip: dict) -> list[dict]:
    lines = []
    for k, pair in enumerate(clip["statement"]):
        if len(pair) != 2:
            raise ValueError(f"clip {key!r}: statement {k} is not a [true, false] pair")
        for label, desc in ((1, pair[0]), (0, pair[1])):
            lines.append({"desc_id": f"{key}-{k}-{label}", "desc": desc,
                          "vid_name": clip["file"], "label": label})
    return lines


def subtitle_line(clip: dict, sub_clock: str) -> tuple[dict, int]:
    """The clip's subtitles on the clip clock; returns the line and the number dropped."""
    offset = clip["span"][0] if sub_clock == "source" and clip.get("span") else 0.0
    subs = [{"text": text, "start": round(max(0.0, start - offset), 3),
             "end": round(end - offset, 3)}
            for text, start, end in clip.get("sub", []) if end - offset > 0]
    subs.sort(key=lambda s: s["start"])
    return {"vid_name": clip["file"], "sub": subs}, len(clip.get("sub", [])) - len(subs)


def convert(annotation: dict, sub_clock: str, path: str = "annotation"):
    """``({split: statement lines}, subtitle lines)`` from the loaded annotation dict."""
    splits = {s: [] for s in ("train", "val", "test")}
    sub_lines, files, no_split, dropped_subs = [], set(), 0, 0
    for key, clip in annotation.items():
        if "split" not in clip:
            no_split += 1
            continue
        if clip["split"] not in SPLITS:
            raise ValueError(f"{path}: clip {key!r} has unknown split {clip['split']!r}")
        if clip["file"] in files:
            raise ValueError(f"{path}: clip file {clip['file']!r} appears twice")
        files.add(clip["file"])
        splits[SPLITS[clip["split"]]].extend(statement_lines(key, clip))
        line, n_dropped = subtitle_line(clip, sub_clock)
        sub_lines.append(line)
        dropped_subs += n_dropped
    if no_split:
        LOGGER.warning("%s: %d clips without a 'split' were dropped", path, no_split)
    if dropped_subs:
        LOGGER.warning("%s: %d subtitles ending before their clip were dropped", path,
                       dropped_subs)
    return splits, sub_lines


def prepro_violin(opts) -> None:
    with open(opts.annotation, encoding="utf-8") as f:
        splits, sub_lines = convert(json.load(f), opts.sub_clock, opts.annotation)
    os.makedirs(opts.ann_out, exist_ok=True)
    write_jsonl(os.path.join(opts.ann_out, "violin_subtitles.jsonl"), sub_lines)
    for split, lines in splits.items():
        if not lines:
            LOGGER.warning("%s: no %s statements, violin_%s.db not built", opts.annotation,
                           split, split)
            continue
        jsonl = os.path.join(opts.ann_out, f"violin_{split}.jsonl")
        write_jsonl(jsonl, lines)
        prepro_query.main(["--annotation", jsonl, "--task", "violin", "--toker", opts.toker,
                           "--output", os.path.join(opts.output_dir, f"violin_{split}.db")])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation", required=True, help="violin_annotation.json")
    parser.add_argument("--output_dir", required=True, help="txt_db folder for violin_*.db")
    parser.add_argument("--ann_out", required=True, help="folder for the converted jsonl files")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    parser.add_argument("--sub_clock", default="source", choices=("source", "clip"),
                        help="subtitle times in the source episode (shift by span[0]) or clip")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO)
    prepro_violin(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

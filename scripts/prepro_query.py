"""Build a query text DB (TVR / TVQA / VIOLIN) from an annotation jsonl (data.md §3.2-§3.4, §5.2).

Usage (from the repository root)::

    python scripts/prepro_query.py --annotation tvr_train_release.jsonl \
        --output txt_db/tvr_train.db --toker roberta-base --task tvr

``--toker`` is a Hugging Face model name read from the local cache, or a local tokenizer folder
(utils/tokenizer.py). Difference from upstream, on purpose: the repository root is put on
``sys.path`` instead of upstream's ``/src``.
"""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.db import (  # noqa: E402
    TxtLmdbWriter,
    make_output_dir,
    read_jsonl,
    write_json,
    write_jsonl,
    write_meta,
)
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import (  # noqa: E402
    TOKER_HELP,
    build_meta,
    load_toker,
    roberta_tokenize,
)

ID_FIELD = {"tvr": "desc_id", "tvqa": "qid", "violin": "desc_id"}


def _field(line: dict, key: str, path: str, n: int):
    try:
        return line[key]
    except KeyError:
        raise KeyError(f"{path} line {n + 1} lacks the field {key!r}") from None


def make_record(line: dict, task: str, toker, path: str, n: int):
    """Return ``(key, record, length, vid_or_None)`` for one annotation line."""
    rec = dict(line)
    qid = str(_field(line, ID_FIELD[task], path, n))
    if task == "tvqa":
        texts = [_field(line, k, path, n) for k in ("q", "a0", "a1", "a2", "a3", "a4")]
        rec["input_ids"] = [roberta_tokenize(toker, t) for t in texts]
        length = [len(ids) for ids in rec["input_ids"]]
        rec["vid"] = _field(line, "vid_name", path, n)
        rec["ts"] = line.get("ts")
        rec["target"] = line.get("answer_idx")
    else:
        rec["input_ids"] = roberta_tokenize(toker, _field(line, "desc", path, n))
        length = len(rec["input_ids"])
        if "vid_name" in line:
            rec["vid"] = line["vid_name"]
        if task == "tvr":
            rec["target"] = line.get("ts")
        else:
            rec["target"] = _field(line, "label", path, n)
    rec["qid"] = qid
    return qid, rec, length, line.get("vid_name")


def prepro_query(opts) -> None:
    lines = read_jsonl(opts.annotation)
    toker = load_toker(opts.toker)
    meta = build_meta(opts, toker)
    make_output_dir(opts.output)
    write_meta(opts.output, meta)
    id2len, query2video = {}, {}
    with TxtLmdbWriter(opts.output) as db:
        for n, line in enumerate(tqdm(lines, desc=f"prepro {opts.task}")):
            qid, rec, length, vid = make_record(line, opts.task, toker, opts.annotation, n)
            db[qid] = rec
            id2len[qid] = length
            if vid is not None:
                query2video[qid] = vid
    write_json(os.path.join(opts.output, "id2len.json"), id2len)
    write_json(os.path.join(opts.output, "query2video.json"), query2video)
    write_jsonl(os.path.join(opts.output, "query_data.jsonl"), lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation", required=True, help="annotation jsonl")
    parser.add_argument("--output", required=True, help="output DB folder (must not exist)")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    parser.add_argument("--task", default="tvr", choices=sorted(ID_FIELD))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    prepro_query(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

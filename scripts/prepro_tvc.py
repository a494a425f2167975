"""Build a TVC caption DB (``meta.json`` + ``cap.db`` + ``clip.db``; data.md §3.5, §5.4).

Usage (from the repository root)::

    python scripts/prepro_tvc.py --annotation tvc_train_release.jsonl \
        --subtitles tv_subtitles.jsonl --output txt_db/tvc_train.db --toker roberta-base

Captions are tokenized as-is (no upper-case rule, no HTML unescaping). ``cap.db/id2len.json``
is always ``{}`` as upstream writes it. Lines without ``descs`` (test_public) give clips with no
captions. ``--toker`` is a model name or a folder (utils/tokenizer.py); the repository root
replaces ``/src`` on ``sys.path``.
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
    write_meta,
)
from utils.errors import run_main  # noqa: E402
from utils.tokenizer import (  # noqa: E402
    TOKER_HELP,
    build_meta,
    load_toker,
    roberta_tokenize,
)


def overlapping_subs(subs: list, ts) -> list:
    """Indices of subtitles overlapping the clip ``ts`` (strict inequalities, as upstream)."""
    st, ed = ts
    return [i for i, s in enumerate(subs)
            if st < s["start"] < ed or st < s["end"] < ed or s["start"] < st < ed < s["end"]]


def load_subtitles(path: str) -> dict:
    return {line["vid_name"]: line.get("sub") or [] for line in read_jsonl(path)}


def clip_records(line: dict, vid2subs: dict, toker, path: str):
    """Return ``(clip_id, clip_record, [(desc_id, caption_record), ...])`` for one line."""
    vid = line["vid_name"]
    if vid not in vid2subs:
        raise KeyError(f"video {vid!r} of {path} is not in the --subtitles file")
    clip_id = str(line["clip_id"])
    sub_indices = overlapping_subs(vid2subs[vid], line["ts"])
    common = {"vid_name": vid, "ts": line["ts"], "sub_indices": sub_indices,
              "duration": line.get("duration")}
    clip = dict(common, captions=[])
    caps = []
    for desc in line.get("descs") or []:
        ids = roberta_tokenize(toker, desc["desc"], lower_upper=False)
        cap = dict(desc, input_ids=ids, vid_name=vid, clip_id=clip_id, ts=line["ts"],
                   sub_indices=sub_indices, duration=common["duration"])
        caps.append((str(desc["desc_id"]), cap))
        clip["captions"].append({"id": desc["desc_id"], "input_ids": ids, "text": desc["desc"]})
    return clip_id, clip, caps


def write_side_files(opts, cap2vid, vid2caps, clip2vid, vid2clips) -> None:
    cap_dir = os.path.join(opts.output, "cap.db")
    clip_dir = os.path.join(opts.output, "clip.db")
    write_json(os.path.join(cap_dir, "id2len.json"), {})
    write_json(os.path.join(cap_dir, "cap2vid.json"), cap2vid)
    write_json(os.path.join(cap_dir, "vid2caps.json"), vid2caps)
    write_json(os.path.join(clip_dir, "clip2vid.json"), clip2vid)
    write_json(os.path.join(clip_dir, "vid2clips.json"), vid2clips)


def prepro_tvc(opts) -> None:
    lines = read_jsonl(opts.annotation)
    vid2subs = load_subtitles(opts.subtitles)
    toker = load_toker(opts.toker)
    meta = build_meta(opts, toker)
    make_output_dir(opts.output)
    write_meta(opts.output, meta)
    cap2vid, vid2caps, clip2vid, vid2clips = {}, {}, {}, {}
    with TxtLmdbWriter(os.path.join(opts.output, "cap.db")) as cap_db, \
            TxtLmdbWriter(os.path.join(opts.output, "clip.db")) as clip_db:
        for line in tqdm(lines, desc="prepro tvc"):
            clip_id, clip, caps = clip_records(line, vid2subs, toker, opts.annotation)
            vid = clip["vid_name"]
            clip_db[clip_id] = clip
            clip2vid[clip_id] = vid
            vid2clips.setdefault(vid, []).append(clip_id)
            for desc_id, cap in caps:
                cap_db[desc_id] = cap
                cap2vid[desc_id] = vid
                vid2caps.setdefault(vid, []).append(desc_id)
    write_side_files(opts, cap2vid, vid2caps, clip2vid, vid2clips)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation", required=True, help="TVC annotation jsonl")
    parser.add_argument("--subtitles", required=True, help="tvqa_preprocessed_subtitles.jsonl")
    parser.add_argument("--output", required=True, help="output DB folder (must not exist)")
    parser.add_argument("--toker", default="roberta-base", help=TOKER_HELP)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    prepro_tvc(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

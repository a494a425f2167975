"""``build_index.py --videos DIR [--subtitles DIR]``: video files -> the DBs a model reads.

Runs the project's own pipeline into ``OUT/work/`` (issue 8 and the prepro scripts; nothing is
re-implemented here): ``scripts/extract_features.py`` (resumable: extracted clips are skipped),
``scripts/collect_video_feature_paths.py`` + ``scripts/convert_videodb.py`` (video DB), and
``scripts/prepro_sub.py`` on a subtitle jsonl made from the ``.srt`` files (sub DB). The DBs
are built from all extracted features whenever the collection changes (cheap next to feature
extraction and encoding); the index itself then encodes only the videos it does not hold yet.

Decisions:
- a video's name is its file stem (as extract_features.py names the feature files); its
  subtitles are ``<stem>.srt`` anywhere under ``--subtitles``;
- the model's task decides between video + subtitle and video-only input, as eval_vcmr.py
  does (``task`` ending in ``video_only``): a TVR/How2R/DiDeMo-sub model gets a subtitle DB
  even without ``--subtitles`` (videos without subtitles get prepro_sub.py's
  pseudo-subtitles, as in training), a video-only model never gets one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from search.index import SearchIndexError

TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")
TAG = re.compile(r"<[^>]+>|\{\\[^}]*\}")
DATASET = "mine"


def srt_seconds(stamp: str, path) -> float:
    m = TIME.search(stamp)
    if m is None:
        raise SearchIndexError(f"{path}: {stamp.strip()!r} is not an SRT time (HH:MM:SS,mmm)")
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 10 ** len(ms)


def parse_srt(path) -> list:
    """``[{"start", "end", "text"}]`` sorted by start, as prepro_sub.py's jsonl wants them:
    cue numbers dropped, text lines joined with a space, formatting tags removed."""
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace").replace("\r\n", "\n")
    subs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.split("\n") if line.strip()]
        arrow = next((n for n, line in enumerate(lines) if "-->" in line), None)
        if arrow is None:
            continue
        st, ed = lines[arrow].split("-->", 1)
        words = " ".join(TAG.sub("", line).strip() for line in lines[arrow + 1:]).strip()
        if words:
            subs.append({"start": srt_seconds(st, path), "end": srt_seconds(ed, path),
                         "text": words})
    return sorted(subs, key=lambda s: s["start"])


def srt_files(folder) -> dict:
    """``{stem: path}`` of every .srt under ``folder`` (a stem twice is an error)."""
    out = {}
    for path in sorted(Path(folder).rglob("*.srt")):
        if path.stem in out:
            raise SearchIndexError(f"--subtitles {folder}: two files for video {path.stem!r} "
                                   f"({out[path.stem]}, {path})")
        out[path.stem] = str(path)
    return out


def write_sub_jsonl(vids, subtitle_dir, path) -> None:
    """prepro_sub.py's annotation: one ``{"vid_name", "sub"}`` line per video."""
    files = srt_files(subtitle_dir) if subtitle_dir else {}
    unknown = sorted(set(files) - set(vids))
    if unknown:
        raise SearchIndexError(f"--subtitles {subtitle_dir}: {len(unknown)} .srt file(s) match "
                               f"no video (e.g. {unknown[:3]}); name them <video stem>.srt")
    with open(path, "w") as f:
        for vid in sorted(vids):
            subs = parse_srt(files[vid]) if vid in files else []
            f.write(json.dumps({"vid_name": vid, "sub": subs}) + "\n")


def video_files(video_dir) -> dict:
    """``{stem: absolute path}`` of the videos extract_features.py will find."""
    from scripts.extract.pipeline import find_videos

    out = {}
    for path, vid, _ in find_videos(video_dir):
        if vid in out:
            raise SearchIndexError(f"--videos {video_dir}: two videos named {vid!r} ({out[vid]}, "
                                   f"{path}); the index names videos by file stem, rename one")
        out[vid] = os.path.abspath(path)
    if not out:
        raise SearchIndexError(f"--videos {video_dir}: no mp4/mkv/webm/avi/mov file found")
    return out


def extract(opts, feats: Path, interval: float) -> None:
    """scripts/extract_features.py on ``--videos`` (resumes: finished clips are skipped)."""
    from scripts import extract_features

    argv = ["--video_dir", opts.videos, "--output", str(feats), "--frame_interval",
            str(interval), "--num_workers", "0"]
    if opts.random_weights:
        argv += ["--random_weights"] + (["--tiny"] if opts.tiny else [])
    else:
        if not (opts.resnet_ckpt and opts.slowfast_ckpt):
            raise SearchIndexError("--videos needs the feature extractors' checkpoints: "
                                   "--resnet_ckpt resnet152-b121ed2d.pth --slowfast_ckpt "
                                   "SLOWFAST_8x8_R50.pyth (see scripts/extract_features.py)")
        argv += ["--resnet_ckpt", opts.resnet_ckpt, "--slowfast_ckpt", opts.slowfast_ckpt]
    if opts.frame_size:
        argv += ["--frame_size", str(opts.frame_size)]
    if opts.device:
        argv += ["--device", opts.device]
    summary = extract_features.main(argv)["summary"]
    if summary.failures:
        raise SearchIndexError(f"feature extraction failed for {len(summary.failures)} video(s) of "
                               f"--videos {opts.videos}: see {feats}/extract_failures.json")


def video_db(feats: Path, dbs: Path, interval: float) -> str:
    """collect_video_feature_paths.py + convert_videodb.py into ``dbs/video_db``."""
    from scripts import collect_video_feature_paths, convert_videodb

    root = dbs / "video_db"
    collect_video_feature_paths.main(["--feature_dir", str(feats), "--output", str(root),
                                      "--dataset", DATASET, "--nproc", "1"])
    convert_videodb.main(["--vfeat_info_file", str(root / DATASET / "video_feat_info.pkl"),
                          "--output", str(root), "--dataset", DATASET, "--frame_length",
                          str(interval), "--nproc", "1"])
    return str(root / DATASET)


def sub_db(opts, img_dir: str, dbs: Path, interval: float, toker: str) -> str:
    """The .srt files -> jsonl -> scripts/prepro_sub.py -> ``dbs/sub.db``."""
    from scripts import prepro_sub

    id2nframe = os.path.join(img_dir, "id2nframe.json")
    vids = json.loads(Path(id2nframe).read_text())
    annotation = dbs / "subtitles.jsonl"
    write_sub_jsonl(vids, opts.subtitles, annotation)
    out = dbs / "sub.db"
    prepro_sub.main(["--annotation", str(annotation), "--vid2nframe", id2nframe,
                     "--frame_length", str(interval), "--output", str(out), "--toker", toker,
                     "--task", DATASET])
    return str(out)


def sources_key(files: dict, subtitle_dir, toker, interval) -> str:
    """Fingerprint of what the DBs are made of (video names, .srt contents, tokenizer,
    interval). DBs are built into a folder named by it and never rewritten in place: a process
    keeps an LMDB open by path, and a changed collection gets a new folder."""
    digest = hashlib.sha256(json.dumps([sorted(files), toker, interval]).encode())
    for stem, path in sorted((srt_files(subtitle_dir) if subtitle_dir else {}).items()):
        digest.update(stem.encode() + Path(path).read_bytes())
    return digest.hexdigest()[:12]


def prepare_dbs(opts) -> dict:
    """Extract, convert and preprocess ``opts.videos`` into ``OUT/work``; sets
    ``opts.video_db`` (and ``opts.sub_txt_db`` for video + subtitle models). Returns the
    ``{video name: file}`` map the index records."""
    from search.build import toker_of
    from search.model_io import index_hps

    hps, full = index_hps(opts.model_dir)
    toker = toker_of(opts, full)
    interval = float(hps["vfeat_interval"])
    files = video_files(opts.videos)
    video_only = str(getattr(full, "task", "tvr")).endswith("video_only")
    if opts.subtitles and video_only:
        raise SearchIndexError(f"--subtitles: the model of --model_dir {opts.model_dir} is "
                               f"video-only (task {full.task}); it reads no subtitles")
    work = Path(opts.out) / "work"
    extract(opts, work / "feats", interval)
    dbs = work / f"dbs_{sources_key(files, opts.subtitles, toker, interval)}"
    if not (dbs / "done").is_file():
        tmp = dbs.with_name(dbs.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        img_dir = video_db(work / "feats", tmp, interval)
        if not video_only:
            sub_db(opts, img_dir, tmp, interval, toker)
        (tmp / "done").write_text("")
        os.replace(tmp, dbs)
    opts.video_db = str(dbs / "video_db" / DATASET)
    opts.sub_txt_db = None if video_only else str(dbs / "sub.db")
    return files

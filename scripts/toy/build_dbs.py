"""Build every text and video DB from a toy corpus folder with the project's real
preprocessing scripts, laid out like upstream's released folders.

Each step calls a script's ``main(argv)`` in this one process (the argv is logged as the
equivalent command line): the scripts are unchanged, only the ~2 s interpreter and
transformers start-up per script is saved.  Layout of ``OUT``::

    txt_db/   tvr_{train,val,test_public}.db  tv_subtitles.db (+ vid2dur_idx.json)
              tvqa_{train,val,test_public}.db  tvc_{train,val}.db
              tvc_{val,test_public}_release.jsonl
              violin_{train,val,test}.db  violin_subtitles.db
              didemo_{train,val,test}.db  didemo_subtitles.db
              msrvtt_{train,val,test}.db  msrvtt_subtitles.db  pretrain_splits/tv_{train,val}.json
    video_db/ tv/ didemo/ (resnet_slowfast_1.5)  violin/ (resnet_slowfast_1.5_compressed)
              msrvtt/ (resnet_slowfast_2), each with id2nframe.json
    ann/      the jsonl files the VIOLIN / DiDeMo / MSR-VTT converters wrote

``tvr_test_public.db`` also gets ``video_ids.json`` (the test_public videos of
``tvr_video2dur_idx.json``, sorted): its ``query2video.json`` is empty because the test queries
carry no ``vid_name``, and the loaders fall back to that list (data.md pitfall 27, open q 10).

Everything is written to ``OUT.partial`` and renamed at the end, so a failed build leaves no
half-made ``OUT`` and can be re-run.  MSR-VTT's LMDB folder is renamed from the converter's
``resnet_slowfast_2.0`` (argparse float) to the released ``resnet_slowfast_2`` (pitfall 17).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from scripts import (
    collect_video_feature_paths,
    convert_videodb,
    prepro_didemo,
    prepro_msrvtt,
    prepro_query,
    prepro_sub,
    prepro_tvc,
    prepro_violin,
)
from scripts.toy import featinfo

LOGGER = logging.getLogger(__name__)
VIDEO_SETS = (("tv", "1.5", []), ("violin", "1.5", ["--compress"]), ("didemo", "1.5", []),
              ("msrvtt", "2", []))


def run(module, *argv) -> None:
    argv = [str(a) for a in argv]
    print(f"==> {module.__name__.replace('.', '/')}.py {' '.join(argv)}", flush=True)
    module.main(argv)


def video_dbs(raw: Path, vid: Path, tmp: Path) -> None:
    run(collect_video_feature_paths, "--feature_dir", raw / "features", "--output", tmp,
        "--dataset", "all", "--nproc", 1)
    for ds, fl, extra in VIDEO_SETS:
        info = vid / ds / "video_feat_info.pkl"
        run(featinfo, "--info", tmp / "all" / "video_feat_info.pkl", "--folder", ds,
            "--output", info)
        run(convert_videodb, "--vfeat_info_file", info, "--output", vid, "--dataset", ds,
            "--frame_length", fl, "--nproc", 1, *extra)
    (vid / "msrvtt" / "resnet_slowfast_2.0").rename(vid / "msrvtt" / "resnet_slowfast_2")


def tv_txt_dbs(raw: Path, txt: Path, toker: Path) -> None:
    subs = raw / "tvqa_preprocessed_subtitles.jsonl"
    for split in ("train", "val", "test_public"):
        run(prepro_query, "--annotation", raw / f"tvr_{split}_release.jsonl",
            "--output", txt / f"tvr_{split}.db", "--toker", toker, "--task", "tvr")
        run(prepro_query, "--annotation", raw / f"tvqa_{split}.jsonl",
            "--output", txt / f"tvqa_{split}.db", "--toker", toker, "--task", "tvqa")
    run(prepro_sub, "--annotation", subs, "--vid2nframe", raw / "tv_vid2nframe.json",
        "--frame_length", 1.5, "--output", txt / "tv_subtitles.db", "--toker", toker,
        "--task", "tv")
    dur_idx = raw / "tvr_video2dur_idx.json"
    shutil.copy(dur_idx, txt / "tv_subtitles.db" / "vid2dur_idx.json")
    test_videos = sorted(json.loads(dur_idx.read_text())["test_public"])
    (txt / "tvr_test_public.db" / "video_ids.json").write_text(json.dumps(test_videos))
    for split in ("train", "val"):
        run(prepro_tvc, "--annotation", raw / f"tvc_{split}_release.jsonl",
            "--subtitles", subs, "--output", txt / f"tvc_{split}.db", "--toker", toker)
    for split in ("val", "test_public"):
        shutil.copy(raw / f"tvc_{split}_release.jsonl", txt)
    shutil.copytree(raw / "pretrain_splits", txt / "pretrain_splits")


def other_txt_dbs(raw: Path, txt: Path, vid: Path, ann: Path, toker: Path) -> None:
    run(prepro_violin, "--annotation", raw / "violin" / "violin_annotation.json",
        "--output_dir", txt, "--ann_out", ann / "violin", "--toker", toker)
    run(prepro_didemo, "--ann_dir", raw / "didemo", "--output_dir", txt,
        "--ann_out", ann / "didemo", "--toker", toker,
        "--vid2nframe", vid / "didemo" / "id2nframe.json")
    run(prepro_msrvtt, "--videodatainfo", raw / "msrvtt" / "videodatainfo.json",
        "--test_csv", raw / "msrvtt" / "MSRVTT_JSFUSION_test.csv", "--output_dir", txt,
        "--ann_out", ann / "msrvtt", "--toker", toker)
    for ds, subs, fl in (("violin", ann / "violin" / "violin_subtitles.jsonl", 1.5),
                         ("didemo", raw / "didemo" / "didemo_asr.jsonl", 1.5),
                         ("msrvtt", raw / "msrvtt" / "msrvtt_asr.jsonl", 2)):
        run(prepro_sub, "--annotation", subs, "--vid2nframe", vid / ds / "id2nframe.json",
            "--frame_length", fl, "--output", txt / f"{ds}_subtitles.db", "--toker", toker,
            "--task", ds)


def build_dbs(raw_dir, out_dir) -> Path:
    raw, out = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not (raw / "tokenizer" / "vocab.json").is_file():
        raise FileNotFoundError(f"{raw} is not a toy corpus (no tokenizer/vocab.json); "
                                "run scripts/make_toy_corpus.py first")
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or pick another folder")
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    txt, vid, ann, tmp = work / "txt_db", work / "video_db", work / "ann", work / "tmp"
    for d in (txt, vid, ann, tmp):
        d.mkdir(parents=True)
    video_dbs(raw, vid, tmp)
    tv_txt_dbs(raw, txt, raw / "tokenizer")
    other_txt_dbs(raw, txt, vid, ann, raw / "tokenizer")
    shutil.rmtree(tmp)
    work.rename(out)
    print(f"==> databases ready in {out} (txt_db/, video_db/)")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw_dir", help="toy corpus folder from scripts/make_toy_corpus.py")
    parser.add_argument("out_dir", help="output folder (must not exist)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        build_dbs(opts.raw_dir, opts.out_dir)
    except (FileNotFoundError, FileExistsError) as exc:
        sys.exit(f"build_toy_dbs: {exc}")


if __name__ == "__main__":
    main()

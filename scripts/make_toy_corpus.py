"""Generate the synthetic toy TV corpus in upstream's RAW formats.

Usage (from the repository root)::

    python scripts/make_toy_corpus.py --out toy_raw --seed 0 [--size tiny|demo] [--labelled N]

``tiny`` (12 TV videos, 8 each for VIOLIN/DiDeMo/MSR-VTT) builds in seconds for tests; ``demo``
(1,000 TV videos, 784 of them unlabelled for pre-training; 400 VIOLIN, 200 each DiDeMo and
MSR-VTT; 16 labelled training videos per dataset, scripts/toy/README.md) in a few seconds.  The
output folder (absent or empty) receives::

    tokenizer/                      vocab.json + merges.txt (RoBERTa layout, roberta-base ids)
    tvr_{train,val,test_public}_release.jsonl   tvqa_{train,val,test_public}.jsonl
    tvc_{train,val,test_public}_release.jsonl   tvqa_preprocessed_subtitles.jsonl
    tv_vid2nframe.json  tvr_video2dur_idx.json  pretrain_splits/tv_{train,val}.json
    violin/violin_annotation.json
    didemo/{train,val,test}_data.json  didemo/didemo_asr.jsonl
    msrvtt/videodatainfo.json  msrvtt/MSRVTT_JSFUSION_test.csv  msrvtt/msrvtt_asr.jsonl
    features/{resnet,slowfast}_features/{tv,violin,didemo,msrvtt}/<vid>.npz  (float16)
    world.json                      ground truth of every video (scenes), for inspection

The world (who/what/where in frames, objects in subtitles) is described in scripts/toy/.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.toy.build import SIZES, make_corpus  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (absent or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--labelled", type=int, default=None,
                        help="labelled training videos per dataset (default: the size's); "
                             "the pre-training videos stay the same (a label curve)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    opts = parse_args(argv)
    out = make_corpus(opts.out, opts.seed, opts.size, opts.labelled)
    labels = "" if opts.labelled is None else f", {opts.labelled} labelled videos per dataset"
    print(f"toy corpus ({opts.size}, seed {opts.seed}{labels}) written to {out}")


if __name__ == "__main__":
    main()

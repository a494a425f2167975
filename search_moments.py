"""Search a moment index from the command line (issue 19).

Usage (from the repository root)::

    python search_moments.py --index INDEX "a man opens the door" [--top_k 10] [--device cpu]

Prints one row per moment: rank, video, start and end (seconds), score, best first, computed
with eval_vcmr.py's full-corpus VCMR procedure (search/index.py). Build the index with
``scripts/build_index.py``.
"""
from __future__ import annotations

import argparse
import os

from utils.errors import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="search a moment index")
    p.add_argument("--index", required=True, help="index folder from scripts/build_index.py")
    p.add_argument("query", nargs="+", help="the query text (quote it or not)")
    p.add_argument("--top_k", type=int, default=10, help="moments to print")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--subtitles", action="store_true", help="also print matching subtitles")
    return p.parse_args(argv)


def format_table(moments, index=None) -> str:
    """Fixed-width table; with ``index``, each row is followed by its subtitle lines."""
    width = max([len("video")] + [len(m.video) for m in moments])
    lines = [f"{'rank':>4}  {'video':<{width}}  {'start':>8}  {'end':>8}  {'score':>10}"]
    for m in moments:
        lines.append(f"{m.rank:>4}  {m.video:<{width}}  {m.start:>8.2f}  {m.end:>8.2f}  "
                     f"{m.score:>10.4g}")
        for text in (index.subtitles(m.video, m.start, m.end) if index else []):
            lines.append(f"{'':>4}  | {text}")
    return "\n".join(lines)


def main(argv=None):
    """Print the table; returns the moments."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # one-query loops: no progress bars
    from search import MomentIndex

    opts = parse_args(argv)
    index = MomentIndex.load(opts.index, device=opts.device)
    moments = index.search(" ".join(opts.query), top_k=opts.top_k)
    print(format_table(moments, index if opts.subtitles else None))
    if not moments:
        print("(no moment found)")
    return moments


if __name__ == "__main__":
    run_main(main)

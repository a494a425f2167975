"""``scripts/benchmark.py search``: query latency of :meth:`MomentIndex.search` on CPU.

A synthetic collection of ``--search_videos`` videos (random lengths up to ``--search_clip_len``
frames, random frame representations of the model's hidden size) is searched with a randomly
initialised model of ``--search_model_config`` (the full-size HERO fine-tuning config by
default: the latency does not depend on the weights' values) and the TVR settings of
config/train-tvr-8gpu.json (q2c_alpha 20, max_vcmr_video 100, window [2, 16), NMS 0.5 on the
top 100 of 200). One warm-up query, then ``--search_queries`` timed ones; the figure is the
median (also min and max). The time covers everything a query costs after loading: tokenizing,
the query encoder, video scores, span probabilities, the ranking and NMS. The tokenizer is the
toy corpus's (same code path as roberta-base; built offline into a temporary folder).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUERIES = ("a man opens the door", "Alice is looking for her camera in the kitchen",
           "two people argue about the key", "someone laughs at the table",
           "a woman walks into the hospital room", "they run on the beach",
           "he hands her the phone and leaves")


def add_arguments(parser) -> None:
    parser.add_argument("--search_videos", type=int, default=1000, help="collection size")
    parser.add_argument("--search_clip_len", type=int, default=100, help="max frames per video")
    parser.add_argument("--search_queries", type=int, default=7, help="timed queries (>= 5)")
    parser.add_argument("--search_model_config", default=str(REPO / "config" /
                                                             "hero_finetune.json"))
    parser.add_argument("--search_threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default)")


def synthetic_index(opts, toker_dir):
    """A :class:`MomentIndex` over random frame representations (nothing written to disk)."""
    from model.vcmr import HeroForVcmr
    from search.index import HPS_KEYS, MomentIndex
    from utils.tokenizer import load_toker

    torch.manual_seed(0)
    model = HeroForVcmr(opts.search_model_config, lw_neg_ctx=8, lw_neg_q=8).eval()
    dim = model.video_query_linear.in_features
    lengths = torch.randint(opts.search_clip_len // 4, opts.search_clip_len + 1,
                            (opts.search_videos,))
    frames = torch.randn(opts.search_videos, opts.search_clip_len, dim)
    masks = (torch.arange(opts.search_clip_len)[None] < lengths[:, None]).long()
    frames *= masks.unsqueeze(-1)
    vids = [f"video_{n:05d}" for n in range(opts.search_videos)]
    tvr = json.loads((REPO / "config" / "train-tvr-8gpu.json").read_text())
    hps = {k: tvr[k] for k in HPS_KEYS if k in tvr}
    hps.setdefault("nms_thd", 0.5)
    meta = {"hps": hps, "cls_id": 0, "videos": {v: {"path": None} for v in vids},
            "checkpoint": {"path": "random"}}
    return MomentIndex(model, frames, masks, vids, meta, load_toker(toker_dir))


def bench_search(opts, result) -> list:
    """Median / min / max seconds of one query on CPU (``result`` makes the JSON lines)."""
    from scripts.toy.tokenizer import build_tokenizer

    if opts.search_threads:
        torch.set_num_threads(opts.search_threads)
    if opts.search_queries < 5:
        raise SystemExit("--search_queries must be >= 5")
    with tempfile.TemporaryDirectory() as tmp:
        index = synthetic_index(opts, build_tokenizer(Path(tmp) / "toker"))
        index.search(QUERIES[0])  # warm-up
        times = []
        for n in range(opts.search_queries):
            start = time.perf_counter()
            moments = index.search(QUERIES[n % len(QUERIES)], top_k=10)
            times.append(time.perf_counter() - start)
            assert len(moments) == 10
    prefix = (f"search/cpu/videos={opts.search_videos}/L={opts.search_clip_len}/"
              f"threads={torch.get_num_threads()}")
    return [result(f"{prefix}/query_latency_median", 1e3 * statistics.median(times), "ms"),
            result(f"{prefix}/query_latency_min", 1e3 * min(times), "ms"),
            result(f"{prefix}/query_latency_max", 1e3 * max(times), "ms")]

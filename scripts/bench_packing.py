"""``model`` benchmark, packed vs padded F-TRM rows (issue 17; ``model/packing.py``).

Workloads (``--model_workloads``):

- ``vcmr_train_even`` / ``vcmr_train_tvr``: the ``HeroForVcmr`` training step (forward +
  backward, all three losses) on the even batch of :func:`scripts.bench_model.vcmr_batch` and
  on a TVR-like batch (``--pack_videos`` videos of 40-60 frames, 14-28 subtitle lines of
  log-normal length with median 10 tokens, 0-5 frames per line).
- ``vcmr_encode_tvr``: full-corpus VCMR encoding as ``eval/vcmr_ranking.py`` does it
  (``v_encoder(batch, "repr")``, eval mode, no grad) on TVR-like batches: videos/s.

Each runs the ``padded`` reference (upstream's computation), the ``packed`` path as used on CPU
(bucketed attention) and ``jagged`` (packed with nested-tensor SDPA, the CUDA default; on CPU
SDPA runs it row by row) on the same weights and batch, in alternating rounds of one iteration
each after one warm-up per variant; the figures are medians over ``--pack_iters`` rounds, peak
memory the largest over the rounds, and the share of F-TRM slots (subtitle rows and query rows)
that are padding.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from model.encoder import set_row_layout
from model.packing import Packing
from scripts import bench_model

PACK_WORKLOADS = bench_model.PACK_WORKLOADS
VARIANTS = {"padded": ("padded", None), "packed": ("packed", "bucket"),
            "jagged": ("packed", "jagged")}


def add_packing_arguments(parser) -> None:
    add = parser.add_argument
    add("--pack_videos", type=int, default=4, help="videos per TVR-like batch")
    add("--pack_iters", type=int, default=5, help="timed rounds (each variant once per round)")
    add("--pack_median_len", type=float, default=10.0, help="median subtitle line length")
    add("--pack_variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))


def _lognormal_len(gen, median: float) -> int:
    """Subtitle line length ~ LogNormal(log median, 0.6), clamped to [2, 120] tokens."""
    z = float(torch.randn(1, generator=gen))
    return int(min(120, max(2, round(median * float(torch.tensor(0.6 * z).exp())))))


def tvr_like_video(gen, opts, vocab: int):
    """A ``VideoFeatSubTokDataset`` 7-tuple of TVR's shape, built by the real
    ``segment_frames`` (a line without frames gets the masked zero frame)."""
    from data.data import segment_frames
    n = int(torch.randint(40, 61, (1,), generator=gen))
    k = int(torch.randint(14, 29, (1,), generator=gen))
    clip = torch.randn(n, opts.model_vfeat_dim, generator=gen)
    texts, frame_lists, start = [], [], 0
    for _ in range(k):
        count = int(torch.randint(0, 6, (1,), generator=gen))
        frame_lists.append(list(range(min(start, n), min(start + count, n))))
        start += count
        length = _lognormal_len(gen, opts.pack_median_len)
        texts.append(torch.tensor([2] + bench_model._tokens(gen, length - 1, vocab)))
    feats, masks = segment_frames(clip, frame_lists, [len(t) for t in texts])
    pairs = list(enumerate(frame_lists))
    return texts, feats, masks, clip, torch.ones(n, dtype=torch.long), k, pairs


def tvr_batch(opts, vocab: int, seed: int) -> dict:
    from data.vcmr import vcmr_collate
    gen = torch.Generator().manual_seed(seed)
    items = []
    for v in range(opts.pack_videos):
        video = tvr_like_video(gen, opts, vocab)
        n = video[3].size(0)
        ids = torch.tensor([0] + bench_model._tokens(gen, opts.model_query_len - 1, vocab))
        st = int(torch.randint(0, n - 1, (1,), generator=gen))
        query = (ids, torch.ones(len(ids), dtype=torch.long), f"v{v}",
                 torch.tensor([st, min(st + 5, n - 1)]))
        items.append((video, f"v{v}", (query,)))
    return vcmr_collate(items)


def padding_share(batch: dict) -> float:
    """Share of padding among all F-TRM slots of a step: subtitle rows plus query rows."""
    return Packing([batch["f_attn_masks"], batch["query_attn_masks"]]).padding_share


def make_step(workload: str, model, batch: dict, autocast):
    if workload == "vcmr_encode_tvr":
        model.eval()

        def encode():
            with torch.no_grad(), autocast():
                model.v_encoder(batch, "repr")
        return encode
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = sum(part.sum() for part in model(batch, "tvr"))
        loss.backward()
    return train_step


def alternate(step, model, device, memory, iters: int, variants) -> dict:
    """{variant: (median seconds, peak MiB)}, one iteration per variant per round."""
    times = {name: [] for name in variants}
    peaks = dict.fromkeys(variants, 0.0)
    for name in variants:                                   # one warm-up each
        set_row_layout(model, *VARIANTS[name])
        step()
    for _ in range(iters):
        for name in variants:
            set_row_layout(model, *VARIANTS[name])
            bench_model.sync(device)
            memory.reset()
            start = time.perf_counter()
            step()
            bench_model.sync(device)
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.read_mib())
    set_row_layout(model, "packed")
    return {name: (statistics.median(times[name]), peaks[name]) for name in variants}


def bench_packing_workload(workload, model, opts, device, precision) -> list:
    label = bench_model.device_label(device)
    vocab = model.config.f_config.vocab_size
    make = bench_model.vcmr_batch if workload == "vcmr_train_even" else tvr_batch
    batch = bench_model.to_device(make(opts, vocab, opts.model_seed), device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    memory = bench_model.PeakMemory(device)
    variants = list(dict.fromkeys(["padded"] + opts.pack_variants))
    result = alternate(make_step(workload, model, batch, autocast), model, device, memory,
                       max(1, opts.pack_iters), variants)
    fig, prefix = bench_model.figure, f"model/{workload}"
    out = [fig(f"{prefix}/{precision}/padding_share", padding_share(batch), "fraction", label)]
    for layout, (sec, mib) in result.items():
        tag = f"{prefix}/{layout}/{precision}"
        if workload == "vcmr_encode_tvr":
            out.append(fig(f"{tag}/videos_per_s", len(batch["num_subs"]) / sec, "videos/s",
                           label))
        out += [fig(f"{tag}/ms_per_iter", sec * 1e3, "ms", label),
                fig(f"{tag}/{memory.name}", mib, "MiB", label)]
    for name in variants[1:]:
        out.append(fig(f"{prefix}/{precision}/speedup_{name}_over_padded",
                       result["padded"][0] / result[name][0], "x", label))
    return out


def run_packing_bench(opts) -> list:
    """The ``--model_workloads`` of :data:`PACK_WORKLOADS`, on one VCMR model."""
    workloads = [w for w in opts.model_workloads if w in PACK_WORKLOADS]
    if not workloads:
        return []
    device, precision = bench_model.resolve_defaults(opts)
    model = bench_model.build_model("vcmr", opts, device)
    return [fig for w in workloads
            for fig in bench_packing_workload(w, model, opts, device, precision)]

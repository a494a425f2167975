"""``model`` benchmark: time, peak memory and FLOP rate of the HERO models (``benchmark.py``).

Workloads, each with every ``--model_attn_impls`` path (``sdpa`` fast, ``math`` reference):

- ``vcmr_train``: forward + backward of ``HeroForVcmr`` (``--vcmr_config``, finetune size) on a
  TVR-shaped batch built by the real ``vcmr_collate``: ``--model_videos`` videos of
  ``--model_frames`` frames, ``--model_subs`` subtitle segments of ``--model_sub_len`` tokens
  each, one query of ``--model_query_len`` tokens per video, all three losses on.
- ``tvc_train``: forward + backward of ``HeroForTvc`` (``--tvc_config``) with
  ``--model_caps`` captions of ``--model_cap_len`` tokens per video (``TvcTrainDataset.collate``).
- ``tvc_greedy_cached`` / ``tvc_greedy_full``: greedy decoding of ``--model_gen_steps`` tokens
  per clip with the key/value cache and with upstream's full recompute per step. The clip
  memory is encoded once beforehand, so only the decoding loop is timed.

Precision: fp32 on CPU, bf16 autocast on CUDA (``--model_precision`` overrides; ``fp16`` is
autocast float16, timed without a loss scaler since no update is applied). Memory is the
peak during the timed iterations: CUDA ``max_memory_allocated``; CPU the process peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` where the kernel allows it, else the
lifetime peak, flagged by the figure name ``peak_rss_lifetime``). FLOPs are counted once per
workload with ``torch.utils.flop_counter`` on the math path (the model's work, independent of
the kernel); that counted iteration is the first warm-up. Model FLOP utilisation (MFU) is
reported on CUDA against :data:`PEAK_TFLOPS`. Ratios compare paths measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from model.layers import set_attn_impl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOP/s by device-name fragment (first match wins), per precision.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H20", {"bf16": 148.0, "fp32": 44.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
)
TRAIN_WORKLOADS = ("vcmr_train", "tvc_train")
GREEDY_WORKLOADS = ("tvc_greedy_cached", "tvc_greedy_full")
PACK_WORKLOADS = ("vcmr_train_even", "vcmr_train_tvr", "vcmr_encode_tvr")  # bench_packing.py


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--vcmr_config", default=os.path.join(REPO, "config", "hero_finetune.json"))
    add("--tvc_config", default=os.path.join(REPO, "config", "hero_tvc.json"))
    workloads = TRAIN_WORKLOADS + GREEDY_WORKLOADS + PACK_WORKLOADS
    add("--model_workloads", nargs="+", default=list(workloads), choices=workloads)
    add("--model_attn_impls", nargs="+", default=["sdpa", "math"], choices=["sdpa", "math"])
    add("--model_device", default=None, help="cpu or cuda (default: cuda when available)")
    add("--model_precision", default=None, choices=["fp32", "bf16", "fp16"],
        help="default: bf16 autocast on CUDA, fp32 on CPU (fp16: autocast, no loss scaling: "
             "the step is timed, not applied)")
    add("--model_videos", type=int, default=None, help="videos per batch (default 8 CUDA, 2 CPU)")
    add("--model_frames", type=int, default=60, help="frames per video")
    add("--model_subs", type=int, default=10, help="subtitle segments per video")
    add("--model_sub_len", type=int, default=20, help="tokens per subtitle segment")
    add("--model_query_len", type=int, default=15, help="tokens per VCMR query")
    add("--model_caps", type=int, default=2, help="TVC captions per video")
    add("--model_cap_len", type=int, default=20, help="tokens per TVC caption")
    add("--model_gen_steps", type=int, default=None, help="greedy steps (default 30 CUDA, 10 CPU)")
    add("--model_vfeat_dim", type=int, default=4352)
    add("--model_iters", type=int, default=None, help="timed iterations (default 10 CUDA, 1 CPU)")
    add("--model_warmup", type=int, default=1, help="untimed iterations first (>= 1)")
    add("--model_seed", type=int, default=0)


def resolve_defaults(opts) -> tuple[torch.device, str]:
    """Fill the device-dependent defaults in ``opts``; returns (device, precision)."""
    name = opts.model_device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--model_device cuda requested but torch.cuda.is_available() is False")
    gpu = device.type == "cuda"
    opts.model_videos = opts.model_videos or (8 if gpu else 2)
    opts.model_gen_steps = opts.model_gen_steps or (30 if gpu else 10)
    opts.model_iters = opts.model_iters or (10 if gpu else 1)
    opts.model_warmup = max(1, opts.model_warmup)
    return device, opts.model_precision or ("bf16" if gpu else "fp32")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores)"


def peak_tflops(label: str, precision: str) -> float | None:
    """Dense peak of the device; fp16 tensor cores peak as bf16 on every GPU listed."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in label:
            return peaks["bf16" if precision == "fp16" else precision]
    return None


# ---------------------------------------------------------------------------------------------
# synthetic batches through the project's real collates
# ---------------------------------------------------------------------------------------------
def _tokens(gen, n: int, vocab: int) -> list[int]:
    return torch.randint(4, max(5, min(vocab, 50261)), (n,), generator=gen).tolist()


def synthetic_video(gen, opts, vocab: int):
    """A ``VideoFeatSubTokDataset`` 7-tuple: frames split evenly over the segments, segment
    text ``</s>`` + tokens (length drawn around ``--model_sub_len`` for realistic padding)."""
    n, k = opts.model_frames, max(1, min(opts.model_subs, opts.model_frames))
    clip = torch.randn(n, opts.model_vfeat_dim, generator=gen)
    seg_ids, seg_feats, seg_masks, pairs = [], [], [], []
    lo = max(2, opts.model_sub_len // 2)
    for i in range(k):
        frames = list(range(i * n // k, (i + 1) * n // k))
        length = int(torch.randint(lo, max(lo + 1, opts.model_sub_len * 3 // 2), (1,),
                                   generator=gen))
        text = torch.tensor([2] + _tokens(gen, length - 1, vocab))
        seg_ids.append(text)
        seg_feats.append(clip[frames])
        seg_masks.append(torch.ones(len(frames) + len(text), dtype=torch.long))
        pairs.append((i, frames))
    return seg_ids, seg_feats, seg_masks, clip, torch.ones(n, dtype=torch.long), k, pairs


def vcmr_batch(opts, vocab: int, seed: int) -> dict:
    from data.vcmr import vcmr_collate
    gen = torch.Generator().manual_seed(seed)
    items = []
    for v in range(opts.model_videos):
        ids = torch.tensor([0] + _tokens(gen, opts.model_query_len - 1, vocab))
        st = int(torch.randint(0, opts.model_frames - 1, (1,), generator=gen))
        target = torch.tensor([st, min(st + 5, opts.model_frames - 1)])
        query = (ids, torch.ones(len(ids), dtype=torch.long), f"v{v}", target)
        items.append((synthetic_video(gen, opts, vocab), f"v{v}", (query,)))
    return vcmr_collate(items)


def tvc_batch(opts, vocab: int, seed: int) -> dict:
    from data.tvc import TvcTrainDataset
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(opts.model_videos):
        caps = [_tokens(gen, opts.model_cap_len, vocab) for _ in range(opts.model_caps)]
        ranges = []
        for _ in caps:
            st = int(torch.randint(0, opts.model_frames - 1, (1,), generator=gen))
            ranges.append((st, min(st + 1 + opts.model_frames // 6, opts.model_frames)))
        items.append((synthetic_video(gen, opts, vocab),
                      [torch.tensor([0] + c) for c in caps], [torch.tensor(c + [2]) for c in caps],
                      [torch.ones(ed - st, dtype=torch.long) for st, ed in ranges], ranges))
    return TvcTrainDataset.collate(items)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------
def build_model(kind: str, opts, device: torch.device):
    """Finetune-size model with random weights (the timings do not depend on the values)."""
    from model import HeroForTvc, HeroForVcmr
    torch.manual_seed(opts.model_seed)
    if kind == "vcmr":
        model = HeroForVcmr(opts.vcmr_config, vfeat_dim=opts.model_vfeat_dim, lw_neg_ctx=8.0,
                            lw_neg_q=8.0, lw_st_ed=0.01, use_hard_negative=True)
    else:
        model = HeroForTvc(opts.tvc_config, vfeat_dim=opts.model_vfeat_dim)
    return model.to(device)


def make_step(workload: str, model, batch: dict, opts, autocast):
    """A zero-argument callable running one iteration of ``workload``."""
    if workload in TRAIN_WORKLOADS:
        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            with autocast():
                if workload == "vcmr_train":
                    loss = sum(part.sum() for part in model(batch, "tvr"))
                else:
                    loss = model(batch).mean()
            loss.backward()
        return train_step
    model.eval()
    use_cache = workload == "tvc_greedy_cached"
    with torch.no_grad(), autocast():
        memory, mask = model.encode(batch)

    def greedy_step():
        with torch.no_grad(), autocast():
            model.greedy_from_memory(memory, mask, opts.model_gen_steps, use_cache=use_cache)
    return greedy_step


class PeakMemory:
    """Peak memory since :meth:`reset`: CUDA allocator peak, or CPU peak RSS (VmHWM)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.name = "peak_mem_allocated" if device.type == "cuda" else "peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.name = "peak_rss_lifetime"

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        self.name = "peak_rss_lifetime"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step, model) -> int:
    """FLOPs of one iteration on the math attention path (the model's work)."""
    impls = {m: m.attn_impl for m in model.modules() if hasattr(m, "attn_impl")}
    set_attn_impl(model, "math")
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        for mod, impl in impls.items():
            mod.attn_impl = impl
    return counter.get_total_flops()


def time_step(step, opts, device, memory: PeakMemory, desc: str,
              warmup: int) -> tuple[float, float]:
    """(seconds per iteration, peak MiB) over ``--model_iters`` after ``warmup`` iterations."""
    for _ in range(warmup):
        step()
    sync(device)
    memory.reset()
    start = time.perf_counter()
    for _ in tqdm(range(opts.model_iters), desc=desc, leave=False):
        step()
    sync(device)
    return (time.perf_counter() - start) / opts.model_iters, memory.read_mib()


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def figure(name: str, value: float, unit: str, device: str) -> dict:
    return {"figure": name, "value": round(float(value), 4), "unit": unit, "device": device}


def bench_workload(workload, model, batch, opts, device, precision) -> tuple[list, dict]:
    """Figures of one workload for every attention path; also returns {impl: seconds}."""
    label = device_label(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=dtype)
    step = make_step(workload, model, batch, opts, autocast)
    flops = count_flops(step, model)
    peak = peak_tflops(label, precision) if device.type == "cuda" else None
    prefix = f"model/{workload}"
    out = [figure(f"{prefix}/{precision}/gflop_per_iter", flops / 1e9, "GFLOP", label)]
    memory, seconds = PeakMemory(device), {}
    for i, impl in enumerate(opts.model_attn_impls):
        set_attn_impl(model, impl)
        warmup = opts.model_warmup - (i == 0)              # the FLOP count warmed up the first
        sec, mib = time_step(step, opts, device, memory, f"{workload} {impl}", warmup)
        seconds[impl] = sec
        tag = f"{prefix}/{impl}/{precision}"
        out += [figure(f"{tag}/ms_per_iter", sec * 1e3, "ms", label),
                figure(f"{tag}/{memory.name}", mib, "MiB", label),
                figure(f"{tag}/achieved_tflops", flops / sec / 1e12, "TFLOP/s", label)]
        if peak:
            out.append(figure(f"{tag}/mfu", 100 * flops / sec / 1e12 / peak, "%", label))
    if {"sdpa", "math"} <= seconds.keys():
        out.append(figure(f"{prefix}/{precision}/speedup_sdpa_over_math",
                          seconds["math"] / seconds["sdpa"], "x", label))
    return out, seconds


def run_model_bench(opts) -> list:
    """Every requested workload; one model per family (VCMR, TVC) alive at a time."""
    device, precision = resolve_defaults(opts)
    label = device_label(device)
    results, greedy, cached = [], {}, (None, None)
    for workload in opts.model_workloads:
        if workload in PACK_WORKLOADS:
            continue
        kind = "vcmr" if workload == "vcmr_train" else "tvc"
        if cached[0] != kind:
            cached = (None, None)
            cached = (kind, build_model(kind, opts, device))
        model = cached[1]
        vocab = model.config.f_config.vocab_size
        make = vcmr_batch if kind == "vcmr" else tvc_batch
        batch = to_device(make(opts, vocab, opts.model_seed), device)
        figures, seconds = bench_workload(workload, model, batch, opts, device, precision)
        results += figures
        if workload in GREEDY_WORKLOADS:
            greedy[workload] = seconds
    if len(greedy) == 2:
        for impl in opts.model_attn_impls:
            ratio = greedy["tvc_greedy_full"][impl] / greedy["tvc_greedy_cached"][impl]
            results.append(figure(f"model/tvc_greedy/{impl}/{precision}/speedup_cached_over_full",
                                  ratio, "x", label))
    if not all(math.isfinite(r["value"]) for r in results):
        raise RuntimeError(f"non-finite benchmark figure: {results}")
    return results

"""``scripts/benchmark.py tvc``: TVC inference speed and QA / VIOLIN evaluation speed.

On a corpus (``--corpus``, or the toy ``demo`` corpus built on the fly) with randomly
initialised models:

- ``tvc/decode_{cached,full_recompute}/captions_per_s``: :func:`eval.captioning.decode_tvc`
  (what ``inf_tvc.py`` runs: greedy decoding of ``--tvc_gen_steps`` tokens per clip plus
  detokenisation) over the clips of ``txt_db/tvc_val_release.jsonl``, with the key/value cache
  and with upstream's full decoder recompute per step. Batches are collated and moved to the
  device beforehand, so only decoding is timed, after one warm-up batch per path.
  ``tvc/cache_speedup`` is their ratio (goal >= 3) and ``tvc/cached_equals_full`` the fraction
  of clips whose captions agree (1.0 expected in fp32; reduced precision may flip near-ties).
- ``qa/tvqa_val/ex_per_s`` and ``qa/violin_test/ex_per_s``: ``valid/*ex_per_s`` of
  :func:`eval.qa.validate_videoQA` / :func:`eval.qa.validate_violin` over the real eval loaders
  (loading included, as upstream logs it), second of two passes.

Precision (``--tvc_precision``): fp16 autocast on CUDA (``inf_tvc``'s default), fp32 on CPU.
"""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_OPTS = dict(max_clip_len=100, vfeat_version="resnet_slowfast", compressed_db=False,
                 sub_ctx_len=0, task="tvqa")


def add_arguments(parser) -> None:
    parser.add_argument("--tvc_config", default=os.path.join(REPO, "config", "hero_tvc.json"),
                        help="model config of the TVC model (random weights)")
    parser.add_argument("--qa_config", default=os.path.join(REPO, "config",
                                                            "hero_finetune.json"),
                        help="model config of the QA / VIOLIN models (random weights)")
    parser.add_argument("--toker", default=None, help="local RoBERTa tokenizer folder "
                        "(default: the toy corpus's, when it is built here)")
    parser.add_argument("--tvc_batch_size", type=int, default=8, help="videos per batch")
    parser.add_argument("--tvc_gen_steps", type=int, default=30, help="greedy steps")
    parser.add_argument("--tvc_max_batches", type=int, default=20, help="timed batches")
    parser.add_argument("--qa_batch_size", type=int, default=10, help="questions per batch")
    parser.add_argument("--tvc_precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: fp16 on CUDA, fp32 on CPU")


def _device_precision(opts):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = opts.tvc_precision or ("fp16" if device.type == "cuda" else "fp32")
    return device, precision


def _random_model(model_cls, config_path, device):
    with open(config_path) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    return model_cls.from_pretrained(cfg, {}).to(device).eval()


def _video_db(root, name, sub_db, **overrides):
    from data.data import load_video_sub_dataset
    opts = SimpleNamespace(**{**DATA_OPTS, **overrides})
    return load_video_sub_dataset(os.path.join(root, "video_db", name),
                                  os.path.join(root, "txt_db", sub_db), 1.5, opts)


def _toker_dir(opts, root):
    toker = opts.toker or os.path.join(os.path.dirname(root), "raw", "tokenizer")
    if not os.path.isdir(toker):
        raise FileNotFoundError(f"tokenizer folder {toker} not found: pass --toker")
    return toker


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decoding(opts, root, device, precision, result):
    """Captions/s of decode_tvc with and without the key/value cache."""
    from data.loader import move_to_device
    from data.tvc import TvcEvalDataset
    from eval.captioning import decode_tvc
    from model.tvc import HeroForTvc
    from utils.tokenizer import load_toker

    toker = load_toker(_toker_dir(opts, root))
    dataset = TvcEvalDataset(_video_db(root, "tv", "tv_subtitles.db", sub_ctx_len=1),
                             os.path.join(root, "txt_db", "tvc_val_release.jsonl"))
    loader = DataLoader(dataset, batch_size=opts.tvc_batch_size, collate_fn=dataset.collate)
    batches = [move_to_device(b, device) for _, b in zip(range(opts.tvc_max_batches), loader)]
    model = _random_model(HeroForTvc, opts.tvc_config, device)
    amp = dict(fp16=precision == "fp16", bf16=precision == "bf16")
    speed, captions = {}, {}
    for name, use_cache in (("cached", True), ("full_recompute", False)):
        decode_tvc(model, batches[:1], toker, opts.tvc_gen_steps, use_cache=use_cache, **amp)
        _sync(device)
        start = time.perf_counter()
        captions[name] = decode_tvc(model, batches, toker, opts.tvc_gen_steps,
                                    use_cache=use_cache, **amp)
        _sync(device)
        speed[name] = len(captions[name]) / (time.perf_counter() - start)
    same = sum(a == b for a, b in zip(captions["cached"], captions["full_recompute"]))
    tag = f"tvc/{precision}/bs={opts.tvc_batch_size}/steps={opts.tvc_gen_steps}"
    return [result(f"{tag}/decode_cached/captions_per_s", speed["cached"], "captions/s"),
            result(f"{tag}/decode_full_recompute/captions_per_s", speed["full_recompute"],
                   "captions/s"),
            result(f"{tag}/cache_speedup", speed["cached"] / speed["full_recompute"], "x"),
            result(f"{tag}/cached_equals_full", same / max(len(captions["cached"]), 1),
                   "fraction")]


def bench_qa(opts, root, device, precision, result):
    """Examples/s of TVQA (val) and VIOLIN (test) validation."""
    from data.txt_db import QaQueryTokLmdb
    from data.vcmr import get_video_ids
    from data.videoQA import VideoQaEvalDataset, video_qa_eval_collate
    from data.violin import ViolinEvalDataset, violin_eval_collate
    from eval.qa import validate_videoQA, validate_violin
    from model.videoQA import HeroForVideoQA
    from model.violin import HeroForViolin

    amp = dict(fp16=precision == "fp16", bf16=precision == "bf16")
    setups = (
        ("tvqa_val", "tv", "tv_subtitles.db", {}, VideoQaEvalDataset, video_qa_eval_collate,
         HeroForVideoQA, lambda m, ld: validate_videoQA(m, ld, "tvqa", **amp)[0]["valid/ex_per_s"]),
        ("violin_test", "violin", "violin_subtitles.db",
         dict(compressed_db=True, sub_ctx_len=2, task="violin"), ViolinEvalDataset,
         violin_eval_collate, HeroForViolin,
         lambda m, ld: validate_violin(m, ld, "test", **amp)[0]["valid/test_ex_per_s"]),
    )
    out = []
    for db, vdb, sub_db, overrides, dataset_cls, collate, model_cls, validate in setups:
        query_path = os.path.join(root, "txt_db", f"{db}.db")
        dataset = dataset_cls(get_video_ids(query_path), _video_db(root, vdb, sub_db,
                                                                   **overrides),
                              QaQueryTokLmdb(query_path, -1))
        loader = DataLoader(dataset, batch_size=opts.qa_batch_size, collate_fn=collate)
        model = _random_model(model_cls, opts.qa_config, device)
        validate(model, loader)  # warm-up pass
        out.append(result(f"qa/{db}/{precision}/bs={opts.qa_batch_size}/ex_per_s",
                          validate(model, loader), "examples/s"))
    return out


def bench_tvc(opts, corpus_dir, result) -> list:
    """Run both benchmarks on ``corpus_dir(opts.corpus)`` (see the module docstring)."""
    device, precision = _device_precision(opts)
    with corpus_dir(opts.corpus) as root:
        root = os.path.abspath(root)
        return (bench_decoding(opts, root, device, precision, result)
                + bench_qa(opts, root, device, precision, result))

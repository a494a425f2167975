"""The ``model`` benchmark sub-command at the smallest sizes: well-formed figures, not timings."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch
from helpers_model import small_config

from scripts import bench_model, benchmark

ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = ("vcmr_train", "tvc_train", "tvc_greedy_cached", "tvc_greedy_full")


def tiny_configs(tmp_path):
    paths = {}
    for name, d_layers in (("vcmr", 0), ("tvc", 1)):
        cfg = small_config(hidden=16, heads=2, f_layers=1, c_layers=1, vocab=40,
                           d_layers=d_layers)
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(cfg))
    return paths


def test_model_benchmark_returns_well_formed_figures(tmp_path, capsys):
    paths = tiny_configs(tmp_path)
    opts = benchmark.parse_args([
        "model", "--vcmr_config", str(paths["vcmr"]), "--tvc_config", str(paths["tvc"]),
        "--model_device", "cpu", "--model_videos", "2", "--model_frames", "6",
        "--model_subs", "2", "--model_sub_len", "4", "--model_query_len", "3",
        "--model_caps", "2", "--model_cap_len", "3", "--model_gen_steps", "3",
        "--model_vfeat_dim", "8", "--model_iters", "1", "--model_warmup", "1"])
    results = benchmark.BENCHMARKS["model"].run(opts)
    names = [r["figure"] for r in results]
    assert len(names) == len(set(names))
    for r in results:
        assert set(r) == {"figure", "value", "unit", "device"}
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] >= 0
        assert r["device"].startswith("cpu")
    by_name = {r["figure"]: r for r in results}
    for workload in WORKLOADS:
        assert by_name[f"model/{workload}/fp32/gflop_per_iter"]["value"] > 0
        assert by_name[f"model/{workload}/fp32/speedup_sdpa_over_math"]["unit"] == "x"
        for impl in ("sdpa", "math"):
            tag = f"model/{workload}/{impl}/fp32"
            assert by_name[f"{tag}/ms_per_iter"]["unit"] == "ms"
            assert by_name[f"{tag}/achieved_tflops"]["unit"] == "TFLOP/s"
            memory = [n for n in names if n.startswith(f"{tag}/peak_rss")]
            assert len(memory) == 1 and by_name[memory[0]]["value"] > 0
            assert f"{tag}/mfu" not in by_name                   # MFU only on CUDA
    for impl in ("sdpa", "math"):
        assert f"model/tvc_greedy/{impl}/fp32/speedup_cached_over_full" in by_name
    full = by_name["model/tvc_greedy_full/fp32/gflop_per_iter"]["value"]
    assert full > by_name["model/tvc_greedy_cached/fp32/gflop_per_iter"]["value"]
    benchmark.main(["model", "--vcmr_config", str(paths["vcmr"]), "--model_device", "cpu",
                    "--model_workloads", "vcmr_train", "--model_attn_impls", "math",
                    "--model_frames", "4", "--model_subs", "1", "--model_vfeat_dim", "8",
                    "--model_iters", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["figure"] for line in lines} >= {"model/vcmr_train/math/fp32/ms_per_iter"}


def test_peak_tflops_table_and_flop_count():
    assert bench_model.peak_tflops("cuda:0 NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert bench_model.peak_tflops("cuda:0 NVIDIA H100 PCIe", "bf16") == 756.0
    assert bench_model.peak_tflops("cuda:0 Some Unknown GPU", "bf16") is None
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert bench_model.count_flops(lambda: lin(x), lin) == 2 * 5 * 4 * 3


def test_train_benchmark_times_identical_work_and_reports_rounds(tmp_path, toy_dbs):
    """Both paths must produce the same losses each round, or the overhead ratio is void."""
    cfg = json.loads((ROOT / "config" / "pretrain-demo.json").read_text())
    cfg["targets"][0]["splits"][0].update(tasks=["mlm", "vsm"], ratio=[1, 3])
    # timing starts at update 9 (warm-up 1 + loop 2x3 + untimed pass 2): the span loss and
    # its random skips switch on at the first timed update, hard negatives at the second
    cfg.update(train_batch_size=2, n_workers=0, drop_svmr_prob=0.5, train_span_start_step=9,
               hard_negtiave_start_step=[10])
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(cfg))
    opts = benchmark.parse_args([
        "train", "--corpus", str(toy_dbs), "--train_config", str(path), "--train_steps", "2",
        "--train_rounds", "3", "--train_warmup", "1", "--train_workers", "0"])
    by_name = {r["figure"].rsplit("bs=2/", 1)[1]: r
               for r in benchmark.BENCHMARKS["train"].run(opts)}
    assert set(by_name) == {"loop/steps_per_s", "loop/samples_per_s", "pure/ms_per_step",
                            "engine/ms_per_step", "engine_overhead", "engine_overhead_cpu",
                            "engine_overhead_direct", "same_work"}
    assert by_name["same_work"]["value"] == 1.0
    for key in ("pure/ms_per_step", "engine/ms_per_step", "engine_overhead",
                "engine_overhead_cpu", "engine_overhead_direct"):
        rounds = by_name[key]["rounds"]
        assert len(rounds) == 3 and all(math.isfinite(v) for v in rounds)
        assert math.isclose(by_name[key]["value"], statistics.median(rounds), abs_tol=1e-3)
    pure, engine = by_name["pure/ms_per_step"]["rounds"], by_name["engine/ms_per_step"]["rounds"]
    for p, e, ratio in zip(pure, engine, by_name["engine_overhead"]["rounds"]):
        assert p > 0 and math.isclose(e / p - 1, ratio, abs_tol=1e-3)
    assert all(0 < v < 1 for v in by_name["engine_overhead_direct"]["rounds"])

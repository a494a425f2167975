"""Shared by the VCMR and VR training tests: demo configs pointed at the toy databases, and
retrieval measured on the *training* queries before and after a short run (the tiny val split
holds two videos, too few to show learning)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
DEMO_DBS = "demo_output/dbs"


def write_config(tmp_path, demo_config: str, dbs: Path, **overrides) -> Path:
    """The demo config with its ``demo_output/dbs`` paths moved to ``dbs``."""
    cfg = json.loads((ROOT / "config" / demo_config).read_text())
    for key, value in cfg.items():
        if isinstance(value, str) and value.startswith(DEMO_DBS):
            cfg[key] = str(dbs) + value[len(DEMO_DBS):]
    cfg.update(checkpoint=None, n_workers=0, **overrides)
    path = tmp_path / demo_config
    path.write_text(json.dumps(cfg))
    return path


def train_query_eval(task, model, collate, validate) -> dict:
    """Full-corpus evaluation (``validate``) of the training queries over the training videos."""
    dataset = task.make_dataset("full_eval", task.opts.train_query_txt_db, distributed=False)
    loader = DataLoader(dataset, batch_size=16, collate_fn=collate)
    model.eval()
    return validate(model, loader, "train", task.opts)[0]


def train_and_compare(script, task_cls, argv, collate, validate):
    """``(opts, trained model, metrics before, metrics after)`` of ``script.main(argv)``; the
    "before" model is built from the run's seed, as the run builds its own."""
    opts = script.parse_args(argv)
    task = task_cls(opts)
    torch.manual_seed(opts.seed)
    before = train_query_eval(task, task.build_model(), collate, validate)
    model = script.main(argv)
    return opts, model, before, train_query_eval(task, model, collate, validate)

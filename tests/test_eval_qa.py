"""validate_videoQA / validate_violin (eval/qa.py) on hand-made logits with known answers.

A stub model returns the batch's own ``logits``, so accuracy, loss, predictions and the
gathered dicts can be checked exactly; a 2-process gloo run checks the cross-rank sums.
"""
from __future__ import annotations

import logging
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from eval.qa import QaEvalError, validate_videoQA, validate_violin

LOG = math.log
HIGH, LOW = LOG(0.5), LOG(0.125)


class EchoModel(nn.Module):
    """Returns ``batch['logits']``; records the task it was called with."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tasks, self.modes = [], []

    def forward(self, batch, task, compute_loss=True):
        assert compute_loss is False
        self.tasks.append(task)
        self.modes.append(self.training)
        return batch["logits"]


def qa_batch(qids, logits, targets):
    return {"qids": qids, "logits": torch.tensor(logits),
            "targets": torch.tensor(targets).view(-1, 1)}


def row(best):
    return [HIGH if k == best else LOW for k in range(5)]


QA_BATCHES = [qa_batch(["q1", "q2"], [row(0), row(1)], [0, 3]),
              qa_batch(["q3"], [row(1)], [1])]


def test_videoqa_accuracy_loss_and_predictions():
    model = EchoModel()
    val_log, results, logits = validate_videoQA(model, QA_BATCHES, "how2qa", save_logits=True)
    assert model.tasks == ["how2qa", "how2qa"]
    assert set(val_log) == {"valid/loss", "valid/acc", "valid/ex_per_s"}
    assert val_log["valid/acc"] == pytest.approx(2 / 3)
    # CE: q1 -log .5, q2 -log .125, q3 -log .5
    assert val_log["valid/loss"] == pytest.approx((LOG(2) + LOG(8) + LOG(2)) / 3)
    assert val_log["valid/ex_per_s"] > 0
    assert results == {"q1": 0, "q2": 1, "q3": 1}
    assert all(isinstance(v, int) for v in results.values())
    assert logits["q2"] == pytest.approx(row(1))


def test_videoqa_without_logits_returns_none_and_restores_train_mode():
    model = EchoModel().train()
    _, _, logits = validate_videoQA(model, QA_BATCHES)
    assert logits is None
    assert model.modes == [False, False] and model.training


def test_videoqa_unlabelled_split_gives_predictions_only(caplog):
    batches = [qa_batch(["t1", "t2"], [row(4), row(2)], [-1, -1])]
    with caplog.at_level(logging.INFO, logger="eval.qa"):
        val_log, results, _ = validate_videoQA(EchoModel(), batches)
    assert set(val_log) == {"valid/ex_per_s"}
    assert results == {"t1": 4, "t2": 2}
    assert "2 of 2 tvqa questions have no label" in caplog.text


def test_videoqa_mixed_labels_score_the_labelled_only():
    batches = [qa_batch(["a", "b", "c"], [row(0), row(1), row(2)], [0, -1, 1])]
    val_log, results, _ = validate_videoQA(EchoModel(), batches)
    assert val_log["valid/acc"] == pytest.approx(0.5)
    assert val_log["valid/loss"] == pytest.approx((LOG(2) + LOG(8)) / 2)
    assert len(results) == 3


@pytest.mark.parametrize("bad", [5, -2])
def test_videoqa_target_out_of_range_names_question(bad):
    batches = [qa_batch(["ok", "bad_q"], [row(0), row(0)], [0, bad])]
    with pytest.raises(QaEvalError, match=f"question bad_q: target {bad} is outside the 5"):
        validate_videoQA(EchoModel(), batches)


def violin_batch(qids, logits, targets):
    return {"qids": qids, "logits": torch.tensor(logits).view(-1, 1),
            "targets": torch.tensor(targets).view(-1, 1)}


def test_violin_accuracy_loss_and_keys():
    batches = [violin_batch(["s-1", "s-0"], [2.0, -1.0], [1, 1]),
               violin_batch(["u-1"], [0.0], [0])]
    val_log, results, logits = validate_violin(EchoModel(), batches, "val", save_logits=True)
    assert set(val_log) == {"valid/val_loss", "valid/val_acc", "valid/val_ex_per_s"}
    # sigmoid(0) = 0.5 is not > 0.5 -> predicted 0 (correct for u-1)
    assert results == {"s-1": 1, "s-0": 0, "u-1": 0}
    assert val_log["valid/val_acc"] == pytest.approx(2 / 3)
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -(LOG(sig(2.0)) + LOG(sig(-1.0)) + LOG(0.5)) / 3
    assert val_log["valid/val_loss"] == pytest.approx(expected, rel=1e-6)
    assert logits == {"s-1": [2.0], "s-0": [-1.0], "u-1": [0.0]}


def test_violin_label_not_binary_is_error():
    with pytest.raises(QaEvalError, match="statement x-1: target 2"):
        validate_violin(EchoModel(), [violin_batch(["x-1"], [1.0], [2])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard = QA_BATCHES[rank:rank + 1]  # rank 0: q1, q2; rank 1: q3
        out[rank] = validate_videoQA(EchoModel(), shard, save_logits=True)
    finally:
        dist.destroy_process_group()


def test_sums_and_predictions_are_gathered_across_ranks():
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(_rank_main, args=(_free_port(), shared), nprocs=2, join=True,
                           start_method="fork")
        out = dict(shared)
    single = validate_videoQA(EchoModel(), QA_BATCHES, save_logits=True)
    for rank in (0, 1):
        val_log, results, logits = out[rank]
        assert val_log["valid/acc"] == pytest.approx(single[0]["valid/acc"])
        assert val_log["valid/loss"] == pytest.approx(single[0]["valid/loss"])
        assert results == single[1]
        assert logits.keys() == single[2].keys()

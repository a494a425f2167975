"""Logging for training runs: a readable ``log/log.txt``, TensorBoard scalars, running meters.

Only rank 0 writes (training.md §3.11); other ranks get a logger at WARNING level and a
TensorBoard writer that does nothing, so call sites need no rank checks.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from utils.distributed import get_rank

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s -   %(message)s"
DATE_FORMAT = "%m/%d/%Y %H:%M:%S"
LOGGER = logging.getLogger("hero")


def console_logging() -> None:
    """Console logging in upstream's format, unless the process configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format=LOG_FORMAT, datefmt=DATE_FORMAT, level=logging.INFO)


def setup_logging(log_dir=None, rank: int | None = None) -> logging.Logger:
    """Configure the ``hero`` logger (console, and ``log_dir/log.txt`` on rank 0)."""
    rank = get_rank() if rank is None else rank
    root = logging.getLogger()
    console_logging()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and log_dir is not None:
        path = Path(log_dir) / "log.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve())
                   for h in root.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
            root.addHandler(handler)
    return LOGGER


class TbLogger:
    """TensorBoard scalars on rank 0; a no-op elsewhere or before :meth:`open`."""

    def __init__(self):
        self._writer = None
        self.step = 0

    def open(self, log_dir) -> None:
        if get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(log_dir))

    def set_step(self, step: int) -> None:
        self.step = step

    def add_scalar(self, key: str, value, step: int | None = None) -> None:
        if self._writer is not None:
            self._writer.add_scalar(key, float(value), self.step if step is None else step)

    def log_dict(self, values: dict, prefix: str = "", step: int | None = None) -> None:
        for key, value in values.items():
            self.add_scalar(f"{prefix}{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


TB_LOGGER = TbLogger()


class JsonlLogger:
    """``log/metrics.jsonl`` on rank 0: one JSON object per update and per validation.

    Why: TensorBoard only gets the running meters (smoothing 0.99), which barely move over the
    few hundred updates of a demo run; this file keeps the raw per-update loss and every
    validation metric in a form ``scripts/make_report.py`` reads without TensorBoard. Appended
    to, so a resumed run continues it (readers keep the last record per step).
    """

    def __init__(self):
        self._file = None

    def open(self, log_dir) -> None:
        if get_rank() == 0:
            self._file = open(Path(log_dir) / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, **record) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=float) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


METRICS_LOG = JsonlLogger()


class RunningMeter:
    """Exponential moving average of a logged quantity (upstream smoothing 0.99)."""

    def __init__(self, name: str, smooth: float = 0.99):
        self.name = name
        self.smooth = smooth
        self.val = None

    def __call__(self, value: float) -> None:
        value = float(value)
        self.val = value if self.val is None else \
            value * (1 - self.smooth) + self.val * self.smooth

    def state_dict(self) -> dict:
        return {"name": self.name, "smooth": self.smooth, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.val = state["val"]

"""The parse-and-run tail shared by the training entry scripts.

Each script keeps its own ``parse_args(argv)`` and ``main(argv)`` (tests and tools import them
by those names); these helpers are their bodies, so the engine flags and the Trainer wiring are
written once.
"""
from __future__ import annotations

from config.config import SharedConfigs
from utils.engine import Trainer, add_run_args


def parse_task_args(description: str, get_args, argv=None, *,
                    empty_checkpoint_is_none: bool = False):
    """Options from ``get_args`` (a ``SharedConfigs.get_*_args``) with the engine's run flags.

    ``empty_checkpoint_is_none`` turns ``--checkpoint ""`` into None ("start from scratch"), as
    the QA scripts do; VCMR/VR/pretraining keep the string and handle it themselves.
    """
    cfg = SharedConfigs(description)
    add_run_args(cfg.parser)
    opts = get_args(cfg, argv)
    if empty_checkpoint_is_none:
        opts.checkpoint = opts.checkpoint or None
    return opts


def run_training(task_cls, parse_args, argv=None):
    """``parse_args(argv)``, then train ``task_cls(opts)`` with the engine; returns its model."""
    opts = parse_args(argv)
    return Trainer(task_cls(opts), opts).run()

"""Session-wide fixtures: the tiny toy corpus and the databases built from it.

Both are made once per test session in a temporary folder: ``toy_raw`` with
``scripts/make_toy_corpus.py``'s generator (seed 0, size tiny), ``toy_dbs`` by running the real
``scripts/build_toy_dbs.sh`` on it (its ``txt_db/`` and ``video_db/`` as released upstream).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOY_SEED = 3  # its tiny TVR splits hold every query type (v, vt, t), which tests rely on


@pytest.fixture(scope="session")
def toy_raw(tmp_path_factory) -> Path:
    from scripts.toy.build import make_corpus

    return make_corpus(tmp_path_factory.mktemp("toy") / "raw", seed=TOY_SEED, size="tiny")


@pytest.fixture(scope="session")
def toy_dbs(toy_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy_dbs") / "dbs"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_toy_dbs.sh"), str(toy_raw),
                           str(out)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"build_toy_dbs.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return out


@pytest.fixture(autouse=True)
def _stop_signal_handlers_restored():
    """Code run in-process must leave SIGTERM/SIGINT as it found them: a Python handler left
    behind is inherited by every process forked later (multiprocessing pools), whose
    ``terminate()`` then waits forever on workers that no longer die of SIGTERM."""
    import signal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    after = {s: signal.getsignal(s) for s in before}
    assert after == before, f"signal handlers changed by this test: {before} -> {after}"

"""``--toker`` as a Hugging Face model name (issue 14, item 2), without network.

The toy tokenizer is filed under ``roberta-base`` in a hub cache laid out as huggingface_hub
writes it (scripts/toy/hub_cache.py); subprocesses run with ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE`` pointing at it, in-process tests set the same variables with monkeypatch.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import inf_tvc
import train_tvc
from scripts.toy.hub_cache import install
from utils.engine import check_required_paths
from utils.tokenizer import TokenizerError, load_toker, resolve_toker

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "huggingface-cli download {} vocab.json merges.txt"
# meta.json keys that name the inputs as given on the command line (data.md §3.1)
ARG_KEYS = ("annotation", "subtitles", "vid2nframe", "output", "toker", "tokenizer")


@pytest.fixture(scope="module")
def hub_cache(toy_raw, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    install(toy_raw / "tokenizer", cache, "roberta-base")
    return cache


def hub_env(cache, **extra) -> dict:
    """Subprocess environment: offline, the given hub cache, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return dict(env, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                PYTHON=sys.executable, **extra)


@pytest.fixture
def offline_cache(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def same_db_tree(built: Path, ref: Path, meta_diff: dict) -> None:
    """Every file under the two DB folders is byte-identical (LMDB data files included; lock
    files hold process state) except ``meta.json``, whose keys differ exactly as ``meta_diff``
    says ({key: value in ``built``}; input paths in ``ARG_KEYS`` not listed may differ too)."""
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "lock.mdb":
            continue
        if rel.name == "meta.json":
            got, want = json.loads((built / rel).read_text()), json.loads((ref / rel).read_text())
            assert list(got) == list(want)
            assert {k: got[k] for k in meta_diff} == meta_diff
            assert {k: v for k, v in got.items() if k not in ARG_KEYS} == \
                {k: v for k, v in want.items() if k not in ARG_KEYS}
            continue
        assert filecmp.cmp(built / rel, ref / rel, shallow=False), rel


def run_script(script: str, argv: list, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, argv)],
                          env=env, cwd=cwd, capture_output=True, text=True)


def test_name_and_folder_write_identical_dbs(toy_raw, hub_cache, tmp_path):
    """The same script, once with ``--toker roberta-base`` and once with the folder, from two
    folders with the same relative ``--output``: only meta.json's toker/tokenizer differ."""
    args = ["--annotation", toy_raw / "tvqa_preprocessed_subtitles.jsonl", "--vid2nframe",
            toy_raw / "tv_vid2nframe.json", "--output", "tv_subtitles.db", "--task", "tv"]
    folder = str(toy_raw / "tokenizer")
    for name, toker in (("by_name", "roberta-base"), ("by_folder", folder)):
        (tmp_path / name).mkdir()
        proc = run_script("prepro_sub.py", [*args, "--toker", toker], hub_env(hub_cache),
                          tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    same_db_tree(tmp_path / "by_name" / "tv_subtitles.db", tmp_path / "by_folder" /
                 "tv_subtitles.db", {"toker": "roberta-base", "tokenizer": "roberta-base"})
    meta = json.loads((tmp_path / "by_folder" / "tv_subtitles.db" / "meta.json").read_text())
    assert meta["toker"] == meta["tokenizer"] == folder


def test_uncached_name_is_one_error_saying_how_to_get_it(toy_raw, hub_cache, tmp_path):
    proc = run_script("prepro_query.py", ["--annotation", toy_raw / "tvr_val_release.jsonl",
                                          "--output", "tvr_val.db", "--toker", "roberta-large"],
                      hub_env(hub_cache), tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert f"`{COMMAND.format('roberta-large')}`" in proc.stderr
    assert "--toker 'roberta-large'" in proc.stderr and str(hub_cache) in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr and "local folder" in proc.stderr
    assert not (tmp_path / "tvr_val.db").exists()


def test_name_resolves_through_hf_home(toy_raw, tmp_path, monkeypatch):
    snapshot = install(toy_raw / "tokenizer", tmp_path / "home" / "hub", "roberta-large")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_toker("roberta-large") == str(snapshot)
    text = "Chase opens the door. WHO ORDERED THE TESTS?"
    assert load_toker("roberta-large").tokenize(text) == \
        load_toker(toy_raw / "tokenizer").tokenize(text)
    (snapshot / "merges.txt").unlink()  # a half-cached model is not used
    with pytest.raises(TokenizerError, match=re.escape(COMMAND.format("roberta-large"))):
        resolve_toker("roberta-large")


def test_folder_without_its_files_and_missing_folder_are_named(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"--toker '.*' is a folder without \['merges.txt'\]"):
        load_toker(tmp_path)
    with pytest.raises(TokenizerError, match="'./no_such_dir': no such folder"):
        resolve_toker("./no_such_dir")


def upstream_caption_db(toy_dbs, tmp_path) -> Path:
    """A copy of the toy tvc_train.db whose meta.json records ``roberta-base``, as
    upstream-built caption DBs do."""
    db = tmp_path / "tvc_train.db"
    shutil.copytree(toy_dbs / "txt_db" / "tvc_train.db", db)
    meta = json.loads((db / "meta.json").read_text())
    meta.update(toker="roberta-base", tokenizer="roberta-base")
    (db / "meta.json").write_text(json.dumps(meta, indent=4))
    return db


def test_train_tvc_takes_roberta_base_from_meta(toy_dbs, toy_raw, offline_cache, tmp_path,
                                                monkeypatch):
    db = upstream_caption_db(toy_dbs, tmp_path)
    opts = train_tvc.parse_args(["--train_db", str(db)])
    assert opts.toker == "roberta-base"  # hps.json keeps the name, for inf_tvc
    check_required_paths(train_tvc.TvcTask(opts).required_paths(), opts)  # not a missing path
    assert load_toker(opts.toker).get_vocab() == load_toker(toy_raw / "tokenizer").get_vocab()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(TokenizerError, match=re.escape(f"recorded in {db}/meta.json") + ".*"
                       + re.escape(COMMAND.format("roberta-base"))):
        train_tvc.parse_args(["--train_db", str(db)])


def test_inf_tvc_takes_roberta_base_from_hps_or_meta(toy_dbs, toy_raw, offline_cache, tmp_path,
                                                     monkeypatch):
    db = upstream_caption_db(toy_dbs, tmp_path)
    opts = argparse.Namespace(toker=None, model_dir=str(tmp_path / "run"))
    from_meta = inf_tvc.tokenizer_source(opts, argparse.Namespace(train_db=str(db)))
    assert from_meta == ("roberta-base", f"toker (recorded in {db}/meta.json; --toker "
                                         "overrides it)")
    from_hps = inf_tvc.tokenizer_source(opts, argparse.Namespace(toker="roberta-base"))
    text = "House : Who ordered the tests?"
    assert load_toker(*from_hps).tokenize(text) == load_toker(toy_raw / "tokenizer").tokenize(text)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(TokenizerError, match=re.escape("run/log/hps.json; --toker overrides it)")):
        load_toker(*from_hps)

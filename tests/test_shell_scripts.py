"""scripts/create_txtdb.sh and scripts/prepro_tvc.sh invoked as upstream's README does (issue 14,
item 4), as real subprocesses on the toy raw corpus.

The tokenizer default ``roberta-base`` resolves offline to the toy tokenizer filed in a hub cache;
the DBs must equal those scripts/build_toy_dbs.sh wrote with the tokenizer folder (``toy_dbs``).
``HERO_DATA_URL`` / ``HERO_ANN_URL`` point at a 127.0.0.1 http.server holding the toy raw files
under upstream's paths (``hero/ann/...``, ``gh/TV{Retrieval,Caption}/master/data/...``), so
missing files are fetched through scripts/download.py and nothing reaches the network.
"""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_toker_names import hub_env, same_db_tree

from scripts.toy.hub_cache import install

ROOT = Path(__file__).resolve().parents[1]
TVR_ANN = ("tvr_train_release.jsonl", "tvr_val_release.jsonl", "tvr_test_public_release.jsonl",
           "tv_vid2nframe.json", "tvr_video2dur_idx.json")
TVC_ANN = ("tvc_train_release.jsonl", "tvc_val_release.jsonl")
ROBERTA = {"toker": "roberta-base", "tokenizer": "roberta-base"}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def mirror(toy_raw, root: Path) -> Path:
    """Upstream's annotation addresses under ``root``; tv_vid2nframe.json left out (a 404)."""
    files = {"hero/ann/tvqa_preprocessed_subtitles.jsonl": "tvqa_preprocessed_subtitles.jsonl",
             "hero/ann/tvr_video2dur_idx.json": "tvr_video2dur_idx.json"}
    for name in TVR_ANN[:3]:
        files[f"gh/TVRetrieval/master/data/{name}"] = name
    for name in TVC_ANN:
        files[f"gh/TVCaption/master/data/{name}"] = name
    for rel, name in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy_raw / name, root / rel)
    return root


@pytest.fixture(scope="module")
def env(toy_raw, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    install(toy_raw / "tokenizer", cache, "roberta-base")
    root = mirror(toy_raw, tmp_path_factory.mktemp("mirror"))
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub_env(cache, HERO_DATA_URL=f"{base}/hero", HERO_ANN_URL=f"{base}/gh",
                  HERO_DOWNLOAD_RETRIES="0")
    server.shutdown()
    server.server_close()


def raw_ann(toy_raw, folder: Path, names) -> Path:
    """``folder`` holding the raw files as upstream names them (subtitles: tv_subtitles.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(toy_raw / name, folder / name)
    shutil.copy(toy_raw / "tvqa_preprocessed_subtitles.jsonl", folder / "tv_subtitles.jsonl")
    return folder


def run_sh(script: str, args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *map(str, args)], env=env,
                          capture_output=True, text=True)


def config_db_names(config: str) -> set:
    cfg = json.loads((ROOT / "config" / config).read_text())
    return {Path(v).name for k, v in cfg.items() if isinstance(v, str) and v.startswith("/txt/")}


@pytest.mark.slow
def test_create_txtdb_upstream_invocation(toy_raw, toy_dbs, env, tmp_path):
    storage = tmp_path / "storage"
    ann = raw_ann(toy_raw, storage / "ann", TVR_ANN)
    before = {p.name: p.read_bytes() for p in ann.iterdir()}
    proc = run_sh("create_txtdb.sh", [storage / "txt_db", ann], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "downloading" not in proc.stdout
    assert {p.name: p.read_bytes() for p in ann.iterdir()} == before  # used as they are
    txt = storage / "txt_db"
    dbs = {"tvr_train.db", "tvr_val.db", "tvr_test_public.db", "tv_subtitles.db"}
    assert {p.name for p in txt.iterdir()} == dbs
    assert config_db_names("train-tvr-8gpu.json") <= dbs
    for name in dbs:
        same_db_tree(txt / name, toy_dbs / "txt_db" / name, ROBERTA)

    again = run_sh("create_txtdb.sh", [txt, ann], env)
    assert again.returncode == 1
    assert f"{txt}/tvr_train.db already exists; remove it to rebuild it" in again.stderr


def test_missing_annotations_are_fetched_a_404_is_named(toy_raw, env, tmp_path):
    """Missing files go to the downloader with upstream's URL: the one the mirror has is
    fetched, the one it lacks stops the script, naming file, URL and remedy, before any DB."""
    ann = raw_ann(toy_raw, tmp_path / "ann", TVR_ANN[1:3])
    proc = run_sh("create_txtdb.sh", [tmp_path / "txt_db", ann], env)
    gh_url = f"{env['HERO_ANN_URL']}/TVRetrieval/master/data/tvr_train_release.jsonl"
    assert f"downloading {gh_url} -> {ann}/tvr_train_release.jsonl" in proc.stdout
    assert (ann / "tvr_train_release.jsonl").read_bytes() == \
        (toy_raw / "tvr_train_release.jsonl").read_bytes()
    assert proc.returncode == 1
    url = f"{env['HERO_DATA_URL']}/ann/tv_vid2nframe.json"
    assert f"could not download {ann}/tv_vid2nframe.json from {url}" in proc.stderr
    assert "HTTP 404" in proc.stderr and "HERO_ANN_URL" in proc.stderr
    assert not (ann / "tv_vid2nframe.json").exists()
    assert not list((tmp_path / "txt_db").iterdir())


@pytest.mark.slow
def test_prepro_tvc_single_folder_form(toy_raw, toy_dbs, env, tmp_path):
    """``prepro_tvc.sh TXT_DB``: the raw files, all missing, are fetched into TXT_DB (upstream's
    /txt, where val_ref points) and tvc_{train,val}.db written there."""
    txt = tmp_path / "txt_db"
    proc = run_sh("prepro_tvc.sh", [txt], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("downloading") == 3
    assert (txt / "tv_subtitles.jsonl").read_bytes() == \
        (toy_raw / "tvqa_preprocessed_subtitles.jsonl").read_bytes()
    dbs = {"tvc_train.db", "tvc_val.db"}
    assert {p.name for p in txt.iterdir() if p.suffix == ".db"} == dbs
    assert config_db_names("train-tvc-8gpu.json") <= dbs | {"tv_subtitles.db"} | set(TVC_ANN)
    for name in dbs:
        same_db_tree(txt / name, toy_dbs / "txt_db" / name, ROBERTA)


@pytest.mark.slow
def test_prepro_tvc_with_ann_dir_and_toker_folder(toy_raw, toy_dbs, env, tmp_path):
    """The three-argument form (OUT ANN TOKER) keeps working; val_ref is copied beside the DBs."""
    ann = raw_ann(toy_raw, tmp_path / "ann", TVC_ANN)
    out = tmp_path / "txt_db"
    folder = str(toy_raw / "tokenizer")
    proc = run_sh("prepro_tvc.sh", [out, ann, folder], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["tvc_train.db", "tvc_val.db",
                                                    "tvc_val_release.jsonl"]
    assert (out / "tvc_val_release.jsonl").read_bytes() == \
        (toy_raw / "tvc_val_release.jsonl").read_bytes()
    same_db_tree(out / "tvc_val.db", toy_dbs / "txt_db" / "tvc_val.db",
                 {"toker": folder, "tokenizer": folder})

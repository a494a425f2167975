"""Issue 13 item 1 (storage): a cut-short or corrupt LMDB, or a query DB without items, stops
the run with one message naming the file (and key) instead of SIGBUS or an empty dataset.

Every reader kind is exercised on databases built by the project's own preprocessing (the
``toy_dbs`` session fixture), copied before being damaged. Reads that could fault run in a
subprocess, so a SIGBUS shows up as returncode -7 instead of killing pytest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lmdb
import pytest
from helpers_train import ROOT, write_config

from data.codec import LZ4_FRAME_MAGIC, RecordDecodeError
from data.db import StorageError, lmdb_file_sizes
from data.txt_db import QaQueryTokLmdb, QueryTokLmdb, SubTokLmdb, TxtTokLmdb
from eval.retrieval_cli import build_query_loader

CUT = 4096

# (reader kind, DB folder under toy_dbs whose data.mdb is damaged)
READERS = {
    "query": "txt_db/tvr_train.db",
    "sub": "txt_db/tv_subtitles.db",
    "video": "video_db/tv/resnet_slowfast_1.5",
    "compressed_video": "video_db/violin/resnet_slowfast_1.5_compressed",
    "caption": "txt_db/tvc_train.db/cap.db",
}

# Builds one reader over DBS and reads every record; with "after" the file is cut only once
# the reader exists, so the check at the (lazy, per-process) env open is the one that fires.
CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from data.txt_db import CaptionTokLmdb, QueryTokLmdb, SubTokLmdb
from data.video_db import VideoFeatLmdb
dbs, kind, cut_after, data_mdb = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if kind == "query":
    db = QueryTokLmdb(f"{dbs}/txt_db/tvr_train.db", -1); ids = db.ids
elif kind == "sub":
    db = SubTokLmdb(f"{dbs}/txt_db/tv_subtitles.db", 100); ids = list(db.id2len)
elif kind == "caption":
    db = CaptionTokLmdb(f"{dbs}/txt_db/tvc_train.db"); ids = list(db.cap2vid)
else:
    corpus, compress = ("violin", True) if kind == "compressed_video" else ("tv", False)
    db = VideoFeatLmdb(f"{dbs}/video_db/{corpus}", "resnet_slowfast", 1.5, compress, 100)
    ids = list(db.name2nframe)
if cut_after:
    os.truncate(data_mdb, os.path.getsize(data_mdb) - cut_after)
for i in ids:
    db[i]
print("read", len(ids), "records")
"""


def copy_dbs(toy_dbs, tmp_path) -> Path:
    dbs = tmp_path / "dbs"
    shutil.copytree(toy_dbs, dbs)
    return dbs


def read_in_child(dbs: Path, kind: str, cut_after: int = 0) -> subprocess.CompletedProcess:
    data_mdb = dbs / READERS[kind] / "data.mdb"
    return subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(dbs), kind,
                           str(cut_after), str(data_mdb)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


def assert_refused(proc, data_mdb: Path, size: int, missing: int = CUT) -> None:
    """One clean Python error (exit 1, no signal) naming the file and both sizes."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Bus error" not in proc.stderr
    msg = proc.stderr.strip().splitlines()[-1]
    assert msg.startswith("data.db.StorageError: truncated LMDB file"), msg
    assert f"{data_mdb}: it has {size - missing} bytes, but {size} are required" in msg
    assert f"({missing} bytes missing" in msg and "re-copy" in msg


@pytest.mark.parametrize("kind", list(READERS))
def test_truncated_lmdb_refused_when_reader_built(kind, toy_dbs, tmp_path):
    dbs = copy_dbs(toy_dbs, tmp_path)
    data_mdb = dbs / READERS[kind] / "data.mdb"
    size = data_mdb.stat().st_size
    os.truncate(data_mdb, size - CUT)
    assert_refused(read_in_child(dbs, kind), data_mdb, size)


def test_file_cut_after_reader_built_refused_at_env_open(toy_dbs, tmp_path):
    """The mid-run case: the reader exists, its env is first opened when a record is read."""
    dbs = copy_dbs(toy_dbs, tmp_path)
    data_mdb = dbs / READERS["video"] / "data.mdb"
    size = data_mdb.stat().st_size
    proc = read_in_child(dbs, "video", cut_after=CUT)
    assert_refused(proc, data_mdb, size)
    assert "open_env" in proc.stderr  # LMDB's own numbers, not the builder's check


def test_meta_page_sizes_agree_with_lmdb(toy_dbs, tmp_path):
    """The file-level parse of the meta pages gives the size LMDB itself implies (on a copy:
    other tests may hold the originals open, and py-lmdb opens an env once per process)."""
    paths = sorted(p.parent for p in copy_dbs(toy_dbs, tmp_path).rglob("data.mdb"))
    assert len(paths) >= 20
    for path in paths:
        env = lmdb.open(str(path), readonly=True, lock=False)
        implied = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        env.close()
        size, need, _ = lmdb_file_sizes(str(path))
        assert need == implied == size, path  # prepro writes end exactly at the last page


@pytest.mark.parametrize("size", [0, 100, 4096])
def test_lmdb_shorter_than_its_meta_pages(size, toy_dbs, tmp_path):
    path = tmp_path / "q.db"
    shutil.copytree(toy_dbs / "txt_db" / "tvr_val.db", path)
    os.truncate(path / "data.mdb", size)
    with pytest.raises(StorageError, match=rf"{path}/data\.mdb.*{size} bytes.*re-copy"):
        QueryTokLmdb(str(path))


def _overwrite(data_mdb: Path, offset: int, nbytes: int) -> None:
    with open(data_mdb, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * nbytes)


def test_corrupt_lmdb_names_db_and_key(toy_dbs, tmp_path):
    """A damaged data page (LMDB error) or value (decode error): one error, DB and key named."""
    dbs = copy_dbs(toy_dbs, tmp_path)
    data_mdb = dbs / READERS["query"] / "data.mdb"
    _overwrite(data_mdb, 2 * 4096, 4096)  # page 2: a B-tree page of the query DB
    proc = read_in_child(dbs, "query")
    assert proc.returncode == 1, proc.stderr[-2000:]
    msg = proc.stderr.strip().splitlines()[-1]
    assert msg.startswith("data.db.StorageError: cannot read key '"), msg
    assert f"of LMDB {dbs / READERS['query']} (mdb_get: MDB_CORRUPTED" in msg

    path = tmp_path / "v.db"
    shutil.copytree(toy_dbs / "txt_db" / "tvr_val.db", path)
    raw = (path / "data.mdb").read_bytes()
    _overwrite(path / "data.mdb", raw.index(LZ4_FRAME_MAGIC, 2 * 4096) + 4, 32)
    db = QueryTokLmdb(str(path))
    with pytest.raises(RecordDecodeError, match=rf"cannot decode text record {path}\['\w+'\]"):
        for qid in db.ids:
            db[qid]


def _query_copy(toy_dbs, tmp_path, name="tvr_train.db") -> Path:
    path = tmp_path / name
    shutil.copytree(toy_dbs / "txt_db" / name, path)
    return path


def test_query_db_without_items_refused(toy_dbs, tmp_path):
    path = _query_copy(toy_dbs, tmp_path)
    n = len(QueryTokLmdb(str(path)).ids)
    with pytest.raises(StorageError, match=rf"no query in {path} is at most max_txt_len=1 "
                                           rf"tokens \(0 of {n} kept"):
        QueryTokLmdb(str(path), 1)
    (path / "id2len.json").write_text("{}")
    with pytest.raises(StorageError, match=rf"{path}/id2len\.json is empty, so the query DB"):
        QueryTokLmdb(str(path))
    (path / "id2len.json").write_text('{"1": 3, "2"')
    with pytest.raises(StorageError, match=rf"{path}/id2len\.json is not valid JSON"):
        QueryTokLmdb(str(path))
    os.remove(path / "id2len.json")
    with pytest.raises(StorageError, match=rf"{path}/id2len\.json is missing"):
        QueryTokLmdb(str(path))
    qa = _query_copy(toy_dbs, tmp_path, "tvqa_val.db")
    os.remove(qa / "id2len.json")
    with pytest.raises(StorageError, match=rf"{qa}/id2len\.json is missing"):
        QaQueryTokLmdb(str(qa), -1)


def test_dbs_without_id2len_still_open(toy_dbs, tmp_path):
    """Sub DBs take their items from vid2len.json; a plain text DB may lack id2len.json."""
    subs = SubTokLmdb(str(toy_dbs / "txt_db" / "tv_subtitles.db"), 100)
    assert not (toy_dbs / "txt_db" / "tv_subtitles.db" / "id2len.json").exists()
    assert subs.id2len
    path = _query_copy(toy_dbs, tmp_path)
    os.remove(path / "id2len.json")
    assert TxtTokLmdb(str(path)).id2len == {}


def test_eval_refuses_query_db_without_id2len(toy_dbs, tmp_path):
    """eval_vcmr's loader builder: an error instead of scoring 0 queries and exiting 0."""
    path = _query_copy(toy_dbs, tmp_path, "tvr_val.db")
    os.remove(path / "id2len.json")
    opts = SimpleNamespace(task="tvr", query_txt_db=str(path), batch_size=8, n_workers=0,
                           pin_mem=False, vfeat_db=str(toy_dbs / "video_db" / "tv"),
                           sub_txt_db=str(toy_dbs / "txt_db" / "tv_subtitles.db"))
    with pytest.raises(StorageError, match=rf"{path}/id2len\.json is missing"):
        build_query_loader(opts, SimpleNamespace(vfeat_interval=1.5), "vcmr")


def test_train_vcmr_on_truncated_video_db_stops_with_one_message(toy_dbs, tmp_path):
    """End to end, as a user runs it: the TVR demo config over a cut-short video DB."""
    dbs = copy_dbs(toy_dbs, tmp_path)
    data_mdb = dbs / READERS["video"] / "data.mdb"
    size = data_mdb.stat().st_size
    os.truncate(data_mdb, size - CUT)
    config = write_config(tmp_path, "train-tvr-demo.json", dbs, num_train_steps=2,
                          valid_steps=2, save_steps=2, output_dir=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "train_vcmr.py", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode > 0, (proc.returncode, out[-3000:])
    assert "Bus error" not in out
    assert (f"truncated LMDB file {data_mdb}: it has {size - CUT} bytes, but {size} are "
            f"required") in out

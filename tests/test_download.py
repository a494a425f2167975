"""scripts/download.py and scripts/download_*.sh against a local release server (issue 14).

A ``ThreadingHTTPServer`` on 127.0.0.1 (random port) serves a "release" of upstream's archive
shapes built from the toy corpus DBs: ``video_db/NAME.tar`` and ``finetune/NAME.tar`` with one
top folder to strip, ``txt_db/NAME.db.tar`` holding ``NAME.db/``, plain files. It honours
``Range``, logs every request and can be told to cut a transfer, ignore Range or fail with 503.
"""
from __future__ import annotations

import filecmp
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import download
from utils.errors import HeroError

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("pretrained", "tvr", "tvqa", "tvc", "violin", "didemo", "msrvtt", "tv_pretrain")
BLOB_BYTES = bytes(range(256)) * 800  # 204,800 bytes: several reads, cut mid-way in tests


class Release(BaseHTTPRequestHandler):
    """GET/Range over ``root``; ``log`` holds (path, Range header, status) of each request."""

    root: Path
    log: list
    cut: dict      # path -> bytes sent before the connection is dropped (first request only)
    fail: dict     # path -> number of 503 answers before serving
    ignore_range: set
    override: dict  # path -> bytes served instead of the file

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path
        rng = self.headers.get("Range")
        data = self.override.get(path)
        file = self.root / path.lstrip("/")
        if data is None and file.is_file():
            data = file.read_bytes()
        if self.fail.get(path):
            self.fail[path] -= 1
            return self._answer(path, rng, 503)
        if data is None:
            return self._answer(path, rng, 404)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and path not in self.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._answer(path, rng, 416, {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        headers = {"Content-Length": str(len(body))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._answer(path, rng, 206 if start else 200, headers)
        self.wfile.write(body[:self.cut.pop(path, len(body))])

    def _answer(self, path, rng, status, headers=None):
        self.log.append((path, rng, status))
        self.send_response(status)
        for key, value in (headers or {"Content-Length": "0"}).items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args):
        pass


def _tar(dest: Path, src: Path, arcname: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        tar.add(src, arcname=arcname)


@pytest.fixture(scope="module")
def release(toy_dbs, tmp_path_factory) -> Path:
    """Upstream's release shapes, built from the toy DBs (and a small fake fine-tuned run)."""
    rel = tmp_path_factory.mktemp("release") / "hero"
    for video in ("tv", "violin", "didemo", "msrvtt"):
        _tar(rel / "video_db" / f"{video}.tar", toy_dbs / "video_db" / video, f"video_db/{video}")
    for db in sorted((toy_dbs / "txt_db").glob("*.db")):
        _tar(rel / "txt_db" / f"{db.name}.tar", db, db.name)
    _tar(rel / "txt_db" / "pretrain_splits.tar", toy_dbs / "txt_db" / "pretrain_splits",
         "pretrain_splits")
    for name in ("tvc_val_release.jsonl", "tvc_test_public_release.jsonl"):
        (rel / "txt_db" / name).write_bytes((toy_dbs / "txt_db" / name).read_bytes())
    run = tmp_path_factory.mktemp("tvr_default")
    (run / "log").mkdir()
    (run / "log" / "hps.json").write_text('{"task": "tvr"}\n')
    (run / "ckpt").mkdir()
    (run / "ckpt" / "model_step_1.pt").write_bytes(b"ckpt" * 100)
    _tar(rel / "finetune" / "tvr_default.tar", run, "finetune/tvr_default")
    (rel / "pretrained").mkdir()
    (rel / "pretrained" / "hero-tv-ht100.pt").write_bytes(BLOB_BYTES)
    (rel / "pretrained" / "pretrain-tv-init.bin").write_bytes(BLOB_BYTES[::-1])
    return rel


@pytest.fixture
def server(release):
    """A fresh request log and fault settings per test; ``server.url`` is the base address."""
    handler = type("Handler", (Release,), {"root": release.parent, "log": [], "cut": {},
                                           "fail": {}, "ignore_range": set(), "override": {}})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}/hero"
    yield handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setenv("HERO_DOWNLOAD_BACKOFF", "0")


def _run(argv, url, **kw):
    env = dict(os.environ, HERO_DATA_URL=url, PYTHON=sys.executable, HERO_DOWNLOAD_BACKOFF="0",
               PYTHONPATH=str(ROOT))
    return subprocess.run(argv, env=env, capture_output=True, text=True, cwd=kw.get("cwd"))


def _same_tree(got: Path, want: Path) -> None:
    names = sorted(p.relative_to(want) for p in want.rglob("*"))
    assert sorted(p.relative_to(got) for p in got.rglob("*")) == names
    for rel in names:
        if (want / rel).is_file():
            assert filecmp.cmp(got / rel, want / rel, shallow=False), rel


def _leftovers(root: Path) -> list:
    return [p for p in root.rglob("*") if p.name.endswith((".tar", ".part"))
            or ".extract-" in p.name]


def test_tvr_script_gives_upstream_layout_and_rerun_fetches_nothing(server, toy_dbs, tmp_path):
    from data.txt_db import TxtTokLmdb

    store = tmp_path / "storage"
    proc = _run(["bash", str(ROOT / "scripts" / "download_tvr.sh"), str(store)], server.url)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in store.iterdir()) == ["finetune", "pretrained", "txt_db",
                                                       "video_db"]
    assert sorted(p.name for p in (store / "txt_db").iterdir()) == [
        "tv_subtitles.db", "tvr_test_public.db", "tvr_train.db", "tvr_val.db"]
    assert [p.name for p in (store / "video_db").iterdir()] == ["tv"]
    _same_tree(store / "video_db" / "tv", toy_dbs / "video_db" / "tv")
    for db in ("tv_subtitles.db", "tvr_train.db", "tvr_val.db", "tvr_test_public.db"):
        _same_tree(store / "txt_db" / db, toy_dbs / "txt_db" / db)
    assert len(TxtTokLmdb(str(store / "txt_db" / "tvr_train.db")).id2len) > 0
    assert (store / "pretrained" / "hero-tv-ht100.pt").read_bytes() == BLOB_BYTES
    assert (store / "finetune" / "tvr_default" / "log" / "hps.json").is_file()
    assert _leftovers(store) == []
    assert sorted(p for p, _, _ in server.log) == sorted(
        f"/hero/{p}" for p in ("video_db/tv.tar", "txt_db/tv_subtitles.db.tar",
                               "txt_db/tvr_train.db.tar", "txt_db/tvr_val.db.tar",
                               "txt_db/tvr_test_public.db.tar", "pretrained/hero-tv-ht100.pt",
                               "finetune/tvr_default.tar"))
    server.log.clear()
    again = _run(["bash", str(ROOT / "scripts" / "download_tvr.sh"), str(store)], server.url)
    assert again.returncode == 0, again.stderr
    assert server.log == []
    assert "tvr: 0 fetched, 7 already present" in again.stderr


def test_every_script_fetches_its_released_files(server, toy_dbs, tmp_path):
    store = tmp_path / "storage"
    for name in DATASETS:
        proc = _run(["bash", str(ROOT / "scripts" / f"download_{name}.sh"), str(store)],
                    server.url)
        assert proc.returncode == 0, (name, proc.stderr)
    txt = sorted(p.name for p in (toy_dbs / "txt_db").iterdir())
    assert sorted(p.name for p in (store / "txt_db").iterdir()) == txt
    for name in txt:
        _same_tree(store / "txt_db" / name, toy_dbs / "txt_db" / name)
    _same_tree(store / "video_db", toy_dbs / "video_db")
    assert sorted(p.name for p in (store / "pretrained").iterdir()) == [
        "hero-tv-ht100.pt", "pretrain-tv-init.bin"]
    assert _leftovers(store) == []


def test_cut_transfer_resumes_with_range(server, tmp_path):
    server.cut["/hero/pretrained/hero-tv-ht100.pt"] = 70_000
    dest = tmp_path / "x" / "hero-tv-ht100.pt"
    assert download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", dest)
    assert dest.read_bytes() == BLOB_BYTES
    assert [(r, s) for _, r, s in server.log] == [(None, 200), ("bytes=70000-", 206)]
    assert not dest.with_name(dest.name + ".part").exists()


def test_part_file_from_an_earlier_run_is_continued(server, tmp_path):
    dest = tmp_path / "hero-tv-ht100.pt"
    dest.with_name(dest.name + ".part").write_bytes(BLOB_BYTES[:50_000])
    assert download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", dest)
    assert dest.read_bytes() == BLOB_BYTES
    assert [(r, s) for _, r, s in server.log] == [("bytes=50000-", 206)]


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.ignore_range.add("/hero/pretrained/hero-tv-ht100.pt")
    dest = tmp_path / "hero-tv-ht100.pt"
    dest.with_name(dest.name + ".part").write_bytes(b"stale bytes")
    assert download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", dest)
    assert dest.read_bytes() == BLOB_BYTES
    assert [(r, s) for _, r, s in server.log] == [("bytes=11-", 200)]


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    dest = tmp_path / "hero-tv-ht100.pt"
    dest.with_name(dest.name + ".part").write_bytes(BLOB_BYTES)
    assert download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", dest)
    assert dest.read_bytes() == BLOB_BYTES
    assert [s for _, _, s in server.log] == [416]


def test_5xx_is_retried_then_gives_up_naming_the_url(server, tmp_path, monkeypatch):
    path = "/hero/pretrained/hero-tv-ht100.pt"
    server.fail[path] = 2
    assert download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", tmp_path / "a.pt")
    assert [s for _, _, s in server.log] == [503, 503, 200]
    monkeypatch.setenv("HERO_DOWNLOAD_RETRIES", "1")
    server.fail[path] = 5
    with pytest.raises(HeroError, match=r"after 2 tries: HTTP 503.*HERO_DATA_URL") as exc:
        download.fetch(f"{server.url}/pretrained/hero-tv-ht100.pt", tmp_path / "b.pt")
    assert f"{server.url}/pretrained/hero-tv-ht100.pt" in str(exc.value)
    assert not (tmp_path / "b.pt").exists()


def test_404_names_the_url_and_hero_data_url(server, tmp_path):
    store = tmp_path / "storage"
    proc = _run(["bash", str(ROOT / "scripts" / "download_violin.sh"), str(store)],
                server.url + "/missing")
    assert proc.returncode == 1
    url = f"{server.url}/missing/video_db/violin.tar"
    assert f"cannot download {url}: HTTP 404 Not Found." in proc.stderr
    assert "set HERO_DATA_URL to a mirror" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [s for _, _, s in server.log] == [404]
    assert not (store / "video_db" / "violin").exists() and _leftovers(store) == []


def test_truncated_archive_leaves_nothing_that_counts_as_present(server, release, toy_dbs,
                                                                  tmp_path):
    path = "/hero/txt_db/tvr_val.db.tar"
    whole = (release / "txt_db" / "tvr_val.db.tar").read_bytes()
    server.override[path] = whole[:len(whole) // 2 + 100]
    store = tmp_path / "storage"
    item = download.Item("txt_db/tvr_val.db")
    with pytest.raises(HeroError, match=r"tvr_val\.db\.tar.*not a complete tar archive.*re-run"):
        download.install(item, store, server.url)
    assert sorted(p.name for p in (store / "txt_db").iterdir()) == []
    del server.override[path]
    leftover = store / "txt_db" / ".tvr_val.db.extract-killed"  # as after a kill -9
    (leftover / "tvr_val.db").mkdir(parents=True)
    assert download.install(item, store, server.url)
    assert sorted(p.name for p in (store / "txt_db").iterdir()) == ["tvr_val.db"]
    _same_tree(store / "txt_db" / "tvr_val.db", toy_dbs / "txt_db" / "tvr_val.db")


def test_archive_members_leaving_the_folder_are_refused(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("evil.db/ok.json", "evil.db/../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    server.override["/hero/txt_db/evil.db.tar"] = buf.getvalue()
    store = tmp_path / "storage"
    with pytest.raises(HeroError, match=r"unsafe archive member 'evil\.db/\.\./\.\./escaped"):
        download.install(download.Item("txt_db/evil.db"), store, server.url)
    assert not (tmp_path / "escaped.txt").exists() and not (store / "escaped.txt").exists()
    assert sorted(p.name for p in (store / "txt_db").iterdir()) == ["evil.db.tar"]


def test_file_subcommand(server, tmp_path):
    url = f"{server.url}/txt_db/tvc_val_release.jsonl"
    dest = tmp_path / "ann" / "tvc_val_release.jsonl"
    argv = [sys.executable, "-m", "scripts.download", "file", url, str(dest)]
    proc = _run(argv, server.url, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert dest.read_bytes() == (server.root / "hero/txt_db/tvc_val_release.jsonl").read_bytes()
    again = _run(argv, server.url, cwd=ROOT)
    assert again.returncode == 0 and "present, nothing fetched" in again.stderr
    folder = _run(argv[:-1] + [str(tmp_path / "dir") + "/"], server.url, cwd=ROOT)
    assert folder.returncode == 0, folder.stderr
    assert (tmp_path / "dir" / "tvc_val_release.jsonl").is_file()
    assert len(server.log) == 2
    missing = _run(argv[:-2] + [url + ".nope", str(tmp_path / "nope")], server.url, cwd=ROOT)
    assert missing.returncode == 1
    assert f"cannot download {url}.nope: HTTP 404" in missing.stderr

"""LMDB plumbing shared by every reader, writer and preprocessing script (data.md §2).

Readers open their environment lazily, once per process: the pid is remembered and a forked
DataLoader worker (or a torch.distributed rank) reopens on first access instead of reusing the
parent's handle, which LMDB does not support. Handles are dropped when pickling, so readers can
be sent to spawned workers too. ``lock=False`` is safe because nothing writes while we read (and
the Docker launcher mounts the databases read-only anyway).

py-lmdb refuses to open one environment twice in a process, yet upstream builds several readers
on the same folder (e.g. train and val datasets over one video DB), so environments and their
read transaction are shared per (process, real path).

Writers are transactional and batched: a commit every 1000 puts and a final commit on close,
with the map sizes of upstream (4 TiB text, 1 TiB video; LMDB files are sparse).
"""
from __future__ import annotations

import json
import os

import lmdb

from data.codec import decode_txt, decode_txt_fields, encode_txt, encode_video

TXT_MAP_SIZE = 4 * 1024 ** 4
VIDEO_MAP_SIZE = 1024 ** 4
TXT_MAX_READERS = 4096
VIDEO_MAX_READERS = 4096 * 8
COMMIT_EVERY = 1000


def require_dir(path: str, what: str = "database") -> str:
    """Return ``path`` or raise a FileNotFoundError naming the missing folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def make_output_dir(path: str) -> str:
    """Create a fresh output folder; an existing one is refused, as upstream's prepro does."""
    if os.path.exists(path):
        raise FileExistsError(f"output folder already exists, refusing to overwrite: {path}")
    os.makedirs(path)
    return path


def read_json(path: str, what: str | None = None):
    """Load a JSON side file; a missing file raises an error naming it."""
    if not os.path.isfile(path):
        label = f" ({what})" if what else ""
        raise FileNotFoundError(f"side file not found{label}: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj, indent: int | None = None) -> None:
    """Write a side file with ``json.dump`` defaults (meta.json uses ``indent=4``)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def write_meta(db_dir: str, meta: dict) -> None:
    write_json(os.path.join(db_dir, "meta.json"), meta, indent=4)


def read_jsonl(path: str) -> list:
    """Read a JSON-lines file (blank lines are skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"jsonl file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, lines) -> None:
    """Lines re-serialized and joined with ``\\n``, no trailing newline (as upstream)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(line) for line in lines))


_SHARED = {"pid": None, "txns": {}}


def _shared_txn(path: str, max_readers: int):
    """The process-wide read transaction of ``path``.

    In a forked child the parent's handles are closed first (only the child's copies: with
    ``lock=False`` this unmaps memory and closes descriptors), because py-lmdb remembers the
    open paths across the fork and would refuse to reopen them.
    """
    if _SHARED["pid"] != os.getpid():
        for env, txn in _SHARED["txns"].values():
            txn.abort()
            env.close()
        _SHARED["pid"], _SHARED["txns"] = os.getpid(), {}
    key = os.path.realpath(path)
    if key not in _SHARED["txns"]:
        env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=False,
                        max_readers=max_readers)
        _SHARED["txns"][key] = (env, env.begin(buffers=True))
    return _SHARED["txns"][key][1]


class LazyLmdb:
    """A read-only LMDB with one long-lived ``buffers=True`` read transaction per process."""

    def __init__(self, path: str, max_readers: int = TXT_MAX_READERS):
        if not os.path.isfile(os.path.join(require_dir(path), "data.mdb")):
            raise FileNotFoundError(f"not an LMDB folder (no data.mdb): {path}")
        self.path = path
        self.max_readers = max_readers
        self._pid = None
        self._txn = None

    @property
    def txn(self):
        if self._pid != os.getpid():
            self._txn = _shared_txn(self.path, self.max_readers)
            self._pid = os.getpid()
        return self._txn

    def get(self, key: str):
        """Raw value (a buffer valid until the next call) or None when the key is absent."""
        return self.txn.get(key.encode("utf-8"))

    def get_txt(self, key: str):
        """Decoded text record; a missing or corrupt one raises RecordDecodeError(path[key])."""
        return decode_txt(self.get(key), where=f"{self.path}[{key!r}]")

    def get_fields(self, key: str, fields) -> dict:
        """Only ``fields`` of a text record (see ``decode_txt_fields``); errors name path[key]."""
        return decode_txt_fields(self.get(key), fields, where=f"{self.path}[{key!r}]")

    def __len__(self) -> int:
        return self.txn.stat()["entries"]

    def __getstate__(self):
        return {"path": self.path, "max_readers": self.max_readers}

    def __setstate__(self, state):
        self.__init__(state["path"], state["max_readers"])


class LmdbWriter:
    """Batched transactional writer of raw bytes; use as a context manager."""

    def __init__(self, path: str, map_size: int = TXT_MAP_SIZE,
                 commit_every: int = COMMIT_EVERY):
        self.path = path
        self.commit_every = commit_every
        self.env = lmdb.open(path, readonly=False, create=True, map_size=map_size)
        self.txn = self.env.begin(write=True)
        self.n_pending = 0
        self.n_written = 0

    def put(self, key: str, value: bytes) -> None:
        self.txn.put(key.encode("utf-8"), value)
        self.n_pending += 1
        self.n_written += 1
        if self.n_pending >= self.commit_every:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            self.n_pending = 0

    def close(self) -> None:
        if self.env is None:
            return
        self.txn.commit()
        self.env.close()
        self.env = self.txn = None

    def abort(self) -> None:
        """Drop the uncommitted batch (used when an exception escapes the ``with`` block)."""
        if self.env is None:
            return
        self.txn.abort()
        self.env.close()
        self.env = self.txn = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TxtLmdbWriter(LmdbWriter):
    """Text DB writer: ``writer[key] = record`` stores ``encode_txt(record)``."""

    def __setitem__(self, key: str, record) -> None:
        self.put(key, encode_txt(record))


class VideoLmdbWriter(LmdbWriter):
    """Video DB writer: ``writer[key] = features`` stores msgpack-numpy or npz bytes."""

    def __init__(self, path: str, compress: bool = False, map_size: int = VIDEO_MAP_SIZE,
                 commit_every: int = COMMIT_EVERY):
        super().__init__(path, map_size=map_size, commit_every=commit_every)
        self.compress = compress

    def __setitem__(self, key: str, features) -> None:
        self.put(key, encode_video(features, compress=self.compress))

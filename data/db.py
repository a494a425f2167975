"""LMDB plumbing shared by every reader, writer and preprocessing script (data.md §2).

Readers open their environment lazily, once per process: the pid is remembered and a forked
DataLoader worker (or a torch.distributed rank) reopens on first access instead of reusing the
parent's handle, which LMDB does not support. Handles are dropped when pickling, so readers can
be sent to spawned workers too. ``lock=False`` is safe because nothing writes while we read (and
the Docker launcher mounts the databases read-only anyway).

py-lmdb refuses to open one environment twice in a process, yet upstream builds several readers
on the same folder (e.g. train and val datasets over one video DB), so environments and their
read transaction are shared per (process, real path).

Every reader checks ``data.mdb`` before any data page is touched (issue 13, storage): LMDB mmaps
the file, so a page past the end of a cut-short copy faults with SIGBUS instead of raising. The
size implied by the newest meta page (``(last_pgno + 1) * psize``) is compared with the file's
once when a reader is built (from the meta pages, read with plain file I/O, so opening stays
lazy) and again on each per-process env open (from LMDB's own ``env.info()``/``env.stat()``,
which read only the two meta pages). LMDB errors while reading become a :class:`StorageError`
naming the DB and the key.

Writers are transactional and batched: a commit every 1000 puts and a final commit on close,
with the map sizes of upstream (4 TiB text, 1 TiB video; LMDB files are sparse).
"""
from __future__ import annotations

import json
import os
import struct

import lmdb

from data.codec import decode_txt, decode_txt_fields, encode_txt, encode_video
from utils.errors import HeroError

TXT_MAP_SIZE = 4 * 1024 ** 4
VIDEO_MAP_SIZE = 1024 ** 4
TXT_MAX_READERS = 4096
VIDEO_MAX_READERS = 4096 * 8
COMMIT_EVERY = 1000
REMEDY = "re-copy or re-download it, or rebuild the DB with its prepro script"

# LMDB meta page (64-bit, data version 1): 16-byte page header, then mm_magic, mm_version at 16;
# the free DB's md_pad (= page size) at 40; mm_last_pg and mm_txnid at 136.
_META_MAGIC = 0xBEEFC0DE
_META_LEN = 152


class StorageError(HeroError, RuntimeError):
    """A database on disk is unusable (truncated, corrupt, or without items); the message names
    the file or DB (and key) and says what to do (issue 13, storage)."""


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
    """Load a JSON side file; a missing file raises an error naming it, a cut-short or corrupt
    one a :class:`StorageError` naming it."""
    if not os.path.isfile(path):
        label = f" ({what})" if what else ""
        raise FileNotFoundError(f"side file not found{label}: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as exc:
            raise StorageError(f"{path} is not valid JSON ({exc}); it is cut short or "
                               f"corrupt: re-copy or regenerate it") from None


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
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise StorageError(f"{path} line {n} is not valid JSON ({exc}); it is cut "
                                   f"short or corrupt: re-copy or regenerate it") from None
    return out


def write_jsonl(path: str, lines) -> None:
    """Lines re-serialized and joined with ``\\n``, no trailing newline (as upstream)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(line) for line in lines))


def _refuse_short(path: str, size: int, need: int, why: str) -> None:
    if size < need:
        raise StorageError(
            f"truncated LMDB file {os.path.join(path, 'data.mdb')}: it has {size} bytes, but "
            f"{need} are required by {why} ({need - size} bytes missing; a partial copy or "
            f"download?): {REMEDY}")


def _pages_needed(last_pgno: int, psize: int) -> tuple:
    """Bytes up to the end of the last used page, and how that number came about."""
    why = f"LMDB's last used page number {last_pgno} and page size {psize}"
    return (last_pgno + 1) * psize, why


def _read_meta(fd: int, offset: int):
    """``(txnid, last_pgno, psize)`` of the meta page at ``offset``, or None if unreadable."""
    raw = os.pread(fd, _META_LEN, offset)
    if len(raw) < _META_LEN or struct.unpack_from("<II", raw, 16) != (_META_MAGIC, 1):
        return None
    (psize,) = struct.unpack_from("<I", raw, 40)
    last_pgno, txnid = struct.unpack_from("<QQ", raw, 136)
    return txnid, last_pgno, psize


def lmdb_file_sizes(path: str) -> tuple:
    """``(actual bytes, bytes needed, why)`` of ``path/data.mdb``, from its meta pages alone.

    LMDB uses the meta page with the larger txnid; when the second one cannot be read, the two
    meta pages are the minimum. A file that does not start with a meta page is a StorageError.
    """
    data = os.path.join(path, "data.mdb")
    fd = os.open(data, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        first = _read_meta(fd, 0)
        second = _read_meta(fd, first[2]) if first and first[2] else None
    finally:
        os.close(fd)
    if first is None or not first[2]:
        raise StorageError(f"{data} ({size} bytes) does not start with an LMDB meta page; it is "
                           f"cut short or not an LMDB file: {REMEDY}")
    if second is None:
        return (size, 2 * first[2], f"its two meta pages of {first[2]} bytes")
    _, last_pgno, psize = max(first, second)
    return (size, *_pages_needed(last_pgno, psize))


def check_lmdb_file(path: str) -> None:
    """Refuse a cut-short ``data.mdb`` without mapping it (cheap: two small reads)."""
    _refuse_short(path, *lmdb_file_sizes(path))


def open_env(path: str, max_readers: int):
    """``lmdb.open`` read-only, then the size check on LMDB's own numbers before any data page
    is read (``info()``/``stat()`` only read the meta pages); errors name the DB folder."""
    try:
        env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=False,
                        max_readers=max_readers)
    except lmdb.Error as exc:
        raise StorageError(f"cannot open LMDB {path} ({exc}); the file is cut short or "
                           f"corrupt: {REMEDY}") from None
    try:
        size = os.path.getsize(os.path.join(path, "data.mdb"))
        _refuse_short(path, size, *_pages_needed(env.info()["last_pgno"], env.stat()["psize"]))
    except BaseException:
        env.close()
        raise
    return env


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
        env = open_env(path, max_readers)
        _SHARED["txns"][key] = (env, env.begin(buffers=True))
    return _SHARED["txns"][key][1]


class LazyLmdb:
    """A read-only LMDB with one long-lived ``buffers=True`` read transaction per process.

    A cut-short ``data.mdb`` is refused here, when the reader is built (so in the main process,
    before any training), and again when a process opens the env.
    """

    def __init__(self, path: str, max_readers: int = TXT_MAX_READERS):
        if not os.path.isfile(os.path.join(require_dir(path), "data.mdb")):
            raise FileNotFoundError(f"not an LMDB folder (no data.mdb): {path}")
        check_lmdb_file(path)
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
        """Raw value (a buffer valid until the next call) or None when the key is absent; an
        LMDB error (a corrupt page) becomes a StorageError naming the DB and the key."""
        try:
            return self.txn.get(key.encode("utf-8"))
        except lmdb.Error as exc:
            raise StorageError(f"cannot read key {key!r} of LMDB {self.path} ({exc}); the "
                               f"file is corrupt: {REMEDY}") from None

    def get_txt(self, key: str):
        """Decoded text record; a missing or corrupt one raises RecordDecodeError(path[key])."""
        return decode_txt(self.get(key), where=f"{self.path}[{key!r}]")

    def get_fields(self, key: str, fields) -> dict:
        """Only ``fields`` of a text record (see ``decode_txt_fields``); errors name path[key]."""
        return decode_txt_fields(self.get(key), fields, where=f"{self.path}[{key!r}]")

    def __len__(self) -> int:
        try:
            return self.txn.stat()["entries"]
        except lmdb.Error as exc:
            raise StorageError(f"cannot read the entry count of LMDB {self.path} ({exc}); the "
                               f"file is corrupt: {REMEDY}") from None

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

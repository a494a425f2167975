"""Byte-level codecs for the values stored in HERO's LMDBs (data.md §2).

Every reader and writer in the project goes through these functions, so the on-disk format is
defined in exactly one place. They are byte-compatible with upstream's released databases:

* text records: ``lz4.frame.compress(msgpack.dumps(record, use_bin_type=True))`` (LZ4 *frame*
  format, magic ``04 22 4D 18``);
* video records, uncompressed variant: ``msgpack.dumps({"features": ndarray})`` with the
  msgpack-numpy map layout (bytes keys ``nd``, ``type``, ``kind``, ``shape``, ``data``);
* video records, compressed variant: the raw bytes of a ``numpy.savez_compressed`` archive with
  member ``features`` (an extra ``allow_pickle`` member written by old numpy is ignored).

msgpack-numpy is not needed to *read*: the ndarray map is rebuilt by hand, which also tolerates
archives written by any msgpack-numpy version.
"""
from __future__ import annotations

import io

import lz4.frame
import msgpack
import numpy as np

from utils.errors import HeroError

LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


REBUILD = "the DB is corrupt: re-copy or re-download it, or rebuild it with its prepro script"


class RecordDecodeError(HeroError, ValueError):
    """A stored value could not be decoded; the message names the database and key and says
    what to do (issue 13, storage)."""


def _encode_ndarray(obj):
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {b"nd": True, b"type": arr.dtype.str, b"kind": b"",
                b"shape": list(arr.shape), b"data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _decode_ndarray(obj):
    if b"nd" in obj and obj.get(b"nd") is True:
        dtype = np.dtype(obj[b"type"] if isinstance(obj[b"type"], str)
                         else obj[b"type"].decode())
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    return obj


def encode_txt(record) -> bytes:
    """Serialize one text-DB record (plain Python types) as upstream does."""
    return lz4.frame.compress(msgpack.dumps(record, use_bin_type=True, default=_encode_ndarray))


def decode_txt(value, where: str = "") -> object:
    """Inverse of :func:`encode_txt`; ``where`` (e.g. ``"db_dir[key]"``) goes into errors."""
    if value is None:
        raise RecordDecodeError(f"missing record {where}")
    try:
        raw = lz4.frame.decompress(value)
        return msgpack.loads(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the location attached
        raise RecordDecodeError(f"cannot decode text record {where} ({exc}); {REBUILD}") from exc


def _unpack_fields(raw: bytes, fields) -> dict:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(raw))
    unpacker.feed(raw)
    found = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key in fields:
            found[key] = unpacker.unpack()
        else:
            unpacker.skip()
    return found


def decode_txt_fields(value, fields, where: str = "") -> dict:
    """Only ``fields`` of a text record (a str-keyed map), skipping the rest undecoded.

    Several times faster than :func:`decode_txt` on subtitle records, whose raw subtitles and
    token lists are not needed when ``SubTokLmdb`` scans every video at construction.
    """
    if value is None:
        raise RecordDecodeError(f"missing record {where}")
    try:
        found = _unpack_fields(lz4.frame.decompress(value), frozenset(fields))
    except Exception as exc:  # noqa: BLE001 - re-raised with the location attached
        raise RecordDecodeError(f"cannot decode text record {where} ({exc}); {REBUILD}") from exc
    missing = [f for f in fields if f not in found]
    if missing:
        raise RecordDecodeError(f"text record {where} lacks the field(s) {missing}")
    return found


def encode_video(features: np.ndarray, compress: bool = False) -> bytes:
    """Serialize one video's ``(n_frames, dim)`` features (upstream stores float32)."""
    if compress:
        buf = io.BytesIO()
        np.savez_compressed(buf, features=features)
        return buf.getvalue()
    return msgpack.dumps({"features": features}, use_bin_type=True, default=_encode_ndarray)


def decode_video(value, compress: bool = False, where: str = "") -> np.ndarray:
    """Inverse of :func:`encode_video`; returns a float32 array (float16 records are upcast)."""
    if value is None:
        raise RecordDecodeError(f"missing video record {where}")
    try:
        if compress:
            with np.load(io.BytesIO(bytes(value)), allow_pickle=False) as npz:
                feats = npz["features"]
        else:
            rec = msgpack.loads(value, raw=False, strict_map_key=False,
                                object_hook=_decode_ndarray)
            feats = rec["features"]
    except Exception as exc:  # noqa: BLE001 - re-raised with the location attached
        raise RecordDecodeError(f"cannot decode video record {where} ({exc}); "
                               f"{REBUILD}") from exc
    return np.asarray(feats, dtype=np.float32)

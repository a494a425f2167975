"""Place a tokenizer folder into a Hugging Face hub cache under a model name, offline.

``--toker roberta-base`` resolves through the local hub cache (utils/tokenizer.py); this writes
the cache layout huggingface_hub reads, so the toy tokenizer can stand in for ``roberta-base``
on a machine without network (tests, demos)::

    CACHE/models--roberta-base/refs/main                 the commit hash
    CACHE/models--roberta-base/blobs/<git blob sha1>     the file contents
    CACHE/models--roberta-base/snapshots/<commit>/vocab.json -> ../../blobs/<sha1>  (and merges.txt)

Usage: ``python -m scripts.toy.hub_cache TOKER_DIR CACHE [--name roberta-base]``, then run with
``HF_HUB_CACHE=CACHE HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from utils.tokenizer import TOKER_FILES


def git_blob_sha1(data: bytes) -> str:
    """The id git (and so the hub) gives a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def install(toker_dir, cache_dir, name: str = "roberta-base") -> Path:
    """Copy ``vocab.json`` and ``merges.txt`` of ``toker_dir`` into ``cache_dir`` as model
    ``name``; returns the snapshot folder. The commit hash depends on the contents only."""
    repo = Path(cache_dir) / f"models--{name.replace('/', '--')}"
    blobs = {f: (Path(toker_dir) / f).read_bytes() for f in TOKER_FILES}
    shas = {f: git_blob_sha1(data) for f, data in blobs.items()}
    commit = hashlib.sha1("".join(shas[f] for f in TOKER_FILES).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", repo / "refs", snapshot):
        d.mkdir(parents=True, exist_ok=True)
    for f, data in blobs.items():
        (repo / "blobs" / shas[f]).write_bytes(data)
        link = snapshot / f
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.join("..", "..", "blobs", shas[f]), link)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("toker_dir", help="folder holding vocab.json and merges.txt")
    parser.add_argument("cache_dir", help="hub cache folder (what HF_HUB_CACHE will name)")
    parser.add_argument("--name", default="roberta-base", help="model name to file it under")
    opts = parser.parse_args(argv)
    print(install(opts.toker_dir, opts.cache_dir, opts.name))


if __name__ == "__main__":
    main()

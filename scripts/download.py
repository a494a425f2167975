"""Download upstream's released data into upstream's storage layout (issue 14).

Usage::

    bash scripts/download_DATASET.sh PATH_TO_STORAGE   # = python -m scripts.download DATASET ...
    python -m scripts.download file URL DEST           # one file, resumable (other scripts use it)

``PATH_TO_STORAGE`` gets upstream's four folders ``video_db/ txt_db/ pretrained/ finetune/``
(all four are made, as upstream's scripts did, so ``launch_container.sh`` can mount them).  The
files come from upstream's blob, ``https://convaisharables.blob.core.windows.net/hero``, or from
the address in the environment variable ``HERO_DATA_URL`` (a mirror with the same layout;
upstream's links have gone dead for some users, HERO issue #48).  Each dataset's list, as
upstream's ``download_*.sh`` scripts fetched it (``X.db`` = archive ``txt_db/X.db.tar`` holding
``X.db/``; ``video_db/X`` and ``finetune/X`` = archives ``video_db/X.tar`` / ``finetune/X.tar``
whose one top folder is stripped, as ``tar --strip-components 1`` did)::

    pretrained   pretrained/hero-tv-ht100.pt
    tvr          video_db/tv; tv_subtitles.db tvr_train.db tvr_val.db tvr_test_public.db;
                 pretrained/hero-tv-ht100.pt; finetune/tvr_default
    tvqa         video_db/tv; tv_subtitles.db tvqa_train.db tvqa_val.db tvqa_test_public.db;
                 pretrained/hero-tv-ht100.pt
    tvc          video_db/tv; tv_subtitles.db tvc_train.db tvc_val.db; the plain files
                 txt_db/tvc_val_release.jsonl txt_db/tvc_test_public_release.jsonl;
                 pretrained/hero-tv-ht100.pt
    violin       video_db/violin; violin_subtitles.db violin_train.db violin_val.db
                 violin_test.db; pretrained/hero-tv-ht100.pt
    didemo       video_db/didemo; didemo_train.db didemo_val.db didemo_test.db
                 didemo_subtitles.db; pretrained/hero-tv-ht100.pt
    msrvtt       video_db/msrvtt; msrvtt_train.db msrvtt_val.db msrvtt_test.db
                 msrvtt_subtitles.db; pretrained/hero-tv-ht100.pt
    tv_pretrain  video_db/tv; tv_subtitles.db; txt_db/pretrain_splits (archive
                 txt_db/pretrain_splits.tar holding pretrain_splits/);
                 pretrained/pretrain-tv-init.bin

Why it is safe to re-run (the habit upstream's users have): whatever is present (an extracted
folder, a finished file) is skipped, so a second run fetches nothing; a file is written to
``NAME.part`` and continues with an HTTP Range request after an interruption (restarting when
the server ignores Range); connection errors and 5xx answers are retried with exponential
backoff (``HERO_DOWNLOAD_RETRIES``, default 5; ``HERO_DOWNLOAD_BACKOFF`` seconds, default 2);
an archive is extracted into a hidden temporary folder next to its destination and renamed into
place, so an interrupted extraction never leaves a half folder that counts as present (leftover
temporary folders are removed on the next run), and the ``.tar`` is removed once extracted.
"""
from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from utils.errors import HeroError, run_main

LOGGER = logging.getLogger("hero.download")
BLOB = "https://convaisharables.blob.core.windows.net/hero"
ENV_URL = "HERO_DATA_URL"
LAYOUT = ("video_db", "txt_db", "pretrained", "finetune")
CHUNK = 1 << 20
TIMEOUT_S = 60
RETRYABLE_HTTP = frozenset({408, 429})
MIRROR_HINT = (f"If upstream's address has gone dead (HERO issue #48), set {ENV_URL} to a "
               "mirror holding upstream's layout (video_db/, txt_db/, pretrained/, finetune/) "
               "and re-run; what is already downloaded is kept.")


@dataclass(frozen=True)
class Item:
    """One released thing: ``path`` (relative to PATH_TO_STORAGE) present means done."""

    path: str
    archive: bool = True
    strip: int = 0

    def url(self, base: str) -> str:
        return f"{base}/{self.path}.tar" if self.archive else f"{base}/{self.path}"


def _db(name: str) -> Item:
    return Item(f"txt_db/{name}.db")


def _video(name: str) -> Item:
    return Item(f"video_db/{name}", strip=1)


def _plain(path: str) -> Item:
    return Item(path, archive=False)


PRETRAINED = _plain("pretrained/hero-tv-ht100.pt")
MANIFESTS: dict[str, tuple[Item, ...]] = {
    "pretrained": (PRETRAINED,),
    "tvr": (_video("tv"), *map(_db, ("tv_subtitles", "tvr_train", "tvr_val", "tvr_test_public")),
            PRETRAINED, Item("finetune/tvr_default", strip=1)),
    "tvqa": (_video("tv"),
             *map(_db, ("tv_subtitles", "tvqa_train", "tvqa_val", "tvqa_test_public")),
             PRETRAINED),
    "tvc": (_video("tv"), *map(_db, ("tv_subtitles", "tvc_train", "tvc_val")),
            _plain("txt_db/tvc_val_release.jsonl"),
            _plain("txt_db/tvc_test_public_release.jsonl"), PRETRAINED),
    "violin": (_video("violin"),
               *map(_db, ("violin_subtitles", "violin_train", "violin_val", "violin_test")),
               PRETRAINED),
    "didemo": (_video("didemo"),
               *map(_db, ("didemo_train", "didemo_val", "didemo_test", "didemo_subtitles")),
               PRETRAINED),
    "msrvtt": (_video("msrvtt"),
               *map(_db, ("msrvtt_train", "msrvtt_val", "msrvtt_test", "msrvtt_subtitles")),
               PRETRAINED),
    "tv_pretrain": (_video("tv"), _db("tv_subtitles"), Item("txt_db/pretrain_splits"),
                    _plain("pretrained/pretrain-tv-init.bin")),
}


def base_url() -> str:
    """The release address: ``HERO_DATA_URL`` when set (a mirror), else upstream's blob."""
    return (os.environ.get(ENV_URL) or BLOB).rstrip("/")


class _Cut(Exception):
    """A transfer that ended early; the ``.part`` file keeps what arrived and is resumed."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise HeroError(f"{name}={raw!r} is not a number; unset it or give e.g. "
                        f"{name}={default:g}") from None


def _range_total(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a ``Content-Range`` header (None where absent)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (None if total == "*" else int(total))


def _open(url: str, part: Path, have: int):
    """The response to a GET from byte ``have`` on; None when ``part`` is already whole."""
    headers = {"User-Agent": "hero-download/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    except HTTPError as err:
        if err.code != 416 or not have:
            raise
        _, total = _range_total(err.headers.get("Content-Range"))
        err.close()
        if total == have:
            return None
        part.unlink()
        raise _Cut("the server refused to resume (HTTP 416); starting over") from None


def _transfer(url: str, part: Path) -> None:
    """Append the rest of ``url`` to ``part``; raise :class:`_Cut` when it ends early."""
    have = part.stat().st_size if part.exists() else 0
    resp = _open(url, part, have)
    if resp is None:
        return
    with resp:
        start, total = _range_total(resp.headers.get("Content-Range"))
        if have and resp.status == 206 and start != have:
            part.unlink()
            raise _Cut(f"the server resumed at byte {start}, not {have}; starting over")
        if resp.status != 206 or not have:
            if have:
                LOGGER.info("%s: the server ignored the resume request; starting over", url)
            have, length = 0, resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with part.open("ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[:-len(".part")], leave=False) as bar:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise _Cut(f"the connection closed after {size} of {total} bytes")


def _http_error(url: str, err: HTTPError) -> HeroError:
    return HeroError(f"cannot download {url}: HTTP {err.code} {err.reason}. {MIRROR_HINT}")


def fetch(url: str, dest: Path) -> bool:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming and retrying; False when
    ``dest`` is already there (nothing fetched)."""
    dest = Path(dest)
    if dest.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    retries = int(_env_number("HERO_DOWNLOAD_RETRIES", 5))
    backoff = _env_number("HERO_DOWNLOAD_BACKOFF", 2.0)
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part)
            break
        except HTTPError as err:
            if err.code < 500 and err.code not in RETRYABLE_HTTP:
                raise _http_error(url, err) from None
            error = f"HTTP {err.code} {err.reason}"
        except ValueError as err:  # urllib's "unknown url type"
            raise HeroError(f"cannot download {url!r}: {err}; give an http(s) URL "
                            f"(check {ENV_URL} if set)") from None
        except (_Cut, URLError, OSError, http.client.HTTPException) as err:
            error = str(getattr(err, "reason", err)) or type(err).__name__
        progressed = part.exists() and part.stat().st_size > before
        failures = 1 if progressed else failures + 1
        if failures > retries:
            raise HeroError(f"cannot download {url} after {retries + 1} tries: {error}. Check the "
                            f"network and re-run (the download resumes from {part}). "
                            f"{MIRROR_HINT}")
        delay = min(backoff * 2 ** (failures - 1), 300.0)
        LOGGER.warning("%s: %s; retry %d/%d in %gs", url, error, failures, retries, delay)
        time.sleep(delay)
    part.replace(dest)
    return True


def _safe_members(tar: tarfile.TarFile, strip: int, where: str) -> list[tarfile.TarInfo]:
    """The archive's members with ``strip`` leading folders removed; refuse absolute paths,
    ``..`` and links leading out, so a hostile archive cannot write outside the folder."""
    members = []
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        unsafe = path.is_absolute() or ".." in path.parts or not (
            member.isfile() or member.isdir() or member.issym() or member.islnk())
        if member.issym() or member.islnk():
            link = PurePosixPath(member.linkname)
            unsafe = unsafe or link.is_absolute() or ".." in link.parts
        if unsafe:
            raise HeroError(f"{where}: refusing unsafe archive member {member.name!r} "
                            "(absolute path, '..', a link out or a device); the archive is not "
                            f"upstream's. {MIRROR_HINT}")
        if len(path.parts) <= strip:
            continue
        member.name = str(PurePosixPath(*path.parts[strip:]))
        if member.islnk():
            member.linkname = str(PurePosixPath(*link.parts[strip:]))
        members.append(member)
    return members


def _extract(tar_path: Path, into: Path, strip: int, where: str) -> None:
    """Extract ``tar_path`` into ``into``; a damaged archive is removed (the next run fetches
    it again) and reported."""
    try:
        with tarfile.open(tar_path) as tar:
            members = _safe_members(tar, strip, where)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        tar_path.unlink(missing_ok=True)
        raise HeroError(f"{tar_path} (from {where}) is not a complete tar archive ({err}); it "
                        "was removed: re-run to download it again.") from None


def _clean_leftovers(dest: Path) -> None:
    """Remove temporary folders an interrupted extraction left next to ``dest``."""
    for tmp in dest.parent.glob(f".{dest.name}.extract-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def install(item: Item, root: Path, base: str) -> bool:
    """Fetch (and extract) one item under ``root``; False when it was already present."""
    dest = root / item.path
    url = item.url(base)
    if not item.archive:
        return fetch(url, dest)
    _clean_leftovers(dest)
    tar_path = dest.with_name(dest.name + ".tar")
    if dest.exists():
        tar_path.unlink(missing_ok=True)
        return False
    fetch(url, tar_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        _extract(tar_path, tmp, item.strip, url)
        top = tmp / dest.name
        if not top.is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            tar_path.unlink()
            raise HeroError(f"{url}: the archive holds no {dest.name}/ (after stripping "
                            f"{item.strip} leading folder(s)) but {found}; it is not upstream's "
                            f"release. {MIRROR_HINT}")
        for extra in sorted(tmp.iterdir()):  # as `tar -C`, anything else lands beside it
            if extra.name != dest.name and not (dest.parent / extra.name).exists():
                extra.rename(dest.parent / extra.name)
        top.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tar_path.unlink()
    return True


def download(dataset: str, root: Path, base: str | None = None) -> int:
    """Everything ``dataset`` needs under ``root`` in upstream's layout; returns the number of
    items fetched (0 on a re-run)."""
    base = base or base_url()
    root = Path(root)
    for folder in LAYOUT:
        (root / folder).mkdir(parents=True, exist_ok=True)
    items = MANIFESTS[dataset]
    fetched = 0
    for n, item in enumerate(items, 1):
        LOGGER.info("[%d/%d] %s", n, len(items), item.path)
        if install(item, root, base):
            fetched += 1
        else:
            LOGGER.info("        present, skipped")
    LOGGER.info("%s: %d fetched, %d already present, under %s (from %s)", dataset, fetched,
                len(items) - fetched, root, base)
    return fetched


def _file_dest(url: str, dest: str) -> Path:
    """``DEST`` as given, or ``DEST/<name in URL>`` when DEST is a folder (as ``wget -P``)."""
    if dest.endswith(("/", os.sep)) or Path(dest).is_dir():
        name = PurePosixPath(urlsplit(url).path).name
        if not name:
            raise HeroError(f"{url}: no file name in the URL; give DEST as a file path")
        return Path(dest) / name
    return Path(dest)


def _parser(file_mode: bool) -> argparse.ArgumentParser:
    if file_mode:
        parser = argparse.ArgumentParser(
            prog="python -m scripts.download file",
            description="Fetch one file resumably (DEST.part, renamed when complete); "
                        "nothing is fetched when DEST exists.")
        parser.add_argument("url", metavar="URL")
        parser.add_argument("dest", metavar="DEST", help="file path, or a folder to put it in")
        return parser
    parser = argparse.ArgumentParser(
        prog="python -m scripts.download", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download a dataset of upstream's release into PATH_TO_STORAGE.",
        epilog=f"release address: ${ENV_URL} or {BLOB}\n"
               "one file: python -m scripts.download file URL DEST")
    parser.add_argument("dataset", metavar="DATASET", choices=sorted(MANIFESTS),
                        help="one of: " + ", ".join(MANIFESTS))
    parser.add_argument("storage", metavar="PATH_TO_STORAGE")
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["file"]:
        opts = _parser(True).parse_args(argv[1:])
        dest = _file_dest(opts.url, opts.dest)
        LOGGER.info("%s: %s", dest, "downloaded" if fetch(opts.url, dest)
                    else "present, nothing fetched")
        return
    opts = _parser(False).parse_args(argv)
    download(opts.dataset, Path(opts.storage))


if __name__ == "__main__":
    run_main(main)

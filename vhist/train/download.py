"""``vhist data download``: Imagenette and CIFAR from their publishers' own URLs.

A download goes to ``ROOT/<archive>.part`` and resumes from its size with an HTTP
``Range`` request after an interruption (Ctrl-C, a dropped connection); a server that
ignores the range restarts it from zero. The complete archive is verified: CIFAR against
the MD5 sums published on its page (https://www.cs.toronto.edu/~kriz/cifar.html);
Imagenette has no published checksum (https://github.com/fastai/imagenette), so its
archive is verified by reading its whole tar listing and decompressing the gzip stream
to its end (which checks its CRC and length), and by its top-level folder, and the SHA-256 computed here is
printed for the record, never compared with an invented value. The archive is
extracted into a hidden temporary folder in ``ROOT`` and its dataset folder renamed
into place (atomic on one filesystem), so a crash or Ctrl-C never leaves a
half-written dataset; the temporary folder is removed on failure.

``VHIST_DATA_MIRROR`` (or ``--mirror``, or ``mirror=``) replaces the publisher's URL
up to the archive name, e.g. for a local copy or the tests' server.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vhist.train.data import CIFAR10_FILES, CIFAR100_FILES

MIRROR_ENV = "VHIST_DATA_MIRROR"
CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(ValueError):
    """A download that cannot complete: no network, a bad checksum or archive, a full disk."""


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set is published and what its archive must hold."""

    url: str                  # the publisher's URL of the archive
    folder: str               # the archive's single top-level folder
    contents: tuple           # entries that folder must have (vhist's loader needs them)
    md5: Optional[str]        # the publisher's MD5, None where none is published
    page: str                 # where the publisher documents it


_FASTAI = "https://s3.amazonaws.com/fast-ai-imageclas/"
_IMAGENETTE_PAGE = "https://github.com/fastai/imagenette"
_TORONTO = "https://www.cs.toronto.edu/~kriz/"
DATASETS = {
    "imagenette2": DatasetSource(_FASTAI + "imagenette2.tgz", "imagenette2", ("train", "val"), None,
                                 _IMAGENETTE_PAGE),
    "imagenette2-160": DatasetSource(_FASTAI + "imagenette2-160.tgz", "imagenette2-160", ("train", "val"), None,
                                     _IMAGENETTE_PAGE),
    "imagenette2-320": DatasetSource(_FASTAI + "imagenette2-320.tgz", "imagenette2-320", ("train", "val"), None,
                                     _IMAGENETTE_PAGE),
    "cifar10": DatasetSource(_TORONTO + "cifar-10-python.tar.gz", "cifar-10-batches-py", tuple(CIFAR10_FILES),
                             "c58f30108f718f92721af3b95e74349a", _TORONTO + "cifar.html"),
    "cifar100": DatasetSource(_TORONTO + "cifar-100-python.tar.gz", "cifar-100-python", tuple(CIFAR100_FILES),
                              "eb9058c3a382ffc7106e4002c42a8d85", _TORONTO + "cifar.html"),
}


def dataset_source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` of ``name``.

    Raises:
        ValueError: for an unknown name, listing the close matches and all names.
    """
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name.lower(), list(DATASETS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown data set {name!r}; {hint}vhist data download knows {', '.join(DATASETS)}")


def archive_url(source: DatasetSource, mirror: Optional[str] = None) -> str:
    """The URL to fetch: the publisher's, or the archive's name under ``mirror``
    (default: the ``VHIST_DATA_MIRROR`` environment variable)."""
    base = mirror or os.environ.get(MIRROR_ENV)
    return source.url if not base else base.rstrip("/") + "/" + source.url.rsplit("/", 1)[1]


def _write_error(path: Path, exc: OSError, need: Optional[int] = None) -> DownloadError:
    free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    want = f", about {need / 1e6:.0f} MB more are needed" if need else ""
    return DownloadError(f"disk full writing {path} ({free / 1e6:.0f} MB free{want}): free some space and run "
                         f"the same command again (a partial download resumes)") if exc.errno == errno.ENOSPC \
        else DownloadError(f"cannot write {path}: {exc.strerror or exc}")


def _total_from_content_range(value: Optional[str]) -> Optional[int]:
    match = re.search(r"/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def fetch(url: str, part: Path, desc: str = "download") -> int:
    """Downloads ``url`` into ``part``, resuming from the bytes already there.

    Returns:
        The size of the complete file.

    Raises:
        DownloadError: no connection, an HTTP error, a transfer cut short (``part`` is
            kept and resumes on the next call), or a full disk.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        total = _total_from_content_range(exc.headers.get("Content-Range"))
        if exc.code == 416 and offset and total == offset:  # the part is already complete
            return offset
        if exc.code == 416 and offset:  # a part that does not fit the file: start again
            part.unlink()
            return fetch(url, part, desc)
        raise DownloadError(f"{url}: HTTP error {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}): check the network connection, or point "
                            f"{MIRROR_ENV} / --mirror at a copy") from None
    with response:
        if offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise DownloadError(f"{url}: the server resumed at the wrong offset "
                                    f"({response.headers.get('Content-Range')!r}, asked {offset})")
            total, mode = _total_from_content_range(response.headers.get("Content-Range")), "ab"
        else:  # a fresh download, or a server that ignores Range: from zero
            length = response.headers.get("Content-Length")
            offset, total, mode = 0, int(length) if length else None, "wb"
        if total is not None and shutil.disk_usage(part.parent).free < total - offset:
            free = shutil.disk_usage(part.parent).free
            raise DownloadError(f"not enough space in {part.parent} for {desc}: {free / 1e6:.0f} MB free, the "
                                f"download needs {(total - offset) / 1e6:.0f} MB more (and as much again to extract)")
        print(f"downloading {url}" + (f" (resuming at byte {offset:,})" if offset else "")
              + (f": {total / 1e6:.1f} MB" if total else ""), file=sys.stderr, flush=True)
        tty = sys.stderr.isatty()
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not tty, leave=False)
        got, tenths = offset, offset * 10 // total if total else 0
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        data = response.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, socket.timeout):
                        break
                    if not data:
                        break
                    f.write(data)
                    bar.update(len(data))
                    got += len(data)
                    if not tty and total and got * 10 // total > tenths:  # off a terminal: every 10%
                        tenths = got * 10 // total
                        print(f"{desc}: {got:,} of {total:,} bytes ({100 * got // total}%)", file=sys.stderr,
                              flush=True)
        except OSError as exc:
            have = part.stat().st_size if part.exists() else 0
            raise _write_error(part, exc, None if total is None else total - have) from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"the download of {url} stopped at {size:,} of {total:,} bytes; run the same command "
                            f"again to resume it ({part} is kept)")
    return size


def file_digests(path: Path) -> dict:
    """``{"md5": ..., "sha256": ...}`` of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def check_archive(path: Path, source: DatasetSource) -> int:
    """Reads the tar listing of ``path`` and the rest of its (decompressed) stream to the
    end, so that gzip checks its CRC and length; checks that every entry lies in
    ``source.folder``. Returns the number of entries.

    tarfile ends a listing quietly at a damaged member header; what follows the listing
    must then be the end-of-archive zero padding, or the archive is damaged.

    Raises:
        DownloadError: a truncated or damaged archive, or one with other contents.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for block in iter(lambda: tar.fileobj.read(CHUNK), b""):
                if block.count(0) != len(block):
                    raise tarfile.ReadError(f"data after the end of the listing ({len(members)} entries): a damaged "
                                            "member header")
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise DownloadError(f"{path} is not a complete tar archive ({type(exc).__name__}: {exc})") from None
    # "./imagenette2/..." and "imagenette2/..." are the same entry ("." alone is the root).
    names = [n for n in (m.name.removeprefix("./") for m in members) if n not in ("", ".")]
    unsafe = [m.name for m in members if m.name.startswith("/") or ".." in m.name.split("/")
              or not (m.isfile() or m.isdir())]
    if unsafe:  # the published archives hold plain files and folders only
        raise DownloadError(f"{path} holds an entry that is not a plain file or folder inside it: {unsafe[0]!r}")
    strays = [n for n in names if n.split("/", 1)[0] != source.folder]
    if not names or strays:
        raise DownloadError(f"{path} does not hold the expected folder {source.folder}/ only"
                            + (f" (found {strays[0]!r})" if strays else " (empty archive)"))
    return len(names)


def verify(path: Path, name: str, source: DatasetSource) -> dict:
    """Verifies a complete archive: the publisher's MD5 where one exists, and its tar
    listing (see the module doc). Returns its digests and how it was verified.

    Raises:
        DownloadError: on a mismatch or a damaged archive (the file is then removed).
    """
    digests = file_digests(path)
    try:
        if source.md5 is not None and digests["md5"] != source.md5:
            raise DownloadError(f"checksum mismatch for {name}: MD5 of the download is {digests['md5']}, the "
                                f"publisher's is {source.md5} ({source.page})")
        entries = check_archive(path, source)
    except DownloadError as exc:
        path.unlink()
        raise DownloadError(f"{exc}; the damaged download was removed, run the same command again") from None
    how = "MD5 as published" if source.md5 else "tar listing read in full (no checksum is published)"
    return {**digests, "verified": how, "entries": entries}


def extract(archive: Path, root: Path, source: DatasetSource) -> Path:
    """Extracts ``archive`` into a temporary folder in ``root`` and renames its dataset
    folder to ``root/source.folder``; the temporary folder never outlives the call.

    Raises:
        DownloadError: the folder lacks what the loader needs, or the disk is full.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.folder}.extract-", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            # check_archive let only plain files and folders under source.folder through;
            # the "data" filter (Python >= 3.10.12 / 3.11.4) checks again where it exists.
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        folder = tmp / source.folder
        missing = [c for c in source.contents if not (folder / c).exists()]
        if missing:
            raise DownloadError(f"{archive}: {source.folder}/ lacks {missing}; not the published archive")
        dest = root / source.folder
        os.rename(folder, dest)
        return dest
    except tarfile.TarError as exc:
        raise DownloadError(f"{archive}: cannot extract ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise _write_error(tmp, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, root: str | os.PathLike = "~/data", mirror: Optional[str] = None,
             keep_archive: bool = False) -> dict:
    """Downloads, verifies and extracts data set ``name`` into ``root``.

    Args:
        name: a key of :data:`DATASETS`.
        root: the folder that receives ``<folder>/`` (created if missing).
        mirror: a base URL instead of the publisher's (default: ``VHIST_DATA_MIRROR``).
        keep_archive: keep ``ROOT/<archive>`` after extraction.

    Returns:
        ``{"name", "path", "url", "md5", "sha256", "verified", ...}``; ``"status"`` is
        ``"downloaded"`` or ``"present"`` (the folder already existed: nothing done).

    Raises:
        ValueError: an unknown name. DownloadError: see :func:`fetch`, :func:`verify`,
            :func:`extract`.
    """
    source = dataset_source(name)
    root = Path(root).expanduser()
    dest = root / source.folder
    if dest.exists():
        return {"name": name, "path": str(dest), "status": "present"}
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(root, exc) from None
    for stale in root.glob(f".{source.folder}.extract-*"):  # left by a killed extraction
        shutil.rmtree(stale, ignore_errors=True)
    url = archive_url(source, mirror)
    archive = root / url.rsplit("/", 1)[1]
    part = archive.with_name(archive.name + ".part")
    if not archive.is_file():
        fetch(url, part, desc=name)
        checked = verify(part, name, source)
        os.replace(part, archive)
    else:
        checked = verify(archive, name, source)
    path = extract(archive, root, source)
    if not keep_archive:
        archive.unlink()
    return {"name": name, "path": str(path), "status": "downloaded", "url": url, **checked}


def _run_download(args) -> int:
    result = download(args.name, args.root, args.mirror, args.keep_archive)
    if result["status"] == "present":
        print(f"{result['path']} already exists: nothing to download (remove it to fetch {args.name} again)")
        return 0
    print(f"{args.name}: {result['path']} ({result['entries']:,} archive entries; verified: {result['verified']}; "
          f"sha256 {result['sha256']})")
    print(f"train on it with: vhist train --data {result['path']} ...")
    return 0


def add_data_parser(commands) -> argparse.ArgumentParser:
    """``vhist data download NAME --root DIR`` and ``vhist data make digits --root DIR``."""
    p = commands.add_parser("data", help="fetch a data set (Imagenette, CIFAR) or make one (digits)",
                            description="Data sets from their publishers' URLs.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = sub.add_parser("download", help="download, verify and extract a data set",
                       description="Download, verify and extract a data set into ROOT/<its folder>; an "
                                   "interrupted download resumes when run again.",
                       epilog="data sets (the publishers' URLs):\n" + "\n".join(
                           f"  {k:<16} {v.url}" for k, v in DATASETS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("name", metavar="NAME", help=", ".join(DATASETS))
    d.add_argument("--root", default="~/data", help="folder that receives the data set (default: ~/data)")
    d.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive after extraction")
    d.add_argument("--mirror", default=None, help=argparse.SUPPRESS)
    d.set_defaults(run=_run_download)
    from vhist.cli_args import add_debug_flag
    from vhist.train.digits import DATASETS as MADE, run_make

    add_debug_flag(d)
    m = sub.add_parser("make", help="write a small data set that ships with a package (digits: scikit-learn's)",
                       description="Write scikit-learn's handwritten digits (1,797 8x8 scans upsampled to 32 px, "
                                   "a fixed seeded 1,438 / 359 train / test split) as a CIFAR-10 folder "
                                   "ROOT/digits-32, which every command that takes CIFAR data takes. Needs "
                                   "scikit-learn (pip install 'vhist[data]').")
    m.add_argument("name", metavar="NAME", help=", ".join(MADE))
    m.add_argument("--root", default="~/data", help="folder that receives digits-32/ (default: ~/data)")
    m.set_defaults(run=run_make)
    add_debug_flag(m)
    return p

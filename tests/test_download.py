"""``vhist data download`` against a local HTTP server on 127.0.0.1 serving small
archives built here (good, truncated, corrupted, cut mid-transfer): checksums, resume,
atomic extraction and the one-line errors. Nothing here may reach a non-loopback address."""
import builtins
import dataclasses
import errno
import hashlib
import http.server
import io
import ipaddress
import re
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from vhist.__main__ import main
from vhist.train import download as dl
from vhist.train.data import load_data


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Any connection to an address that is not loopback fails the test."""
    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"test tried to reach {address}"
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


class Server:
    """http.server in a thread: ``files`` by name, Range support (``ranges``), a one-off
    ``cut[name] = n`` that sends n bytes of the body and closes, and a request log."""

    def __init__(self):
        self.files, self.cut, self.log, self.ranges = {}, {}, [], True
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name, rng = self.path.lstrip("/"), self.headers.get("Range")
                owner.log.append((name, rng))
                data = owner.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(re.match(r"bytes=(\d+)-$", rng).group(1)) if rng and owner.ranges else 0
                if start >= len(data) and rng and owner.ranges:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                self.wfile.write(body[:owner.cut.pop(name)] if name in owner.cut else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _targz(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """tar.gz bytes of a tiny Imagenette-style tree and a tiny CIFAR-10 folder."""
    from train_helpers import write_cifar10, write_image_folder

    src = tmp_path_factory.mktemp("src")
    nette = _targz(Path(write_image_folder(src / "n", per_class=4, n_test=2, size=24)), "imagenette2-160")
    cifar = _targz(Path(write_cifar10(src / "c", per_batch=8, n_test=8)), "cifar-10-batches-py")
    return {"imagenette2-160.tgz": nette, "cifar-10-python.tar.gz": cifar}


def _get(server, root, name="imagenette2-160", *extra):
    return main(["data", "download", name, "--root", str(root), "--mirror", server.url, *extra])


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith(("downloading ", "imagenette2-160: ", "cifar"))]
    assert len(err) == 1 and err[0].startswith("vhist data: error: "), err
    return err[0]


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_sources_are_the_publishers():
    for name in ("imagenette2", "imagenette2-160", "imagenette2-320"):
        src = dl.DATASETS[name]
        assert src.url == f"https://s3.amazonaws.com/fast-ai-imageclas/{name}.tgz" and src.md5 is None
    # the MD5 sums of the python archives published on https://www.cs.toronto.edu/~kriz/cifar.html
    assert dl.DATASETS["cifar10"].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert dl.DATASETS["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert dl.DATASETS["cifar100"].url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert dl.DATASETS["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_mirror_replaces_the_base_url(monkeypatch):
    src = dl.DATASETS["cifar100"]
    assert dl.archive_url(src) == src.url
    assert dl.archive_url(src, "http://127.0.0.1:1/x/") == "http://127.0.0.1:1/x/cifar-100-python.tar.gz"
    monkeypatch.setenv(dl.MIRROR_ENV, "file:///copies")
    assert dl.archive_url(src) == "file:///copies/cifar-100-python.tar.gz"


def test_good_archive_is_verified_extracted_and_loads(server, archives, tmp_path, capsys):
    server.files.update(archives)
    root = tmp_path / "data"
    assert _get(server, root) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(archives["imagenette2-160.tgz"]).hexdigest()
    assert f"sha256 {sha}" in out and "no checksum is published" in out
    assert _leftovers(root) == ["imagenette2-160"]  # no .part, archive or temporary folder left
    data = load_data(str(root / "imagenette2-160"), 0.0)
    assert data.kind == "folder" and data.num_classes == 3 and len(data.test_idx) == 6
    requests = len(server.log)
    assert _get(server, root) == 0 and "already exists" in capsys.readouterr().out
    assert len(server.log) == requests  # nothing fetched again


def test_cifar_is_checked_against_its_md5(server, archives, tmp_path, capsys, monkeypatch):
    server.files.update(archives)
    # The real MD5 belongs to the real archive: this one is refused, and removed.
    assert _get(server, tmp_path, "cifar10") == 2
    line = _error_line(capsys)
    md5 = hashlib.md5(archives["cifar-10-python.tar.gz"]).hexdigest()
    assert f"checksum mismatch for cifar10: MD5 of the download is {md5}" in line
    assert "c58f30108f718f92721af3b95e74349a" in line and "removed" in line
    assert _leftovers(tmp_path) == []
    # With this archive's own MD5 as the published one, it is accepted.
    monkeypatch.setitem(dl.DATASETS, "cifar10", dataclasses.replace(dl.DATASETS["cifar10"], md5=md5))
    assert _get(server, tmp_path, "cifar10", "--keep-archive") == 0
    assert "MD5 as published" in capsys.readouterr().out
    assert _leftovers(tmp_path) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert load_data(str(tmp_path / "cifar-10-batches-py"), 0.1).kind == "cifar10"


def test_truncated_archive_is_refused(server, archives, tmp_path, capsys):
    data = archives["imagenette2-160.tgz"]
    server.files["imagenette2-160.tgz"] = data[: len(data) * 2 // 3]  # served whole: the file itself is short
    assert _get(server, tmp_path) == 2
    assert "is not a complete tar archive" in _error_line(capsys)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["imagenette2-160", "cifar10"])
def test_corrupted_archive_is_refused(server, archives, tmp_path, capsys, monkeypatch, name):
    key = dl.archive_url(dl.DATASETS[name], "x").rsplit("/", 1)[1]
    good = archives[key]
    monkeypatch.setitem(dl.DATASETS, "cifar10", dataclasses.replace(dl.DATASETS["cifar10"],
                                                                    md5=hashlib.md5(archives[key]).hexdigest()))
    bad = bytearray(good)
    for i in range(len(bad) // 2, len(bad) // 2 + 64):
        bad[i] ^= 0xFF
    server.files[key] = bytes(bad)
    assert _get(server, tmp_path, name) == 2
    line = _error_line(capsys)
    assert ("checksum mismatch" if name == "cifar10" else "is not a complete tar archive") in line
    assert _leftovers(tmp_path) == []


def test_wrong_contents_are_refused(server, tmp_path, capsys):
    folder = tmp_path / "src" / "other"
    folder.mkdir(parents=True)
    (folder / "x.txt").write_text("x")
    server.files["imagenette2-160.tgz"] = _targz(folder, "other")
    assert _get(server, tmp_path / "root") == 2
    assert "does not hold the expected folder imagenette2-160/ only (found 'other')" in _error_line(capsys)


def test_interrupted_download_resumes(server, archives, tmp_path, capsys):
    data = archives["imagenette2-160.tgz"]
    server.files.update(archives)
    half = len(data) // 2
    server.cut["imagenette2-160.tgz"] = half
    assert _get(server, tmp_path) == 2
    line = _error_line(capsys)
    assert f"stopped at {half:,} of {len(data):,} bytes; run the same command again to resume" in line
    part = tmp_path / "imagenette2-160.tgz.part"
    assert part.read_bytes() == data[:half]
    assert _get(server, tmp_path) == 0
    assert server.log[-1] == ("imagenette2-160.tgz", f"bytes={half}-")
    err = capsys.readouterr().err
    assert f"resuming at byte {half:,}" in err
    # off a terminal, a plain progress line every 10%
    assert f"imagenette2-160: {len(data):,} of {len(data):,} bytes (100%)" in err
    assert _leftovers(tmp_path) == ["imagenette2-160"]
    assert sum(1 for _ in (tmp_path / "imagenette2-160").rglob("*.JPEG")) == 18


def test_server_without_range_support_restarts(server, archives, tmp_path):
    server.files.update(archives)
    server.ranges = False
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(b"stale bytes of another file")
    assert _get(server, tmp_path) == 0
    assert _leftovers(tmp_path) == ["imagenette2-160"]


def test_complete_part_is_not_fetched_again(server, archives, tmp_path):
    server.files.update(archives)
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(archives["imagenette2-160.tgz"])
    assert _get(server, tmp_path) == 0
    assert server.log == [("imagenette2-160.tgz", f"bytes={len(archives['imagenette2-160.tgz'])}-")]  # 416
    assert _leftovers(tmp_path) == ["imagenette2-160"]


def test_no_network(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["data", "download", "cifar100", "--root", str(tmp_path), "--mirror", f"http://127.0.0.1:{port}"]) == 2
    line = _error_line(capsys)
    assert f"cannot reach http://127.0.0.1:{port}/cifar-100-python.tar.gz" in line and "refused" in line
    assert _leftovers(tmp_path) == []


def test_missing_file_on_server(server, tmp_path, capsys):
    assert _get(server, tmp_path, "cifar100") == 2
    assert "HTTP error 404" in _error_line(capsys)


class _FullDisk:
    """A file opened for writing whose writes fail with ENOSPC."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.f = builtins.open(path, mode, *args, **kwargs)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_downloading(server, archives, tmp_path, capsys, monkeypatch):
    server.files.update(archives)
    monkeypatch.setattr(dl, "open", _FullDisk, raising=False)
    assert _get(server, tmp_path) == 2
    line = _error_line(capsys)
    assert f"disk full writing {tmp_path / 'imagenette2-160.tgz.part'}" in line and "free some space" in line
    monkeypatch.undo()
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: type("U", (), {"free": 100})())
    assert _get(server, tmp_path) == 2
    assert "not enough space in" in _error_line(capsys)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_extraction_leaves_nothing_half_written(server, archives, tmp_path, capsys, monkeypatch, failure):
    server.files.update(archives)
    extractall = tarfile.TarFile.extractall

    def half_then_fail(self, path, *args, **kwargs):
        (Path(path) / "imagenette2-160").mkdir()
        (Path(path) / "imagenette2-160" / "half.JPEG").write_bytes(b"half")
        raise failure

    monkeypatch.setattr(tarfile.TarFile, "extractall", half_then_fail)
    code = _get(server, tmp_path)
    if isinstance(failure, KeyboardInterrupt):
        assert code == 130 and "vhist data: interrupted" in capsys.readouterr().err
    else:
        assert code == 2 and "disk full writing" in _error_line(capsys)
    # the verified archive stays; no dataset folder and no temporary folder
    assert _leftovers(tmp_path) == ["imagenette2-160.tgz"]
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    requests = len(server.log)
    assert _get(server, tmp_path) == 0
    assert len(server.log) == requests and _leftovers(tmp_path) == ["imagenette2-160"]


def test_unknown_name_lists_close_matches(capsys):
    assert main(["data", "download", "cifar-10", "--root", "/nonexistent"]) == 2
    line = _error_line(capsys)
    assert "unknown data set 'cifar-10'; did you mean cifar10" in line and "imagenette2-320" in line


@pytest.mark.parametrize("entry", ["link", "dotdot"])
def test_unsafe_entries_are_refused(server, tmp_path, capsys, entry):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("imagenette2-160/train" if entry == "link" else "imagenette2-160/../../escape")
        if entry == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc"
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    server.files["imagenette2-160.tgz"] = buf.getvalue()
    assert _get(server, tmp_path / "root") == 2
    assert "not a plain file or folder inside it" in _error_line(capsys)
    assert _leftovers(tmp_path / "root") == [] and not (tmp_path / "escape").exists()

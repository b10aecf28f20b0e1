"""Cache paths and downloads (sweep/assets.py), against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweep import assets
from sweep.assets import (AssetError, cache_root, download, ensure_dataset, ensure_weights, extract_zip,
                          weights_path, weights_url)
from sweep.model.checkpoint import load_checkpoint


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files from a folder; supports ``Range: bytes=N-`` unless the server says not to.

    ``server.cut_once = {name: n}`` sends only the first n bytes of that file once (with the
    full Content-Length) and drops the connection, like a network failure mid-transfer.
    """

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = int(rng[6:].split("-")[0]) if rng and srv.ranges and rng.startswith("bytes=") else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut_once.pop(path.name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.requests, httpd.ranges, httpd.cut_once = [], True, {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}", httpd=httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/yolov5n.pt"


def payload(n: int = 300_000) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32) + b"tail"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")))


# --------------------------------------------------------------------------- cache paths


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_CACHE", str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert cache_root(None) == tmp_path / "env"
    assert cache_root("") == tmp_path / "env"
    monkeypatch.delenv("SWEEP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(None) == tmp_path / "xdg" / "yolov5-sparsity"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root(None) == Path.home() / ".cache" / "yolov5-sparsity"
    assert not (tmp_path / "cfg").exists()  # resolving creates nothing


def test_weights_path_and_url(tmp_path):
    assert weights_path(tmp_path, "yolov5s") == tmp_path / "weights" / "yolov5s.pt"
    assert weights_path(tmp_path, "yolov5s.pt") == tmp_path / "weights" / "yolov5s.pt"
    assert weights_url("yolov5x") == "https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5x.pt"
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(AssetError, match="invalid"):
            weights_path(tmp_path, bad)


# --------------------------------------------------------------------------- download()


def test_download_atomic_with_sha256(server, tmp_path):
    data = payload()
    (server.root / "f.bin").write_bytes(data)
    dest = tmp_path / "cache" / "sub" / "f.bin"
    out = download(f"{server.url}/f.bin", dest, sha256=hashlib.sha256(data).hexdigest(), progress=True)
    assert out == dest and dest.read_bytes() == data
    assert leftovers(dest.parent) == []
    # present: kept, no request
    n = len(server.httpd.requests)
    download(f"{server.url}/f.bin", dest, progress=False)
    assert len(server.httpd.requests) == n


def test_download_sha256_mismatch_leaves_nothing(server, tmp_path):
    (server.root / "f.bin").write_bytes(payload())
    dest = tmp_path / "f.bin"
    with pytest.raises(AssetError, match="sha256") as err:
        download(f"{server.url}/f.bin", dest, sha256="0" * 64, progress=False)
    assert f"{server.url}/f.bin" in str(err.value) and str(dest) in str(err.value)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_resumes_after_interrupted_transfer(server, tmp_path):
    data = payload()
    (server.root / "big.bin").write_bytes(data)
    server.httpd.cut_once["big.bin"] = 100_000
    dest = tmp_path / "big.bin"
    with pytest.raises(AssetError, match="big.bin"):
        download(f"{server.url}/big.bin", dest, progress=False)
    part = tmp_path / "big.bin.part"
    assert not dest.exists() and part.stat().st_size == 100_000
    download(f"{server.url}/big.bin", dest, progress=False)
    assert dest.read_bytes() == data and not part.exists()
    assert server.httpd.requests[-1] == ("/big.bin", "bytes=100000-")


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    data = payload()
    (server.root / "f.bin").write_bytes(data)
    server.httpd.ranges = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes from another file")
    download(f"{server.url}/f.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_download_stale_partial_larger_than_file(server, tmp_path):
    data = payload(10_000)
    (server.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 20_000)  # server answers 416: start over
    download(f"{server.url}/f.bin", dest, progress=False)
    assert dest.read_bytes() == data


def test_download_http_error(server, tmp_path):
    with pytest.raises(AssetError, match="HTTP 404") as err:
        download(f"{server.url}/missing.pt", tmp_path / "m.pt", progress=False)
    assert f"{server.url}/missing.pt" in str(err.value)
    assert not (tmp_path / "m.pt").exists()


def test_download_offline(closed_port_url, tmp_path):
    dest = tmp_path / "w.pt"
    with pytest.raises(AssetError) as err:
        download(closed_port_url, dest, progress=False, timeout=5)
    assert closed_port_url in str(err.value) and str(dest) in str(err.value)


def test_concurrent_downloads_of_one_file(server, tmp_path):
    data = payload()
    (server.root / "f.bin").write_bytes(data)
    dest = tmp_path / "f.bin"
    errors = []

    def worker():
        try:
            download(f"{server.url}/f.bin", dest, progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and dest.read_bytes() == data
    assert len(server.httpd.requests) == 1  # the lock made the others find the finished file


# --------------------------------------------------------------------------- weights


@pytest.mark.assets
def test_ensure_weights_downloads_and_verifies(server, tmp_path, yolov5n_path):
    (server.root / "yolov5n.pt").write_bytes(yolov5n_path.read_bytes())
    cache = tmp_path / "cache"
    path = ensure_weights("yolov5n", cache, url=f"{server.url}/yolov5n.pt", progress=False, verify=load_checkpoint)
    assert path == cache / "weights" / "yolov5n.pt"
    assert load_checkpoint(path).sha256 == load_checkpoint(yolov5n_path).sha256
    assert leftovers(cache) == []
    n = len(server.httpd.requests)
    assert ensure_weights("yolov5n", cache, url=f"{server.url}/yolov5n.pt") == path
    assert len(server.httpd.requests) == n


def test_ensure_weights_rejects_a_file_that_does_not_load(server, tmp_path):
    (server.root / "yolov5n.pt").write_bytes(b"<html>rate limited</html>")
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="not usable") as err:
        ensure_weights("yolov5n", cache, url=f"{server.url}/yolov5n.pt", progress=False, verify=load_checkpoint)
    assert "cannot load" in str(err.value)
    assert not weights_path(cache, "yolov5n").exists() and leftovers(cache) == []


def test_ensure_weights_offline_says_where_to_put_the_file(closed_port_url, tmp_path):
    with pytest.raises(AssetError) as err:
        ensure_weights("yolov5n", tmp_path, url=closed_port_url, progress=False, timeout=5)
    message = str(err.value)
    assert closed_port_url in message
    assert str(tmp_path / "weights" / "yolov5n.pt") in message and "model.weights" in message


def test_ensure_weights_uses_an_existing_file_without_network(closed_port_url, tmp_path):
    dest = weights_path(tmp_path, "mine")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"anything")
    assert ensure_weights("mine", tmp_path, url=closed_port_url) == dest


def test_resolve_weights(tmp_path):
    own = tmp_path / "best.pt"
    own.write_bytes(b"x")
    assert assets.resolve_weights("yolov5n", tmp_path, weights=str(own)) == own
    with pytest.raises(AssetError, match="no such file"):
        assets.resolve_weights("yolov5n", tmp_path, weights=str(tmp_path / "nope.pt"))


# --------------------------------------------------------------------------- datasets


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def coco_like_archives(root: Path) -> list[dict]:
    make_zip(root / "labels.zip", {"coco/labels/val2017/000000000139.txt": b"0 0.5 0.5 0.1 0.1\n",
                                   "coco/annotations/instances_val2017.json": b"{}",
                                   "coco/val2017.txt": b"./images/val2017/000000000139.jpg\n"})
    make_zip(root / "val2017.zip", {"val2017/000000000139.jpg": b"\xff\xd8jpeg", "val2017/": b""})
    return [{"url": "labels.zip", "strip": 1}, {"url": "val2017.zip", "dir": "images"}]


def test_ensure_dataset_layout_and_atomicity(server, tmp_path):
    entries = [{**e, "url": f"{server.url}/{e['url']}"} for e in coco_like_archives(server.root)]
    cache = tmp_path / "cache"
    root = ensure_dataset("coco", cache, entries, progress=False)
    assert root == cache / "datasets" / "coco"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["annotations/instances_val2017.json", "images/val2017/000000000139.jpg",
                     "labels/val2017/000000000139.txt", "val2017.txt"]
    assert not list((cache / "downloads").glob("*.zip"))  # archives removed after extraction
    assert [p.name for p in (cache / "datasets").iterdir() if not p.name.endswith(".lock")] == ["coco"]
    n = len(server.httpd.requests)
    assert ensure_dataset("coco", cache, entries) == root
    assert len(server.httpd.requests) == n


def test_ensure_dataset_failure_leaves_no_partial_dataset(server, tmp_path):
    entries = [{**e, "url": f"{server.url}/{e['url']}"} for e in coco_like_archives(server.root)]
    os.rename(server.root / "val2017.zip", server.root / "later.zip")
    cache = tmp_path / "cache"
    with pytest.raises(AssetError, match="val2017.zip"):
        ensure_dataset("coco", cache, entries, progress=False)
    assert not (cache / "datasets" / "coco").exists()
    assert [p for p in (cache / "datasets").iterdir() if p.name.endswith(".tmp")] == []
    # the archive already fetched is kept and not fetched again on the next attempt
    os.rename(server.root / "later.zip", server.root / "val2017.zip")
    ensure_dataset("coco", cache, entries, progress=False)
    assert [r[0] for r in server.httpd.requests].count("/labels.zip") == 1


def test_zip_slip_is_refused(tmp_path):
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"1", "../../escaped.txt": b"2"})
    with pytest.raises(AssetError, match="outside"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_corrupt_zip_and_bad_entries(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(AssetError, match="not a readable zip"):
        extract_zip(tmp_path / "bad.zip", tmp_path / "out")
    for entry in ({"uri": "x.zip"}, {"url": "http://h/x.tar.gz"}, {"url": "http://h/x.zip", "dir": "../up"}):
        with pytest.raises(AssetError):
            ensure_dataset("d", tmp_path, [entry])
    with pytest.raises(AssetError, match="no download entries"):
        ensure_dataset("d", tmp_path, [])


def test_offline_every_missing_input_file_is_listed_once(tmp_path):
    """No network (an unroutable name): one message lists the weights and both COCO archives, each with
    the place to put it, instead of failing on the first one."""
    from helpers import make_cfg

    from sweep.config.resolve import resolve_job
    from sweep.memo import ProcessMemo

    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco", f"paths.cache={tmp_path / 'cache'}",
                   "model.url=http://no-such-host.invalid/yolov5n.pt",
                   "data.download=[{url: 'http://no-such-host.invalid/labels.zip'}, "
                   "{url: 'http://no-such-host.invalid/val2017.zip', dir: images}]")
    with pytest.raises(AssetError) as err:
        resolve_job(cfg, ProcessMemo())
    msg = str(err.value)
    assert msg.startswith("missing input files: (1)")
    for name in ("yolov5n.pt", "labels.zip", "val2017.zip"):
        assert msg.count(f"no-such-host.invalid/{name}") == 1, name
    assert str(tmp_path / "cache" / "downloads" / "val2017.zip") in msg and "Without network access" in msg
    assert not (tmp_path / "cache" / "datasets" / "coco").exists()


def test_a_read_only_cache_is_never_written_not_even_a_lock(tmp_path):
    """Regression: with SWEEP_CACHE pointing at the read-only test assets, a missing checkpoint or dataset
    left lock files (and a downloads/ folder) inside them, as root passes every access check. A cache made
    read-only by its mode bits is now only read: the message says what is missing and what to do."""
    import os
    import stat

    from sweep.assets import AssetError, ensure_dataset, ensure_weights

    cache = tmp_path / "assets"
    (cache / "weights").mkdir(parents=True)
    (cache / "datasets").mkdir()
    for folder in (cache / "weights", cache / "datasets", cache):
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        with pytest.raises(AssetError, match=r"yolov5s\.pt is missing .* is read-only \(its mode bits\)"):
            ensure_weights("yolov5s", cache, "http://127.0.0.1:9/yolov5s.pt")
        with pytest.raises(AssetError, match=r"dataset 'coco' is not in .* read-only .* point data.path at it"):
            ensure_dataset("coco", cache, [{"url": "http://127.0.0.1:9/coco.zip"}])
        assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == ["datasets", "weights"]
    finally:
        for folder in (cache, cache / "weights", cache / "datasets"):
            os.chmod(folder, stat.S_IRWXU)


def test_coco_train2017_is_fetched_on_first_need_into_the_dataset(server, tmp_path):
    """data=coco's train split (19 GB) is not part of the dataset download; a recovery that trains or
    calibrates on it fetches it then, into the existing dataset folder, atomically and once."""
    from omegaconf import OmegaConf

    from helpers import make_cfg
    from sweep.config.resolve import _container, resolve_data, resolve_recover

    cache = tmp_path / "cache"
    coco = cache / "datasets" / "coco"
    (coco / "images" / "val2017").mkdir(parents=True)
    (coco / "images" / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8jpeg")
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text("{}")
    make_zip(server.root / "train2017.zip", {"train2017/000000000009.jpg": b"\xff\xd8jpeg", "train2017/": b""})
    cfg = make_cfg(tmp_path / "out", "data=coco", "recover=bn", "prune.fused=false", f"paths.cache={cache}")
    c = _container(cfg)
    c["data"]["train_download"] = [{"url": f"{server.url}/train2017.zip", "dir": "images"}]
    data = resolve_data(c, cache)
    spec = resolve_recover(c, data)
    assert spec.source == str(coco / "images" / "train2017") and spec.source_key == "data.train"
    assert [p.name for p in (coco / "images" / "train2017").iterdir()] == ["000000000009.jpg"]
    assert not [p for p in coco.iterdir() if p.name.endswith(".tmp")]
    n = len(server.httpd.requests)
    resolve_recover(c, data)  # present now: not fetched again
    assert len(server.httpd.requests) == n
    assert OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "coco.yaml").train_download[0].url.endswith(
        "/zips/train2017.zip")

"""The local cache of weights and datasets, and atomic, resumable downloads.

Cache layout (root: ``paths.cache``, else ``$SWEEP_CACHE``, else ``~/.cache/yolov5-sparsity``)::

    weights/<name>.pt
    datasets/<name>/images/<split>/*.jpg, datasets/<name>/labels/<split>/*.txt
    downloads/      archives while a dataset is being fetched

A download goes to ``<dest>.part`` (resumed with an HTTP Range request when a previous
attempt left one), is checked (sha256 and/or a verify callback), then renamed onto
``dest``: a reader never sees a half-written file. Concurrent processes fetching the
same file serialise on a lock file beside it (POSIX ``flock``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process lock
    fcntl = None

CACHE_ENV = "SWEEP_CACHE"
CACHE_DIRNAME = "yolov5-sparsity"
WEIGHTS_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/{name}.pt"
CHUNK = 1 << 16
USER_AGENT = "yolov5-sparsity-sweep"


class AssetError(RuntimeError):
    """A weight or dataset file that cannot be found or fetched; says which URL and where to put it."""


# ---------------------------------------------------------------------------------------
# Cache paths
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Per-user cache: ``$XDG_CACHE_HOME/yolov5-sparsity`` or ``~/.cache/yolov5-sparsity``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / CACHE_DIRNAME


def cache_root(cfg_value: str | os.PathLike | None = None) -> Path:
    """The cache root: the config value, else ``$SWEEP_CACHE``, else ``default_cache_dir()``.

    Nothing is created here.
    """
    for value in (cfg_value, os.environ.get(CACHE_ENV)):
        if value is not None and str(value).strip():
            return Path(str(value).strip()).expanduser()
    return default_cache_dir()


def _checked_name(name: str, what: str) -> str:
    if not name or name != Path(name).name or name.startswith(".") or "\\" in name:
        raise AssetError(f"{what} name {name!r} is invalid: use a plain name such as 'yolov5s'")
    return name


def weights_path(cache: str | os.PathLike, name: str) -> Path:
    """``<cache>/weights/<name>.pt`` ('yolov5s' or 'yolov5s.pt')."""
    name = _checked_name(name[:-3] if name.endswith(".pt") else name, "weights")
    return Path(cache) / "weights" / f"{name}.pt"


def dataset_path(cache: str | os.PathLike, name: str) -> Path:
    """``<cache>/datasets/<name>``."""
    return Path(cache) / "datasets" / _checked_name(name, "dataset")


def weights_url(name: str) -> str:
    """The official release URL of an Ultralytics YOLOv5 checkpoint."""
    return WEIGHTS_URL.format(name=name[:-3] if name.endswith(".pt") else name)


# ---------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive cross-process lock held while the block runs (released if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], mode: int = 0o644) -> Path:
    """Write ``path`` all or nothing: ``write(tmp)`` fills a hidden temporary file beside it, which is then
    renamed onto ``path`` (a reader never sees half a file; a failure leaves no temporary file behind).
    ``mode``: the file's permissions (the temporary file is created owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def writable(folder: Path) -> bool:
    """True when ``folder`` (or its nearest existing parent) is writable by its mode bits.

    Mode bits rather than ``os.access`` alone: a folder of inputs made read-only (``chmod a-w``, as the
    project's test assets are) stays untouched even for root, who passes every access check.
    """
    p = Path(folder)
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    mode = p.stat().st_mode
    return bool(mode & stat.S_IWUSR) and os.access(p, os.W_OK)


def _read_only(folder: Path) -> str:
    return (f"{folder} is read-only (its mode bits), so nothing is downloaded or locked there; set SWEEP_CACHE "
            "or paths.cache to a writable folder")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _resume_offset(resp, offset: int) -> int:
    """Where the response body starts: ``offset`` for a matching 206, else 0 (full body)."""
    if not offset or getattr(resp, "status", 200) != 206:
        return 0
    content_range = resp.headers.get("Content-Range", "")
    start = content_range.split(" ", 1)[-1].split("-", 1)[0]
    return offset if start.strip() == str(offset) else -1


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Download ``url`` into ``part``, appending to what is already there when the server resumes."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        with _open(url, offset, timeout) as resp:
            start = _resume_offset(resp, offset)
            if start < 0:  # the server answered another range: start over
                resp.close()
                part.unlink()
                return _fetch(url, part, progress, timeout)
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            with open(part, "ab" if start else "wb") as fh, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=part.name[:-5], disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is not a prefix the server accepts
            part.unlink()
            return _fetch(url, part, progress, timeout)
        raise AssetError(f"{url} answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise AssetError(f"{url} failed: {reason}") from e
    if total is not None and part.stat().st_size != total:
        raise AssetError(f"{url} ended early ({part.stat().st_size} of {total} bytes); "
                         "run again to resume")


def _check(part: Path, url: str, sha256: str | None, verify: Callable[[Path], Any] | None) -> None:
    """Remove ``part`` and raise when it fails the sha256 or the verify callback."""
    if sha256:
        got = file_sha256(part)
        if got.lower() != sha256.lower():
            part.unlink()
            raise AssetError(f"{url}: sha256 {got} does not match the expected {sha256}")
    if verify is not None:
        try:
            verify(part)
        except Exception as e:
            part.unlink(missing_ok=True)
            raise AssetError(f"{url} was downloaded but is not usable: {e}") from e


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, *, progress: bool = True,
             timeout: float = 60.0, verify: Callable[[Path], Any] | None = None) -> Path:
    """Fetch ``url`` to ``dest`` atomically; returns ``dest``.

    An existing ``dest`` is kept (checked against ``sha256`` when given). Otherwise the
    body goes to ``<dest>.part`` (resumed when a previous attempt left one), is checked
    with ``sha256`` and ``verify(path)`` (raise to reject), then renamed onto ``dest``.
    Any failure raises ``AssetError`` naming the URL and the destination.
    """
    dest = Path(dest)
    if not dest.is_file() and not writable(dest.parent):  # a folder of inputs: no lock, no partial file
        raise AssetError(f"could not download {url} to {dest}: {_read_only(dest.parent)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if dest.is_file():
            if sha256 and file_sha256(dest).lower() != sha256.lower():
                raise AssetError(f"{dest} exists but its sha256 is not {sha256}: delete it to download again")
            return dest
        try:
            _fetch(url, part, progress, timeout)
            _check(part, url, sha256, verify)
        except AssetError as e:
            raise AssetError(f"could not download {url} to {dest}: {e}") from e
        os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def ensure_weights(name: str, cache: str | os.PathLike, url: str | None = None, *,
                   progress: bool = True, timeout: float = 60.0,
                   verify: Callable[[Path], Any] | None = None) -> Path:
    """``<cache>/weights/<name>.pt``, downloaded (default: the official v7.0 release) when missing.

    A downloaded file must pass ``verify(path)`` (the caller passes the checkpoint loader) before
    it is put in place. An existing file is returned as is.
    """
    dest = weights_path(cache, name)
    if dest.is_file():
        return dest
    url = url or weights_url(name)
    try:
        return download(url, dest, progress=progress, timeout=timeout, verify=verify)
    except AssetError as e:
        raise AssetError(f"{dest} is missing and {url} could not be downloaded ({_reason(e)}). Without network "
                         f"access, download it elsewhere and put it at {dest}, or point model.weights at a local "
                         ".pt file") from e


def _reason(exc: BaseException) -> str:
    """Why a download failed, briefly: the network error ('Name or service not known'), else the
    innermost AssetError's own words (e.g. 'was downloaded but is not usable: ...')."""
    deepest = str(exc)
    while exc is not None:
        if isinstance(exc, (OSError, urllib.error.URLError)) and not isinstance(exc, urllib.error.HTTPError):
            reason = getattr(exc, "reason", None) or exc
            return str(getattr(reason, "strerror", None) or reason)
        if isinstance(exc, AssetError):
            deepest = str(exc)
        exc = exc.__cause__
    return deepest.rsplit(": ", 1)[-1] if deepest.startswith("could not download") else deepest


def resolve_weights(name: str, cache: str | os.PathLike, weights: str | os.PathLike | None = None,
                    url: str | None = None, *, progress: bool = True,
                    verify: Callable[[Path], Any] | None = None) -> Path:
    """The checkpoint to load: ``weights`` when given (must exist), else ``ensure_weights(name)``."""
    if weights is not None and str(weights).strip():
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            raise AssetError(f"model.weights={str(weights)!r}: no such file; allowed is the path of a YOLOv5 .pt "
                             "checkpoint")
        return path.resolve()
    return ensure_weights(name, cache, url, progress=progress, verify=verify)


# ---------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------


def _member_parts(name: str, strip: int, archive: Path) -> tuple[str, ...]:
    """Path components of a zip member below ``strip`` leading folders; refuses escaping paths."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise AssetError(f"{archive}: member {name!r} would be written outside the dataset folder")
    return path.parts[strip:]


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike, strip: int = 0) -> int:
    """Extract ``archive`` under ``dest`` dropping ``strip`` leading folders; returns the file count."""
    archive, dest = Path(archive), Path(dest)
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = _member_parts(info.filename, strip, archive)
                if info.is_dir() or not parts:
                    continue
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                count += 1
    except (zipfile.BadZipFile, EOFError) as e:
        raise AssetError(f"{archive} is not a readable zip archive ({e}): delete it and retry") from e
    return count


def _download_spec(item: Mapping[str, Any]) -> dict[str, Any]:
    """Validated ``{url, sha256, dir, strip, filename}`` from one ``data.download`` entry."""
    allowed = {"url", "sha256", "dir", "strip", "filename"}
    if not isinstance(item, Mapping) or "url" not in item or set(item) - allowed:
        raise AssetError(f"dataset download entry {dict(item) if isinstance(item, Mapping) else item!r} "
                         f"is invalid: allowed keys are {sorted(allowed)}, 'url' required")
    url = str(item["url"])
    filename = str(item.get("filename") or url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0])
    if not filename.endswith(".zip"):
        raise AssetError(f"dataset download {url}: only .zip archives are supported")
    sub = str(item.get("dir") or "")
    if sub and (PurePosixPath(sub).is_absolute() or ".." in PurePosixPath(sub).parts):
        raise AssetError(f"dataset download {url}: dir={sub!r} must be a relative folder")
    return {"url": url, "sha256": item.get("sha256"), "dir": sub, "strip": int(item.get("strip") or 0),
            "filename": _checked_name(filename, "archive")}


def ensure_dataset(name: str, cache: str | os.PathLike, downloads: Sequence[Mapping[str, Any]], *,
                   progress: bool = True, keep_archives: bool = False) -> Path:
    """``<cache>/datasets/<name>``, downloaded and extracted when missing; returns the folder.

    ``downloads``: entries ``{url, sha256?, dir?, strip?, filename?}``; each zip is fetched
    into ``<cache>/downloads`` (resumable) and extracted under ``<root>/<dir>`` with ``strip``
    leading folders removed. Everything is assembled in a hidden staging folder that is
    renamed onto the dataset folder only when complete.
    """
    root = dataset_path(cache, name)
    return _install(name, root, "", root.parent, cache, downloads, progress, keep_archives,
                    f"or put the extracted dataset at {root}, or point data.path at it")


def ensure_split(name: str, cache: str | os.PathLike, split: str, downloads: Sequence[Mapping[str, Any]], *,
                 progress: bool = True, keep_archives: bool = False) -> Path:
    """``<cache>/datasets/<name>/<split>`` (e.g. ``images/train2017``), downloaded on demand into an existing
    dataset folder when missing: a split too big to fetch with the dataset (COCO's train2017, 19 GB) that
    only some jobs need. The archives are extracted into a hidden staging folder inside the dataset and the
    split folder is renamed into place only when complete. Returns the split folder."""
    root = dataset_path(cache, name)
    return _install(f"{name}/{split}", root / split, split, root, cache, downloads, progress, keep_archives,
                    f"or put the images at {root / split}")


def _install(name: str, target: Path, inside: str, home: Path, cache: str | os.PathLike,
             downloads: Sequence[Mapping[str, Any]], progress: bool, keep_archives: bool, hint: str) -> Path:
    """``target``, downloaded when missing: the archives are extracted into a hidden staging folder in ``home``
    and its ``inside`` part ('' : all of it) is renamed onto ``target`` when complete, once, under a lock in
    ``home`` (concurrent processes wait, then find it). Nothing is written where the mode bits say read-only."""
    if target.is_dir():
        return target
    specs = [_download_spec(item) for item in downloads]
    if not specs:
        raise AssetError(f"dataset {name!r} is not in {target} and has no download entries")
    if not writable(home):  # a folder of inputs: no lock, no staging folder, no archives
        raise AssetError(f"dataset {name!r} is not in {target}, and {_read_only(home)}; {hint}")
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / f".{target.name}.lock"):
        if target.is_dir():
            return target
        for stale in home.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        archives = _fetch_all(name, target, specs, Path(cache), progress)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=home))
        try:
            for spec, archive in zip(specs, archives):
                extract_zip(archive, staging / spec["dir"] if spec["dir"] else staging, strip=spec["strip"])
            built = staging / inside if inside else staging
            if not built.is_dir():
                raise AssetError(f"the archives of {target} hold no {inside}/ folder: their entries do not fit")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # what is left of it (nothing when it became the target)
    if not keep_archives:
        for archive in archives:
            archive.unlink(missing_ok=True)
    return target


def _fetch_all(name: str, root: Path, specs: Sequence[Mapping[str, Any]], cache: Path, progress: bool) -> list[Path]:
    """Every archive of a dataset, each tried even when another failed, so that one message lists all
    that are missing (an offline user fixes them in one go)."""
    archives, missing = [], []
    for spec in specs:
        archive = cache / "downloads" / spec["filename"]
        try:
            download(spec["url"], archive, spec["sha256"], progress=progress)
        except AssetError as e:
            missing.append(f"{spec['url']} -> {archive} ({_reason(e)})")
        archives.append(archive)
    if missing:
        raise AssetError(f"dataset {name!r} is not in {root} and {len(missing)} of its {len(specs)} archive(s) could "
                         f"not be downloaded: {'; '.join(missing)}. Without network access, download them elsewhere "
                         "and put each at the path shown (it is extracted on the next run), or point data.path at "
                         "the extracted dataset")
    return archives

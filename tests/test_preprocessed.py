"""The on-disk preprocessing cache: identical results, atomic writes, stale/corrupt entries rebuilt."""

from __future__ import annotations

import os
import shutil
import stat

import torch

from sweep.data.dataset import Dataset
from sweep.data.preprocessed import PreprocessedCache, writable


def _dataset(val128_dir, limit=6, **kw):
    return Dataset(val128_dir / "images" / "val2017", None, imgsz=kw.pop("imgsz", 320), batch=kw.pop("batch", 4),
                   stride=32, limit=limit, workers=0, **kw)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images)
        assert list(x.image_ids) == list(y.image_ids) and list(x.paths) == list(y.paths)
        assert [tuple(s) for s in x.shapes0] == [tuple(s) for s in y.shapes0]
        assert [(tuple(r), tuple(p)) for r, p in x.ratio_pad] == [(tuple(r), tuple(p)) for r, p in y.ratio_pad]


def test_cached_batches_equal_decoded_batches(tmp_path, val128_dir):
    ds = _dataset(val128_dir)
    decoded = list(ds.iter_batches())
    cache = PreprocessedCache(tmp_path)
    built = list(cache.batches(ds))          # first pass: decodes and stores
    assert cache.load(ds) is not None
    loaded = list(cache.batches(ds))         # second pass: reads the entry
    _same(decoded, built)
    _same(decoded, loaded)
    assert [p.name for p in tmp_path.iterdir()] == [ds.cache_key()]  # no temp folders left


def test_key_changes_with_settings_and_files(tmp_path, val128_dir):
    a = _dataset(val128_dir)
    assert a.cache_key() != _dataset(val128_dir, imgsz=640).cache_key()
    assert a.cache_key() != _dataset(val128_dir, batch=2).cache_key()
    assert a.cache_key() != _dataset(val128_dir, limit=5).cache_key()
    # a file rewritten in place (same names, same count): its mtime changes the key
    for sub in ("images", "labels"):
        shutil.copytree(val128_dir / sub / "val2017", tmp_path / sub / "val2017")
    before = _dataset(tmp_path).cache_key()
    first = sorted((tmp_path / "images" / "val2017").iterdir())[0]
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _dataset(tmp_path).cache_key() != before


def test_corrupt_entry_is_rebuilt(tmp_path, val128_dir):
    ds = _dataset(val128_dir)
    cache = PreprocessedCache(tmp_path)
    reference = list(cache.batches(ds))
    victim = cache.entry(ds) / "batch_00000.npy"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    assert cache.load(ds) is None                  # invalid -> removed, never trusted
    _same(reference, list(cache.batches(ds)))
    assert cache.load(ds) is not None


def test_racing_builders_leave_one_complete_entry(tmp_path, val128_dir):
    ds = _dataset(val128_dir)
    cache = PreprocessedCache(tmp_path)
    first = cache.build(ds)
    next(first)                                    # A started, not finished
    b = list(PreprocessedCache(tmp_path).build(ds))  # B finishes and publishes
    a = [*[], *first]                              # A finishes; loses the rename, discards its copy
    assert len(a) == len(b) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ds.cache_key()]
    assert cache.load(ds) is not None


def test_read_only_folder_is_never_written(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert not writable(ro / "preprocessed")
        assert writable(tmp_path / "new" / "preprocessed")
    finally:
        os.chmod(ro, stat.S_IRWXU)


def test_flipped_pixels_in_a_cached_batch_are_decoded_again_not_trusted(tmp_path, val128_dir, caplog):
    """Regression: bytes flipped inside a .npy of the same size gave a wrong mAP recorded as FINISHED."""
    import numpy as np

    ds = _dataset(val128_dir)
    decoded = list(ds.iter_batches())
    cache = PreprocessedCache(tmp_path)
    list(cache.batches(ds))
    victim = cache.entry(ds) / "batch_00001.npy"
    arr = np.load(victim)
    arr.flat[1000:1100] ^= 0xFF  # same file size, other pixels
    np.save(victim, arr)
    with caplog.at_level("WARNING"):
        _same(decoded, list(cache.batches(ds)))  # the damaged batch came from the images
    assert "batch 1 is damaged" in caplog.text
    assert cache.load(ds) is None  # and the entry is rebuilt on the next pass
    _same(decoded, list(cache.batches(ds)))
    assert cache.load(ds) is not None


def test_an_edited_meta_json_is_refused(tmp_path, val128_dir):
    """Regression: swapping two image ids or changing a pad in meta.json changed the mAP silently."""
    import json

    ds = _dataset(val128_dir)
    cache = PreprocessedCache(tmp_path)
    list(cache.batches(ds))
    meta_file = cache.entry(ds) / "meta.json"
    meta = json.loads(meta_file.read_text())
    ids = meta["batches"][0]["image_ids"]
    ids[0], ids[1] = ids[1], ids[0]
    meta["batches"][0]["ratio_pad"][0][1][0] += 1.0
    meta_file.write_text(json.dumps(meta))
    assert cache.load(ds) is None and not cache.entry(ds).exists()


def test_the_key_does_not_depend_on_how_the_folder_is_spelled(tmp_path, val128_dir, monkeypatch):
    """Regression: ../shared/assets and its absolute path each got a copy of the cache."""
    absolute = _dataset(val128_dir.resolve())
    monkeypatch.chdir(val128_dir.parent)
    relative = _dataset(val128_dir.relative_to(val128_dir.parent) if val128_dir.is_absolute() else val128_dir)
    (tmp_path / "link").symlink_to(val128_dir.resolve())
    linked = _dataset(tmp_path / "link")
    assert absolute.cache_key() == relative.cache_key() == linked.cache_key()

"""The background batch reader: order, errors, early stop, the memory bound, pinning."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from sweep.evaluate.reader import read_ahead


@dataclass
class _B:
    images: torch.Tensor
    k: int


def _source(n, pulled, fail_at=None, delay=0.0):
    for k in range(n):
        if k == fail_at:
            raise ValueError(f"batch {k} is damaged")
        time.sleep(delay)
        pulled.append(k)
        yield _B(torch.full((1, 3, 4, 4), k, dtype=torch.uint8), k)


def _reader_threads():
    return [t for t in threading.enumerate() if t.name == "batch-reader"]


def test_batches_come_in_order_and_the_reader_reads_while_the_consumer_works():
    pulled = []
    got = []
    for b in read_ahead(_source(6, pulled), depth=2):
        got.append(b.k)
        time.sleep(0.05)  # "the forward pass": the reader fills the queue meanwhile
        if b.k == 0:
            assert len(pulled) >= 2  # read ahead, not on demand
    assert got == list(range(6))
    assert not _reader_threads()


def test_the_reader_holds_at_most_depth_batches_beyond_the_one_in_use():
    pulled = []
    it = read_ahead(_source(50, pulled), depth=2)
    next(it)
    time.sleep(0.5)
    assert len(pulled) <= 1 + 2 + 1  # in use + queue + the one the thread waits to put
    it.close()
    assert not _reader_threads()


def test_a_source_error_is_raised_at_its_batch_after_the_good_ones():
    pulled = []
    got = []
    with pytest.raises(ValueError, match="batch 3 is damaged"):
        for b in read_ahead(_source(6, pulled, fail_at=3), depth=2):
            got.append(b.k)
    assert got == [0, 1, 2]
    assert not _reader_threads()


def test_a_consumer_that_stops_early_stops_the_reader():
    pulled = []
    for b in read_ahead(_source(100, pulled, delay=0.01), depth=2):
        if b.k == 2:
            break
    time.sleep(0.2)
    assert not _reader_threads()
    assert len(pulled) < 10


def test_pinning_replaces_images_on_a_copy_of_the_batch():
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    src = [_B(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 0)]
    out = list(read_ahead(src, pin=True))
    assert out[0].images.is_pinned() and not src[0].images.is_pinned()


@pytest.mark.parametrize("cache_gb,kept", [("3", True), ("0", False)])
def test_decoded_batches_are_kept_for_later_points_only_when_they_fit_eval_cache_gb(tmp_path, assets, cache_gb, kept):
    """Within the limit a pass keeps the decoded batches for the process's later points; beyond it (here 0)
    every pass streams them and the memo holds none of them; a later job with a smaller limit lets go."""
    from helpers import make_cfg

    from sweep.config.resolve import resolve_job
    from sweep.memo import ProcessMemo

    memo = ProcessMemo()
    spec = resolve_job(make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320",
                                "mlflow.enabled=false", f"eval.cache_gb={cache_gb}"), memo)
    ev = spec.eval
    ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
    data = memo.eval_data(spec.data, ev, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
    first = [b.image_ids for b in read_ahead(memo.batches(data, ev.preprocessed, ev.cache_bytes))]
    assert (data.batches is not None) is kept
    second = [b.image_ids for b in memo.batches(data, ev.preprocessed, ev.cache_bytes)]
    assert first == second and sum(map(len, first)) == 8
    if kept:
        list(memo.batches(data, ev.preprocessed, 0))  # a later job with eval.cache_gb=0
        assert data.batches is None


def test_a_negative_cache_limit_is_refused_with_the_key(tmp_path):
    from helpers import make_cfg

    from sweep.config.resolve import resolve_job
    from sweep.config.schema import ConfigError
    from sweep.memo import ProcessMemo

    with pytest.raises(ConfigError, match=r"eval.cache_gb=-1.*GiB >= 0"):
        resolve_job(make_cfg(tmp_path, "eval.cache_gb=-1", "mlflow.enabled=false"), ProcessMemo())

"""benchmarks/pipeline.py (issue #18): the replayed pipeline is the real pipeline with a free forward pass.

On the real assets (skipped without them), at a tiny size: the first 8 images of coco-val128 in batches of 4,
repeated to 16 images, so the replay crosses a repetition (the recorded tensors are reused, and must come
back unchanged).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pipeline_bench", REPO / "benchmarks" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small(bench, assets, tmp_path_factory):
    return bench.setup(tmp_path_factory.mktemp("pipeline"), batch=4, limit=8)


def test_replay_gives_the_real_models_numbers(bench, small, tmp_path):
    rep_set = bench.repeated_set(small.data, 16)
    assert len(rep_set.image_ids) == len(set(rep_set.image_ids)) == 16
    assert [(r, k) for r, k, _ in rep_set.plan] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    real = bench.run(small, small.model, rep_set)
    recorded, where = bench.recorded_outputs(small, 2, tmp_path)
    assert where == "recorded" and bench.recorded_outputs(small, 2, tmp_path)[1] == "cached"
    replayed = bench.run(small, bench.Replay(recorded), rep_set)

    assert replayed["images"] == real["images"] == 16
    assert replayed["detections"] == real["detections"] > 0
    assert len(real["stats"]) == 12 and real["stats"]["mAP50-95"] > 0
    assert replayed["stats"] == real["stats"]


def test_repeated_set_duplicates_the_ground_truth(bench, small):
    gt = small.data.ground_truth
    rep_set = bench.repeated_set(small.data, 18)  # two full passes and half a batch of a third
    assert [n for _, _, n in rep_set.plan] == [4, 4, 4, 4, 2]
    assert len(set(rep_set.image_ids)) == 18
    assert sorted(im["id"] for im in rep_set.ground_truth["images"]) == sorted(rep_set.image_ids)
    anns = rep_set.ground_truth["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    per_image = {im["id"]: sum(a["image_id"] == im["id"] for a in gt["annotations"]) for im in gt["images"]}
    third = rep_set.image_ids[16:]
    assert len(anns) == 2 * len(gt["annotations"]) + sum(per_image[i - 2 * bench.ID_STRIDE] for i in third)
    assert rep_set.ground_truth["categories"] == gt["categories"]


def test_replay_refuses_a_batch_of_another_shape(bench):
    import torch

    replay = bench.Replay({0: (torch.zeros(4, 10, 85), (4, 3, 64, 96))})
    replay.expect(0, 4)
    with pytest.raises(RuntimeError, match="replay of batch 0"):
        replay(torch.zeros(4, 3, 96, 64))

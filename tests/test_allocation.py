"""Per-layer allocation (issue #14): LAMP and sensitivity-curve allocation.

Hand-computed LAMP scores, exact global counts, the allocation's exact total and its preference for
less sensitive layers, the curve cache (memo and disk), the job's artifacts and the input checks.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import make_cfg, run_cli
from test_prune import cfg, make_tiny

from sweep.config.resolve import config_hash, resolve_job, semantic_config
from sweep.config.schema import ConfigError
from sweep.memo import ProcessMemo
from sweep.prune import sensitivity as S
from sweep.prune.methods import PRUNERS, lamp_scores, select_convs
from sweep.prune.sensitivity import Curve, allocate, allocation_table, interpolate


def convs_with(*weights: list[float]) -> nn.Sequential:
    """1x1 convs whose weights are the given values (one output filter per value)."""
    layers = []
    for w in weights:
        c = nn.Conv2d(1, len(w), 1, bias=False)
        c.weight.data = torch.tensor(w, dtype=torch.float32).view(len(w), 1, 1, 1)
        layers.append(c)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- LAMP


def test_lamp_scores_hand_computed():
    # magnitudes sorted 1, 2, 2, 3 -> squares 1, 4, 4, 9: score = w^2 / sum of squares at least as large
    scores = lamp_scores(torch.tensor([1.0, -3.0, 2.0, 2.0]))
    expected = torch.tensor([1 / 18, 9 / 9, 4 / 17, 4 / 17])  # the two 2s tie: both 4 / (4 + 4 + 9)
    assert torch.allclose(scores, expected, atol=1e-7)
    assert torch.allclose(lamp_scores(torch.tensor([[0.5], [-1.0]])), torch.tensor([[0.25 / 1.25], [1.0]]))
    assert torch.equal(lamp_scores(torch.tensor([0.0, 0.0, 2.0])), torch.tensor([0.0, 0.0, 1.0]))


def test_lamp_global_threshold_by_hand():
    # scores: A = [1/18, 1, 4/17, 4/17], B = [0.2, 1]; 3 of 6 go: 1/18, 0.2, then the first of the tied 4/17
    net = convs_with([1.0, -3.0, 2.0, 2.0], [0.5, -1.0])
    PRUNERS["lamp"](net, 0.5, cfg(method="lamp"))
    assert net[0].weight.flatten().tolist() == [0.0, -3.0, 0.0, 2.0]
    assert net[1].weight.flatten().tolist() == [0.0, -1.0]


@pytest.mark.parametrize("sparsity", [0.2, 0.6, 0.93])
def test_lamp_global_count_and_every_layer_keeps_its_largest(sparsity):
    model = make_tiny()
    PRUNERS["lamp"](model, sparsity, cfg(method="lamp", fused=False))
    convs = list(select_convs(model).values())
    total = sum(m.weight.numel() for m in convs)
    assert sum(int((m.weight == 0).sum()) for m in convs) == round(sparsity * total)
    assert all(int((m.weight != 0).sum()) >= 1 for m in convs)


def test_lamp_equals_global_unstructured_with_lamp_importance_scores_when_no_ties():
    """Without exact ties our stable-sort threshold is torch's ``global_unstructured(importance_scores=...)``."""
    import torch.nn.utils.prune as tprune

    ours, theirs = make_tiny(), make_tiny()
    PRUNERS["lamp"](ours, 0.4, cfg(method="lamp", fused=False))
    convs = list(select_convs(theirs).values())
    tprune.global_unstructured([(m, "weight") for m in convs], pruning_method=tprune.L1Unstructured, amount=0.4,
                               importance_scores={(m, "weight"): lamp_scores(m.weight) for m in convs})
    for a, b in zip(select_convs(ours).values(), convs):
        assert torch.equal(a.weight == 0, b.weight == 0)


def test_lamp_real_yolov5n_global_count(v5n):
    model = copy.deepcopy(v5n)
    PRUNERS["lamp"](model, 0.5, cfg(method="lamp", fused=False))
    convs = list(select_convs(model).values())
    total = sum(m.weight.numel() for m in convs)
    assert sum(int((m.weight == 0).sum()) for m in convs) == round(0.5 * total)


# --------------------------------------------------------------------------- allocation


def synthetic_curves(numels: list[int], levels=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> list[Curve]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(numels):
        scale = float(torch.rand(1, generator=g)) * 10 + 0.01
        counts = tuple(round(lv * n) for lv in levels)
        out.append(Curve(f"model.{i}.conv", n, 0, counts, tuple(scale * lv ** 2 for lv in levels)))
    return out


def test_allocation_prefers_the_less_sensitive_layer():
    levels = (0.1, 0.3, 0.5, 0.7, 0.9)
    robust = Curve("robust", 1000, 0, tuple(round(lv * 1000) for lv in levels), tuple(0.01 * lv for lv in levels))
    fragile = Curve("fragile", 1000, 0, tuple(round(lv * 1000) for lv in levels), tuple(1.0 * lv for lv in levels))
    zeros = allocate([fragile, robust], 1000)
    assert zeros == {"robust": 900, "fragile": 100}  # the robust one fills up to its largest level first
    assert sum(allocate([fragile, robust], 1234).values()) == 1234


def test_allocation_is_optimal_on_convex_curves_by_brute_force():
    levels = (0.25, 0.5, 0.75)
    curves = [Curve(f"l{i}", 8, 0, (2, 4, 6), tuple(a * lv ** 2 + b * lv for lv in levels))
              for i, (a, b) in enumerate([(1.0, 0.1), (3.0, 0.0), (0.5, 0.5)])]
    for total in range(0, 19):
        zeros = allocate(curves, total)
        best = min(sum(interpolate(c, z) for c, z in zip(curves, combo))
                   for combo in itertools.product(range(7), repeat=3) if sum(combo) == total)
        assert sum(zeros.values()) == total
        assert sum(interpolate(c, zeros[c.layer]) for c in curves) == pytest.approx(best, abs=1e-12)


def test_allocation_counts_zeros_already_present_and_refuses_too_much():
    c = Curve("a", 10, 3, (1, 5, 9), (0.0, 0.4, 0.8))
    assert allocate([c], 3) == {"a": 3} and allocate([c], 7) == {"a": 7}
    with pytest.raises(ValueError, match="cannot be allocated"):
        allocate([c], 10)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.77, 0.9])
def test_real_yolov5n_allocation_reaches_the_sparsity_exactly(v5n, sparsity):
    model = copy.deepcopy(v5n)
    layers = select_convs(model)
    curves = synthetic_curves([m.weight.numel() for m in layers.values()], seed=int(sparsity * 100))
    curves = [Curve(name, c.numel, int((m.weight == 0).sum()), c.counts, c.distortion)
              for (name, m), c in zip(layers.items(), curves)]
    total = round(sparsity * sum(c.numel for c in curves))
    zeros = allocate(curves, total)
    assert sum(zeros.values()) == total and all(isinstance(z, int) for z in zeros.values())
    spec = cfg(method="sensitivity", fused=False, allocation=tuple(zeros.items()))
    PRUNERS["sensitivity"](model, sparsity, spec)
    measured = {n: int((m.weight == 0).sum()) for n, m in select_convs(model).items()}
    assert measured == zeros
    table = allocation_table(curves, zeros)
    assert list(table.columns) == ["layer", "params", "sparsity", "zeros", "distortion"]
    assert int(table["zeros"].sum()) == total


def test_sensitivity_pruner_without_allocation_is_an_error():
    with pytest.raises(ValueError, match="allocation"):
        PRUNERS["sensitivity"](make_tiny(), 0.5, cfg(method="sensitivity"))


# --------------------------------------------------------------------------- measurement + cache


class TinyCalibration:
    """What the curve measurement reads of a ``Calibration``: files (their identity), imgsz, batches."""

    def __init__(self, folder: Path, n: int = 2) -> None:
        self.files = []
        for i in range(n):
            f = folder / f"img{i}.jpg"
            f.write_bytes(bytes([i]) * 10)
            self.files.append(str(f))
        self.imgsz = 64
        self.images = [torch.randint(0, 256, (n, 3, 64, 64), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8)]

    def __len__(self) -> int:
        return len(self.files)

    def batches(self):
        return iter(self.images)


def test_measured_curves_grow_with_sparsity_and_model_is_restored():
    model = make_tiny()
    before = copy.deepcopy(model.state_dict())
    layers = select_convs(model)
    batches = [torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))]
    curves = S.measure_curves(model, layers, batches, (0.3, 0.9))
    assert [c.layer for c in curves] == list(layers)
    assert all(c.distortion[1] > c.distortion[0] > 0 for c in curves)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_real_partial_forward_equals_full_forward(v5n):
    """The measurement reruns only the layers after the pruned one: same numbers as a full pass."""
    model = copy.deepcopy(v5n).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out, dense = S._run_layers(model, x, 0, [])
        full = model(x)
        conv = model.model[6].cv1.conv
        conv.weight.mul_(0.5)
        partial = S._run_layers(model, x, 6, dense)[0]
        assert S.squared_error(S.head_maps(partial), S.head_maps(model(x))) == 0.0
    assert S.squared_error(S.head_maps(out), S.head_maps(full)) == 0.0


def test_real_measured_curves_equal_full_passes(v5n, monkeypatch):
    """On a DetectionModel each pass reruns only the layers from the pruned one on (the dense prefix reused):
    the curves must be those of full forward passes, for a layer early, in the middle and in the head."""
    model = copy.deepcopy(v5n).eval()
    assert S._layered(model)
    layers = select_convs(model, ["model.2.cv1*", "model.13.m*", "model.24*"])
    batches = [torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))]
    partial = S.measure_curves(model, layers, batches, (0.3, 0.9))
    monkeypatch.setattr(S, "_layered", lambda _: False)
    full = S.measure_curves(model, layers, batches, (0.3, 0.9))
    assert partial == full and all(0 < c.distortion[0] < c.distortion[1] for c in full)


def test_curves_measured_once_then_memo_then_disk(tmp_path, monkeypatch):
    calls = []
    real = S.measure_curves
    monkeypatch.setattr(S, "measure_curves", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = SimpleNamespace(model=make_tiny(), sha256="abc")
    calib = TinyCalibration(tmp_path)
    spec = cfg(method="sensitivity", fused=False, levels=(0.5, 0.9), curves=tmp_path / "curves")
    memo = ProcessMemo()
    first, where1, _ = memo.sensitivity_curves(spec, ckpt, calib, torch.device("cpu"))
    again, where2, _ = memo.sensitivity_curves(spec, ckpt, calib, torch.device("cpu"))
    from_disk, where3, _ = ProcessMemo().sensitivity_curves(spec, ckpt, calib, torch.device("cpu"))
    assert (where1, where2, where3) == ("measured", "memo", "disk") and len(calls) == 1
    assert first == again == from_disk
    # another fusion state, another level grid: measured again
    ProcessMemo().sensitivity_curves(dataclasses.replace(spec, fused=True), ckpt, calib, "cpu")
    assert len(calls) == 2
    ProcessMemo().sensitivity_curves(dataclasses.replace(spec, levels=(0.5, 0.8)), ckpt, calib, "cpu")
    assert len(calls) == 3
    # a damaged file is not trusted: measured again and rewritten
    for f in (tmp_path / "curves").glob("*.json"):
        doc = json.loads(f.read_text())
        doc["curves"][0]["distortion"][0] = 123.0
        f.write_text(json.dumps(doc))
    _, where4, _ = ProcessMemo().sensitivity_curves(spec, ckpt, calib, torch.device("cpu"))
    assert where4 == "measured" and len(calls) == 4


def test_workers_missing_the_same_curves_at_once_measure_them_once(tmp_path, monkeypatch):
    """Two workers (here: two memos in two threads, each with its own lock file descriptor) asking for the same
    uncached curves: one measures, the other waits on the cache's lock and reads the file."""
    import threading

    calls = []
    real = S.measure_curves

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.5)  # long enough for the other thread to arrive while this one measures
        return real(*a, **k)

    monkeypatch.setattr(S, "measure_curves", slow)
    ckpt = SimpleNamespace(model=make_tiny(), sha256="abc")
    calib = TinyCalibration(tmp_path)
    spec = cfg(method="sensitivity", fused=False, levels=(0.5, 0.9), curves=tmp_path / "curves")
    found = []
    threads = [threading.Thread(target=lambda: found.append(ProcessMemo().sensitivity_curves(spec, ckpt, calib, "cpu")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(w for _, w, _ in found) == ["disk", "measured"]
    assert found[0][0] == found[1][0]


# --------------------------------------------------------------------------- the job


def test_real_job_writes_allocation_and_reuses_curves(tmp_path, assets):
    from sweep.job import JobContext, run_job

    memo = ProcessMemo()
    common = ("model=yolov5n", "data=coco-val128", "data.limit=4", "prune=sensitivity", "prune.fused=false",
              "prune.images=2", "prune.levels=[0.5,0.9]", "prune.include=[model.2*,model.6*]",
              "mlflow.enabled=false", f"paths.curves={tmp_path}/curves")
    outcomes = []
    for i, s in enumerate((0.5, 0.7)):
        out = tmp_path / f"job{i}"
        out.mkdir()
        outcomes.append(run_job(make_cfg(tmp_path, *common, f"sparsity={s}"), JobContext(out), memo))
        table = __import__("pandas").read_csv(out / "allocation.csv")
        assert list(table.columns) == ["layer", "params", "sparsity", "zeros", "distortion"]
        assert int(table["zeros"].sum()) == round(s * int(table["params"].sum()))
        assert (out / "allocation.png").stat().st_size > 0
        assert outcomes[-1].metrics["sparsity"] == pytest.approx(table["zeros"].sum() / table["params"].sum())
    assert [o.metrics["curves_measured"] for o in outcomes] == [1.0, 0.0]


def test_bad_levels_and_sparsity_above_them_are_one_clear_message(tmp_path):
    for override, match in (("prune.levels=[0.5,1.2]", r"prune\.levels=\[0\.5, 1\.2\] is invalid: allowed is"),
                            ("prune.levels=[]", r"prune\.levels=\[\] is invalid"),
                            ("prune.images=0", r"prune\.images=0 is invalid")):
        with pytest.raises(ConfigError, match=match):
            resolve_job(make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune=sensitivity", override),
                        ProcessMemo())
    with pytest.raises(ConfigError, match=r"sparsity=0\.95 is above the largest prune\.levels value 0\.9"):
        resolve_job(make_cfg(tmp_path, "model=yolov5n", "prune=sensitivity", "sparsity=0.95"), ProcessMemo())


def test_bad_levels_in_a_sweep_are_one_message_before_any_run(tmp_path):
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "model=yolov5n", "data=coco-val128", "prune=sensitivity", "prune.levels=[0.5,1.2]",
                "sparsity=0.3,0.5", sweep_dir=tmp_path / "s")
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(errors) == 1 and "prune.levels=[0.5, 1.2] is invalid: allowed is a non-empty list" in errors[0]
    assert not (out / "mlflow.db").exists()


def test_sensitivity_without_calibration_images_is_refused(tmp_path, assets):
    with pytest.raises(ConfigError, match=r"prune\.method='sensitivity' needs calibration images"):
        resolve_job(make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "data.train=null", "prune=sensitivity",
                             "sparsity=0.5"), ProcessMemo())


def test_sensitivity_resolves_recover_source_with_recover_none(tmp_path, assets):
    spec = resolve_job(make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune=sensitivity",
                                "sparsity=0.5", f"paths.curves={tmp_path}/c"), ProcessMemo())
    assert spec.recover.source is None and spec.prune.source is not None
    assert "coco128" in str(spec.prune.source) and spec.prune.source_key == "data.train"
    # the other methods need no calibration images (and resolve without them)
    other = resolve_job(make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "prune=lamp", "sparsity=0.5"),
                        ProcessMemo())
    assert other.prune.source is None and other.prune.calibration is None


def test_curve_settings_enter_the_hash_only_for_sensitivity_and_batch_never():
    def c(method: str, **prune) -> dict:
        p = {"method": method, "fused": False, "include": [], "exclude": [], "seed": 0, "round_to": 8,
             "save": False, "levels": [0.1, 0.5], "images": 8, "batch": 8} | prune
        return {"prune": p, "recover": {"method": "none", "data": None}, "data": {"name": "d"},
                "eval": {"imgsz": 640, "batch": 32, "conf": 0.001, "iou": 0.65, "max_det": 300,
                         "runtimes": ["torch"]}}

    def h(conf: dict) -> str:
        return config_hash(semantic_config(conf, "sha", torch.device("cpu"), False, 0.5))

    assert h(c("l1_unstructured")) == h(c("l1_unstructured", levels=[0.2], images=3, batch=2))
    assert h(c("sensitivity")) != h(c("sensitivity", levels=[0.2]))
    assert h(c("sensitivity")) != h(c("sensitivity", images=3))
    assert h(c("sensitivity")) == h(c("sensitivity", batch=2))

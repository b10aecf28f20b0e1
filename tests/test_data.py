"""Datasets, rect batches, letterbox geometry and COCO ground truth (sweep.data.dataset).

Synthetic files are written by the tests; the real coco-val128 assets pin the counts and batch
shapes that val.py's algorithm gives for them.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sweep.data.dataset import (COCO80_TO_91, Batch, DataError, Dataset, DataWarning, coco_ground_truth,
                        image_id_from_path, iter_images, label_path, letterbox, list_image_files,
                        load_data_yaml, load_image, preprocess_into, read_labels, rect_batch_shapes,
                        rect_order)

NAMES3 = ["a", "b", "c"]


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(root: Path, stem: str, h: int, w: int, labels: str | None = None, ext="png", seed=0):
    im_dir, lb_dir = root / "images" / "val", root / "labels" / "val"
    im_dir.mkdir(parents=True, exist_ok=True)
    lb_dir.mkdir(parents=True, exist_ok=True)
    f = im_dir / f"{stem}.{ext}"
    assert cv2.imwrite(str(f), _img(h, w, seed))
    if labels is not None:
        (lb_dir / f"{stem}.txt").write_text(labels)
    return f


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """4 images: two landscape (one with two labels, one without a label file), a portrait
    one with a non-numeric stem and a square one with an empty label file."""
    _write(tmp_path, "000000000002", 60, 80, "0 0.5 0.5 0.5 0.5\n2 0.25 0.25 0.1 0.2\n", seed=1)
    _write(tmp_path, "000000000001", 30, 40, None, seed=2)
    _write(tmp_path, "img_b", 90, 45, "1 0.5 0.5 1 1\n", seed=3)
    _write(tmp_path, "000000000010", 50, 50, "", seed=4)
    return tmp_path / "images" / "val"


# --------------------------------------------------------------------------- rect batch shapes


def test_rect_batch_shapes_three_branches_hand_computed():
    # batch 0: all landscape (max 0.5 < 1) -> [0.5, 1]: ceil(0.5*640/32+0.5)=ceil(10.5)=11 -> 352;
    #          ceil(20+0.5)=21 -> 672
    # batch 1: 0.75 and 1.0 -> mixed -> [1, 1] -> [672, 672]
    # batch 2: all portrait (min 1.25 > 1) -> [1, 0.8]: 21 -> 672; ceil(16+0.5)=17 -> 544
    ar = np.array([0.4, 0.5, 0.75, 1.0, 1.25, 2.0])
    got = rect_batch_shapes(ar, batch=2, imgsz=640, stride=32, pad=0.5)
    assert got.tolist() == [[352, 672], [672, 672], [672, 544]]
    assert got.dtype.kind == "i"


def test_rect_batch_shapes_pad_zero_last_partial_batch_and_stride():
    ar = np.array([0.75, 0.75, 0.75, 0.3])  # unsorted on purpose: pure function of its input
    got = rect_batch_shapes(ar, batch=3, imgsz=320, stride=64, pad=0.0)
    # [0.75, 1] * 320 / 64 = [3.75, 5] -> ceil [4, 5] * 64; last batch [0.3, 1] -> [1.5, 5] -> [2, 5]
    assert got.tolist() == [[256, 320], [128, 320]]
    assert rect_batch_shapes(np.array([]), 4, 640, 32, 0.5).shape == (0, 2)


def test_rect_order_is_numpy_default_argsort():
    ar = np.array([1.0, 0.75, 0.75, 0.5, 1.5, 0.75])
    o = rect_order(ar)
    assert o.tolist() == np.argsort(ar).tolist()
    assert np.all(np.diff(ar[o]) >= 0)


# --------------------------------------------------------------------------- letterbox geometry


def test_letterbox_odd_padding_round_convention():
    im = _img(10, 7)
    out, r, (dw, dh) = letterbox(im, (16, 16))
    assert out.shape == (16, 16, 3) and r == 1.0
    assert (dw, dh) == (4.5, 3.0)
    # dw = 4.5: left = round(4.4) = 4, right = round(4.6) = 5; dh = 3: 3 and 3
    assert np.array_equal(out[3:13, 4:11], im)
    assert (out[:, :4] == 114).all() and (out[:, 11:] == 114).all()
    assert (out[:3] == 114).all() and (out[13:] == 114).all()


def test_letterbox_half_to_even_cases():
    # dw = 2.5 -> left round(2.4)=2, right round(2.6)=3; dh = 0.5 -> top 0, bottom 1
    im = _img(9, 11)
    out, _, (dw, dh) = letterbox(im, (10, 16))
    assert (dw, dh) == (2.5, 0.5)
    assert np.array_equal(out[0:9, 2:13], im)
    assert (out[9] == 114).all() and (out[:, :2] == 114).all() and (out[:, 13:] == 114).all()


def test_letterbox_never_upscales_but_shrinks_to_fit():
    im = _img(20, 30)
    out, r, (dw, dh) = letterbox(im, (64, 64))
    assert r == 1.0 and (dw, dh) == (17.0, 22.0) and np.array_equal(out[22:42, 17:47], im)
    big = _img(100, 50)
    out, r, (dw, dh) = letterbox(big, (64, 64))  # r = min(0.64, 1.28) = 0.64 -> (32, 64)
    assert r == pytest.approx(0.64) and (dw, dh) == (16.0, 0.0)
    assert np.array_equal(out[:, 16:48], cv2.resize(big, (32, 64), interpolation=cv2.INTER_LINEAR))


def test_load_image_resize_rule(tmp_path: Path):
    src = _img(200, 300)
    f = tmp_path / "x.png"
    cv2.imwrite(str(f), src)
    im, hw0, hw = load_image(str(f), 64)  # r = 64/300: (ceil(64.0), ceil(42.67)) = (64, 43)
    assert hw0 == (200, 300) and hw == (43, 64)
    assert np.array_equal(im, cv2.resize(src, (64, 43), interpolation=cv2.INTER_AREA))
    im, _, hw = load_image(str(f), 640)  # enlarging: INTER_LINEAR, long side 640
    assert hw == (427, 640)
    assert np.array_equal(im, cv2.resize(src, (640, 427), interpolation=cv2.INTER_LINEAR))
    im, _, hw = load_image(str(f), 300)  # r == 1: untouched
    assert np.array_equal(im, src)


def test_preprocess_rgb_chw_and_ratio_pad(tmp_path: Path):
    src = _img(30, 40)
    f = tmp_path / "x.png"
    cv2.imwrite(str(f), src)
    chw, shape0, ((gh, gw), (pw, ph)) = preprocess_into(str(f), 80, (96, 96))
    # resize 40x30 -> 80x60 (r = 2), letterbox into 96x96: pads (8, 18)
    assert chw.dtype == np.uint8 and chw.shape == (3, 96, 96) and chw.flags.c_contiguous
    assert shape0 == (30, 40) and (gh, gw) == (2.0, 2.0) and (pw, ph) == (8.0, 18.0)
    up = cv2.resize(src, (80, 60), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(chw[:, 18:78, 8:88], up[..., ::-1].transpose(2, 0, 1))
    assert (chw[:, :18] == 114).all()


# --------------------------------------------------------------------------- files and labels


def test_label_path_and_image_ids():
    assert label_path("/d/images/x/images/val/a.b.jpg") == "/d/images/x/labels/val/a.b.txt"
    assert image_id_from_path("/a/000000000139.jpg") == 139
    assert image_id_from_path("/a/img_7.jpg") == "img_7"


def test_read_labels_duplicates_removed_like_yolov5(tmp_path: Path):
    f = tmp_path / "l.txt"
    f.write_text("2 0.5 0.5 0.2 0.2\n\n0 0.1 0.1 0.1 0.1\n2 0.5 0.5 0.2 0.2\n")
    lb, ndup, problem = read_labels(f, nc=3)
    assert ndup == 1 and problem is None and lb.dtype == np.float32
    assert lb[:, 0].tolist() == [0.0, 2.0]  # np.unique order, as YOLOv5 keeps it
    f.write_text("1 0.1 0.2 0.3 0.4\n0 0.5 0.5 0.2 0.2\n")  # no duplicates: file order kept
    lb, ndup, _ = read_labels(f)
    assert ndup == 0 and lb[:, 0].tolist() == [1.0, 0.0]
    assert read_labels(tmp_path / "missing.txt")[0].shape == (0, 5)


def test_read_labels_polygons_become_boxes(tmp_path: Path):
    f = tmp_path / "l.txt"
    f.write_text("1 0.1 0.2 0.5 0.2 0.3 0.6\n")
    lb, _, _ = read_labels(f)
    np.testing.assert_allclose(lb, [[1, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)


@pytest.mark.parametrize("text,line,needle", [
    ("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.1 0.1\n", 2, "class id 3 out of range"),
    ("0 0.5 0.5 0.2\n", 1, "has 4 values"),
    ("0 0.5 0.5 0.2 0.2\n\n0 0.5 abc 0.2 0.2\n", 3, "malformed label line"),
    ("0.5 0.5 0.5 0.2 0.2\n", 1, "not a non-negative integer"),
    ("0 0.5 0.5 0.2 0.2 0.1\n", 1, "has 6 values"),
])
def test_bad_label_lines_name_file_and_line(tmp_path: Path, text, line, needle):
    f = tmp_path / "lab.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=needle) as ei:
        read_labels(f, nc=3)
    assert f"{f}:{line}:" in str(ei.value)


def test_dataset_class_out_of_range_is_an_error(tiny: Path):
    (tiny.parent.parent / "labels" / "val" / "img_b.txt").write_text("0 0.5 0.5 1 1\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"img_b\.txt:2: class id 7 out of range"):
        Dataset(tiny, NAMES3)
    Dataset(tiny)  # without class names the range is unknown: accepted


def test_dataset_files_labels_ids_and_order(tiny: Path):
    ds = Dataset(tiny, NAMES3, imgsz=64, batch=2, workers=0)
    names = [Path(f).name for f in ds.files]
    assert names == ["000000000001.png", "000000000002.png", "000000000010.png", "img_b.png"]
    assert ds.image_ids == [1, 2, 10, "img_b"]
    assert ds.shapes0 == [(30, 40), (60, 80), (50, 50), (90, 45)]
    assert [len(lb) for lb in ds.labels] == [0, 2, 0, 1] and ds.instances == 3
    assert ds.skipped == [] and ds.names == NAMES3 and len(ds) == 4
    # ar = 0.75, 0.75, 1, 2 -> order 0/1 tie, then 2, 3; batches [0.75] and [1, 2]
    assert sorted(ds.order[:2].tolist()) == [0, 1] and ds.order[2:].tolist() == [2, 3]
    # [0.75, 1] * 64 / 32 + 0.5 = [2, 2.5] -> [2, 3] * 32; mixed batch -> [1, 1] -> ceil(2.5) = 3
    assert ds.batch_shapes.tolist() == [[64, 96], [96, 96]]


def test_iter_batches_threads_equal_serial_and_match_preprocess(tiny: Path):
    ds0 = Dataset(tiny, NAMES3, imgsz=64, batch=2, workers=0)
    ds2 = Dataset(tiny, NAMES3, imgsz=64, batch=2, workers=2)
    b0, b2 = list(ds0.iter_batches()), list(ds2.iter_batches(prefetch=2))
    assert [b.index for b in b0] == [0, 1]
    for x, y, k in zip(b0, b2, range(2)):
        assert isinstance(x, Batch)
        assert x.images.dtype == torch.uint8 and tuple(x.images.shape[2:]) == tuple(ds0.batch_shapes[k])
        assert torch.equal(x.images, y.images)
        assert x.image_ids == y.image_ids and x.shapes0 == y.shapes0 and x.ratio_pad == y.ratio_pad
        for j, p in enumerate(x.paths):
            chw, s0, rp = preprocess_into(p, 64, ds0.batch_shapes[k])
            assert np.array_equal(x.images[j].numpy(), chw) and x.shapes0[j] == s0 and x.ratio_pad[j] == rp
    assert b0[1].image_ids == [10, "img_b"]
    assert b0[1].ratio_pad[1] == ((64 / 90, 32 / 45), (32.0, 16.0))  # 45x90 -> 32x64 in 96x96
    assert ds0.cache_key() == ds2.cache_key() != Dataset(tiny, NAMES3, imgsz=96, batch=2).cache_key()
    # an abandoned iteration does not hang or leak
    it = ds2.iter_batches()
    next(it)
    it.close()


def test_iter_images_square_letterbox_unlabeled(tiny: Path):
    (tiny / "notes.txt").write_text("not an image")
    batches = list(iter_images(tiny, imgsz=64, batch=3, workers=2))
    assert [tuple(b.images.shape) for b in batches] == [(3, 3, 64, 64), (1, 3, 64, 64)]
    assert batches[0].image_ids == [1, 2, 10]  # file order, no rect sorting


def test_list_file_source_and_limit(tiny: Path):
    lst = tiny.parent.parent / "val.txt"
    lst.write_text("./images/val/img_b.png\n./images/val/000000000002.png\n\n")
    ds = Dataset(lst, NAMES3, imgsz=64)
    assert ds.image_ids == [2, "img_b"]
    ds = Dataset([str(tiny)], NAMES3, imgsz=64, limit=2)
    assert ds.image_ids == [1, 2]


def test_exif_rotation_swaps_shape_like_yolov5(tmp_path: Path):
    d = tmp_path / "images"
    d.mkdir()
    pil = Image.fromarray(_img(40, 60))
    exif = pil.getexif()
    exif[274] = 6  # rotate 90 CW on display
    pil.save(d / "1.jpg", exif=exif, quality=95)
    ds = Dataset(d, imgsz=64, labels=False)
    assert ds.shapes0 == [(60, 40)]  # PIL size (60 wide, 40 high) swapped: h=60, w=40
    b = next(ds.iter_batches())
    assert b.shapes0 == [(60, 40)]  # the decoder applied the orientation too


# --------------------------------------------------------------------------- bad inputs


def test_truncated_and_unreadable_images_are_skipped_and_counted(tiny: Path):
    ok, buf = cv2.imencode(".jpg", _img(60, 80))
    (tiny / "000000000005.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (tiny / "000000000006.jpg").write_bytes(b"this is not a jpeg")
    cv2.imwrite(str(tiny / "000000000007.png"), _img(5, 40))  # < 10 px: YOLOv5 rejects it
    with pytest.warns(DataWarning, match="skipped 3 of 7 images"):
        ds = Dataset(tiny, NAMES3, imgsz=64)
    assert len(ds) == 4 and 5 not in ds.image_ids
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(reasons) == {"000000000005.jpg", "000000000006.jpg", "000000000007.png"}
    assert "truncated JPEG" in reasons["000000000005.jpg"]  # OpenCV would decode it grey-filled
    assert "unreadable" in reasons["000000000006.jpg"] and "< 10 pixels" in reasons["000000000007.png"]
    assert sum(len(b.image_ids) for b in ds.iter_batches()) == 4


def test_out_of_bounds_coordinates_skip_the_image_like_yolov5(tiny: Path):
    (tiny.parent.parent / "labels" / "val" / "img_b.txt").write_text("1 0.5 0.5 1.2 1\n")
    with pytest.warns(DataWarning, match="out of bounds"):
        ds = Dataset(tiny, NAMES3, imgsz=64)
    assert "img_b" not in ds.image_ids and len(ds.skipped) == 1


def test_duplicate_rows_warn(tiny: Path):
    (tiny.parent.parent / "labels" / "val" / "img_b.txt").write_text("1 0.5 0.5 1 1\n1 0.5 0.5 1 1\n")
    with pytest.warns(DataWarning, match="duplicate"):
        ds = Dataset(tiny, NAMES3, imgsz=64)
    assert len(ds.labels[ds.image_ids.index("img_b")]) == 1


def test_empty_and_missing_dirs_are_errors(tmp_path: Path):
    empty = tmp_path / "images" / "val"
    empty.mkdir(parents=True)
    (empty / "readme.md").write_text("no images")
    with pytest.raises(DataError, match=str(empty)):
        Dataset(empty)
    with pytest.raises(DataError, match="does not exist.*nowhere"):
        Dataset(tmp_path / "nowhere")
    (empty / "1.jpg").write_bytes(b"garbage")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no usable images"):
        Dataset(empty)
    with pytest.raises(DataError):
        list_image_files([])


# --------------------------------------------------------------------------- ground truth, yaml


def test_coco_ground_truth_pixels_area_ids_and_unlabeled_images(tiny: Path):
    ds = Dataset(tiny, NAMES3, imgsz=64)
    gt = coco_ground_truth(ds)
    assert [im["id"] for im in gt["images"]] == [1, 2, 10, "img_b"]  # all images, labels or not
    assert gt["images"][1] == {"id": 2, "width": 80, "height": 60, "file_name": "000000000002.png"}
    assert gt["categories"] == [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(NAMES3)]
    a = gt["annotations"]
    assert [x["id"] for x in a] == [1, 2, 3] and all(x["iscrowd"] == 0 for x in a)
    # image 2 (80x60): "0 0.5 0.5 0.5 0.5" -> 40x30 box centred at (40, 30)
    assert a[0]["image_id"] == 2 and a[0]["category_id"] == 0
    np.testing.assert_allclose(a[0]["bbox"], [20, 15, 40, 30], atol=1e-4)
    assert a[0]["area"] == pytest.approx(1200, abs=1e-3)
    # "2 0.25 0.25 0.1 0.2" -> w 8, h 12, top-left (20 - 4, 15 - 6)
    np.testing.assert_allclose(a[1]["bbox"], [16, 9, 8, 12], atol=1e-4)
    assert a[1]["category_id"] == 2 and a[1]["area"] == pytest.approx(96, abs=1e-3)
    # img_b (45 wide, 90 high): full-image box
    np.testing.assert_allclose(a[2]["bbox"], [0, 0, 45, 90], atol=1e-4)


def test_ground_truth_works_with_pycocotools(tiny: Path):
    """GT used as perfect predictions gives mAP 1 (ids from 1, categories, images consistent)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = coco_ground_truth(Dataset(tiny, NAMES3, imgsz=64))
    gt_dict["images"] = [im for im in gt_dict["images"] if isinstance(im["id"], int)]
    gt_dict["annotations"] = [a for a in gt_dict["annotations"] if isinstance(a["image_id"], int)]
    gt = COCO()
    gt.dataset = gt_dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gt.createIndex()
        dt = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"],
                          "bbox": a["bbox"], "score": 0.9} for a in gt_dict["annotations"]])
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
    e.summarize()
    assert e.stats[0] == pytest.approx(1.0)


def test_class_map():
    assert len(COCO80_TO_91) == 80 and COCO80_TO_91[0] == 1 and COCO80_TO_91[-1] == 90
    assert COCO80_TO_91[11] == 13 and len(set(COCO80_TO_91)) == 80
    missing = sorted(set(range(1, 91)) - set(COCO80_TO_91))
    assert missing == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


def test_load_data_yaml_resolves_paths_and_names_for_the_dataset(tiny: Path, tmp_path: Path):
    y = tmp_path / "cfg" / "d.yaml"
    y.parent.mkdir()
    y.write_text("path: ..\nval: images/val\ntrain: [images/val]\nnames:\n  0: a\n  1: b\n  2: c\n")
    d = load_data_yaml(y)
    assert d["path"] == str(tmp_path) and d["val"] == str(tmp_path / "images" / "val")
    assert d["train"] == [str(tmp_path / "images" / "val")]
    assert d["names"] == NAMES3 and d["nc"] == 3
    ds = Dataset(d["val"], d["names"], imgsz=64, batch=2, limit=3)
    assert ds.names == NAMES3 and len(ds) == 3
    ds = Dataset(str(tmp_path / "images" / "val"), ["x"] * 80, imgsz=64, coco80_to_91=True)
    assert len(ds) == 4 and ds.class_map == COCO80_TO_91 and ds.nc == 80
    y.write_text("val: images\nnames: [a]\nnc: 2\n")
    with pytest.raises(DataError, match="nc=2"):
        load_data_yaml(y)
    with pytest.raises(DataError, match="not found"):
        load_data_yaml(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- real assets


@pytest.fixture(scope="module")
def val128(val128_dir: Path) -> Dataset:
    return Dataset(val128_dir / "images" / "val2017", [str(i) for i in range(80)],
                   imgsz=640, batch=32, stride=32, workers=2)


def test_coco_val128_counts_and_batch_shapes(val128: Dataset):
    assert len(val128) == 128 and val128.skipped == []
    assert val128.instances == 898
    assert len({int(c) for lb in val128.labels for c in lb[:, 0]}) == 73
    # hand-check of batch 0: its largest h/w is 427/640 = 0.6671875 ->
    # ceil(0.6671875 * 640 / 32 + 0.5) = ceil(13.84) = 14 -> 448; width ceil(20.5) = 21 -> 672
    assert val128.aspect_ratios[val128.batch_indices(0)].max() == 427 / 640
    assert val128.batch_shapes.tolist() == [[448, 672], [512, 672], [672, 672], [672, 672]]
    # the sorted aspect ratios (hence the shapes) do not depend on how ties are ordered
    ar_sorted = np.sort(val128.aspect_ratios)
    assert np.array_equal(val128.aspect_ratios[val128.order], ar_sorted)
    assert np.array_equal(rect_batch_shapes(ar_sorted, 32, 640, 32, 0.5), val128.batch_shapes)


def test_coco_val128_ground_truth(val128: Dataset):
    gt = coco_ground_truth(val128)
    assert len(gt["images"]) == 128 and len(gt["annotations"]) == 898
    assert gt["images"][0] == {"id": 139, "width": 640, "height": 426, "file_name": "000000000139.jpg"}
    ids = {im["id"] for im in gt["images"]}
    assert all(a["image_id"] in ids and a["area"] > 0 for a in gt["annotations"])
    assert len(gt["categories"]) == 80


def test_coco_val128_first_batch_pixels(val128: Dataset):
    b = val128.load_batch(0)
    assert tuple(b.images.shape) == (32, 3, 448, 672)
    j = 0
    p = b.paths[j]
    h0, w0 = b.shapes0[j]
    (gh, gw), (pw, ph) = b.ratio_pad[j]
    assert max(h0, w0) == 640 and (gh, gw) == (1.0, 1.0)  # COCO: long side 640, no resize
    assert pw == 16.0 and ph == (448 - h0) / 2
    top, left = int(round(ph - 0.1)), int(round(pw - 0.1))
    ref = cv2.imread(p)[..., ::-1].transpose(2, 0, 1)
    img = b.images[j].numpy()
    assert np.array_equal(img[:, top:top + h0, left:left + w0], ref)
    assert (img[:, :top] == 114).all() and (img[:, :, :left] == 114).all()
    assert (img[:, top + h0:] == 114).all() and (img[:, :, left + w0:] == 114).all()


def test_coco_val128_limit_and_bigger_resize(val128_dir: Path):
    ds = Dataset(val128_dir / "images" / "val2017", imgsz=320, batch=4, limit=5, workers=0)
    assert ds.image_ids == [139, 285, 632, 724, 776]
    for b in ds.iter_batches():
        for (h0, w0), ((gh, gw), _) in zip(b.shapes0, b.ratio_pad):
            r = 320 / max(h0, w0)
            assert gh == math.ceil(h0 * r) / h0 and gw == math.ceil(w0 * r) / w0

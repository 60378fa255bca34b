"""The built-in synthetic "shapes" dataset: valid COCO files, the promised mix of classes,
sizes and occlusion, tight boxes, determinism, detectron2 registration and the CLI."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deformable_detr.data.shapes_dataset import (
    SHAPES_CATEGORIES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes_dataset,
    render_shapes_image,
)

NUM_TRAIN, NUM_VAL = 40, 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    paths = generate_shapes_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3,
                                    workers=2)
    return root, paths


@pytest.fixture(scope="module")
def rendered():
    """300 images rendered in memory (no files), enough for distribution statistics."""
    return [render_shapes_image(np.random.default_rng([11, i])) for i in range(300)]


def _load(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_coco_json_is_valid(dataset):
    root, paths = dataset
    for split, n in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        coco = _load(paths[split])
        assert len(coco.getImgIds()) == n
        assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5, 6]
        assert len(coco.getAnnIds()) >= 3 * n * 0.8  # 3..8 objects drawn, a few occluded
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(os.path.join(root, split, img["file_name"])) as im:
                assert im.size == (img["width"], img["height"])
                assert im.mode == "RGB"
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0 and ann["area"] > 0 and ann["iscrowd"] == 0
                assert x >= 0 and y >= 0
                assert x + w <= img["width"] and y + h <= img["height"]
                # Visible pixels fit in the box.
                assert ann["area"] <= w * h


def test_class_and_size_mix(rendered):
    sizes, cats, heights, widths = [], [], [], []
    for img, anns in rendered:
        heights.append(img.shape[0])
        widths.append(img.shape[1])
        for a in anns:
            sizes.append(max(a["bbox"][2:]))
            cats.append(a["category_id"])
    sizes, cats = np.array(sizes), np.array(cats)
    assert min(heights) >= 128 and max(heights) <= 160 and min(widths) >= 128
    assert len(set(heights)) > 10 and len(set(widths)) > 10
    counts = np.bincount(cats, minlength=7)[1:]
    assert counts.min() > 0.1 * len(cats)  # balanced classes
    assert sizes.min() <= 8 and sizes.max() >= 50
    assert 0.1 < np.mean(sizes < 16) < 0.6  # many small objects ...
    assert np.mean(sizes >= 32) > 0.15  # ... and large ones
    # Both cues are needed: each colour family and each kind covers two classes.
    kinds = [c["kind"] for c in SHAPES_CATEGORIES]
    colors = [c["color"] for c in SHAPES_CATEGORIES]
    assert all(kinds.count(k) == 2 for k in kinds) and all(colors.count(c) == 2 for c in colors)


def _iou_matrix(boxes):
    b = np.asarray(boxes, dtype=np.float64)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    inter = iw * ih
    area = b[:, 2] * b[:, 3]
    return inter / (area[:, None] + area - inter)


def test_occlusion(rendered):
    overlapping = 0
    occluded = 0
    for _, anns in rendered:
        if len(anns) < 2:
            continue
        iou = _iou_matrix([a["bbox"] for a in anns])
        np.fill_diagonal(iou, 0)
        overlapping += int((iou > 0.05).any(axis=1).sum())
        for a in anns:
            # Box-filling fraction of an unoccluded shape is >= ~0.4 (a triangle); a visible
            # area well below that means another shape hides part of it.
            occluded += a["area"] < 0.3 * a["bbox"][2] * a["bbox"][3]
    total = sum(len(a) for _, a in rendered)
    assert overlapping > 0.05 * total
    assert occluded >= 5


def _color_mask(img, rgb):
    """Pixels whose colour is dominated by the same channel as ``rgb`` (saturated)."""
    img = img.astype(np.int32)
    c = int(np.argmax(rgb))
    others = [k for k in range(3) if k != c]
    return (img[..., c] - img[..., others].max(-1)) > 90


def test_boxes_are_tight_around_isolated_shapes(rendered):
    """For objects with no other object near them, the box is the extent of the pixels of
    the class colour (found from the image, independently of the generator)."""
    colors = {c["id"]: c["color"] for c in SHAPES_CATEGORIES}
    checked = matched = 0
    for img, anns in rendered[:120]:
        boxes = np.array([a["bbox"] for a in anns])
        for i, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            if w < 6 or h < 6:
                continue
            grow = np.array([x - 4, y - 4, w + 8, h + 8])
            others = np.delete(boxes, i, axis=0)
            if len(others) and (_iou_matrix(np.vstack([grow, others]))[0, 1:] > 0).any():
                continue
            x0, y0 = max(int(x) - 3, 0), max(int(y) - 3, 0)
            x1, y1 = min(int(x + w) + 3, img.shape[1]), min(int(y + h) + 3, img.shape[0])
            mask = _color_mask(img[y0:y1, x0:x1], colors[a["category_id"]])
            rows, cols = np.nonzero(mask)
            if len(rows) == 0:
                continue
            found = (x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1)
            checked += 1
            matched += np.abs(np.array(found) - [x, y, x + w, y + h]).max() <= 1.5
    assert checked > 100
    assert matched > 0.85 * checked


def test_deterministic(dataset, tmp_path):
    root, paths = dataset  # rendered by several processes (one per core; two here)
    # Same seed, fewer training images, one process: the val split and the first train
    # images agree.
    other = str(tmp_path / "again")
    paths2 = generate_shapes_dataset(other, num_train=5, num_val=NUM_VAL, seed=3, workers=1)
    with open(paths["val"]) as f1, open(paths2["val"]) as f2:
        j1, j2 = json.load(f1), json.load(f2)
        assert j1["annotations"] == j2["annotations"] and j1["images"] == j2["images"]
    for split, name in (("val", "000007.png"), ("train", "000004.png")):
        a = np.asarray(Image.open(os.path.join(root, split, name)))
        b = np.asarray(Image.open(os.path.join(other, split, name)))
        assert np.array_equal(a, b)
    # Another seed gives other images.
    img_a, anns_a = render_shapes_image(np.random.default_rng([3, 1, 0]))
    img_b, anns_b = render_shapes_image(np.random.default_rng([4, 1, 0]))
    assert img_a.shape != img_b.shape or not np.array_equal(img_a, img_b)


def test_ensure_regenerates_only_when_needed(tmp_path):
    root = str(tmp_path / "s")
    paths = ensure_shapes_dataset(root, num_train=4, num_val=2, seed=0)
    mtime = os.path.getmtime(paths["train"])
    os.utime(paths["train"], (mtime - 100, mtime - 100))
    ensure_shapes_dataset(root, num_train=4, num_val=2, seed=0)
    assert os.path.getmtime(paths["train"]) == mtime - 100  # untouched
    ensure_shapes_dataset(root, num_train=6, num_val=2, seed=0)
    with open(paths["train"]) as f:
        assert len(json.load(f)["images"]) == 6
    os.remove(os.path.join(root, "val", "000001.png"))  # incomplete copy
    ensure_shapes_dataset(root, num_train=6, num_val=2, seed=0)
    assert os.path.isfile(os.path.join(root, "val", "000001.png"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes_dataset(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="max_object_size"):
        generate_shapes_dataset(str(tmp_path), num_train=1, num_val=1, max_object_size=500)
    with pytest.raises(ValueError, match="Unknown render options"):
        generate_shapes_dataset(str(tmp_path), num_train=1, num_val=1, colour="red")


def test_register_with_detectron2(dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    root, paths = dataset
    names = ("test_shapes_train", "test_shapes_val")
    register_shapes_dataset(root, names=names)
    register_shapes_dataset(root, names=names)  # registering again replaces, no error
    dicts = DatasetCatalog.get(names[1])
    assert len(dicts) == NUM_VAL
    with open(paths["val"]) as f:
        coco = json.load(f)
    assert sum(len(d["annotations"]) for d in dicts) == len(coco["annotations"])
    d = dicts[0]
    assert os.path.isfile(d["file_name"])
    first = [a for a in coco["annotations"] if a["image_id"] == d["image_id"]][0]
    assert d["annotations"][0]["bbox"] == first["bbox"]
    assert d["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert d["annotations"][0]["category_id"] == first["category_id"] - 1  # contiguous
    meta = MetadataCatalog.get(names[1])
    assert meta.thing_classes == [c["name"] for c in SHAPES_CATEGORIES]
    assert meta.evaluator_type == "coco" and meta.json_file == paths["val"]


def test_cli(tmp_path):
    root = tmp_path / "cli"
    cmd = [sys.executable, "-m", "deformable_detr.data.shapes_dataset", "--root", str(root),
           "--num-train", "3", "--num-val", "2", "--seed", "5"]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(root / "annotations" / "shapes_train.json") as f:
        assert len(json.load(f)["images"]) == 3
    assert len(os.listdir(root / "val")) == 2
    bad = subprocess.run(cmd[:-6] + ["--num-train", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "num_train" in bad.stderr

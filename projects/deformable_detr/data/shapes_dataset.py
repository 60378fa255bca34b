"""A small, seeded synthetic detection dataset ("shapes") in COCO format.

Each image (128..160 px a side by default) has a textured background (smooth noise, linear
gradients, stripes or a checkerboard) and 3..8 filled shapes. The six classes are
combinations of a kind (circle, square, triangle) and a colour family (red, green, blue):
neither the colour nor the kind alone identifies a class. Objects vary in size from 10 to
60 px (uniform; a sixth have a box side under 16 px, a third fewer than 16x16 visible
pixels, and COCO counts five in six as small), aspect ratio, rotation and shading,
and may overlap: each annotation is the full box of the shape, also where another shape
covers part of it (as COCO annotates occluded objects), and shapes whose visible part is
below ``MIN_VISIBLE_FRACTION`` are drawn but not annotated.

Generation is deterministic: image ``i`` of a split depends only on (seed, split, i), so the
val split is the same whatever ``num_train`` is. Files written under ``root``::

    root/train/000000.png ...   root/annotations/shapes_train.json
    root/val/000000.png ...     root/annotations/shapes_val.json

Command line::

    python -m deformable_detr.data.shapes_dataset --root datasets/shapes \\
        --num-train 2000 --num-val 200 --seed 0
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "SHAPES_CATEGORIES",
    "generate_shapes_dataset",
    "ensure_shapes_dataset",
    "register_shapes_dataset",
    "register_default_shapes_dataset",
    "default_shapes_root",
    "render_shapes_image",
]

logger = logging.getLogger(__name__)

#: The classes: (kind, colour family) pairs. COCO category ids are 1-based and contiguous.
SHAPES_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "red circle", "kind": "circle", "color": (215, 45, 40)},
    {"id": 2, "name": "red triangle", "kind": "triangle", "color": (215, 45, 40)},
    {"id": 3, "name": "green square", "kind": "square", "color": (40, 170, 60)},
    {"id": 4, "name": "green circle", "kind": "circle", "color": (40, 170, 60)},
    {"id": 5, "name": "blue triangle", "kind": "triangle", "color": (45, 80, 215)},
    {"id": 6, "name": "blue square", "kind": "square", "color": (45, 80, 215)},
]

#: Objects whose visible pixels are fewer than this fraction of their own are not annotated.
MIN_VISIBLE_FRACTION = 0.4
#: Bump when the rendering changes, so that ``ensure_shapes_dataset`` regenerates.
GENERATOR_VERSION = 1
_SPLIT_IDS = {"train": 0, "val": 1}
_BACKGROUNDS = ("noise", "gradient", "stripes", "checker")


def default_shapes_root() -> str:
    """``$DETECTRON2_DATASETS/shapes``, or ``./datasets/shapes`` when the variable is unset
    (detectron2's convention for built-in datasets)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "shapes")


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def _muted_color(rng: np.random.Generator) -> np.ndarray:
    # Backgrounds are desaturated so that the class colours stay the most saturated things
    # in the image, but they still carry every hue (hard negatives for the colour cue).
    c = rng.uniform(30, 225, size=3)
    return 0.55 * c.mean() + 0.45 * c


def _render_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 [h, w, 3] RGB background in [0, 255]."""
    kind = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    c0, c1 = _muted_color(rng), _muted_color(rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "noise":
        # Smooth noise: a coarse random grid upsampled bilinearly.
        cell = rng.uniform(8, 32)
        gh, gw = int(h / cell) + 2, int(w / cell) + 2
        grid = rng.random((gh, gw)).astype(np.float32)
        gy, gx = ys / cell, xs / cell
        y0, x0 = gy.astype(np.int64), gx.astype(np.int64)
        fy, fx = gy - y0, gx - x0
        t = (grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
             + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx)
    else:
        theta = rng.uniform(0, np.pi)
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        if kind == "gradient":
            t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        elif kind == "stripes":
            period = rng.uniform(6, 24)
            t = 0.5 + 0.5 * np.sin(proj * (2 * np.pi / period))
        else:  # checker
            cell = rng.uniform(6, 20)
            other = -xs * np.sin(theta) + ys * np.cos(theta)
            t = ((np.floor(proj / cell) + np.floor(other / cell)) % 2).astype(np.float32)
            t = 0.25 + 0.5 * t  # low contrast, so squares do not hide in it
    return c0 + t[..., None] * (c1 - c0)


def _shape_coverage(kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Boolean inside-test of a shape of circumradius ``radius`` centred at the origin, at
    local coordinates (u, v) (already rotated and stretched)."""
    if kind == "circle":
        return u * u + v * v <= radius * radius
    if kind == "square":
        # Half side r / sqrt(2): the square's corners stay within the circumradius.
        a = radius * 0.7071
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if kind == "triangle":
        # Equilateral with vertices on the circle of this radius: three half-planes at the
        # apothem r / 2, normals pointing away from the vertices (image y points down).
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            ang = np.pi / 2 + k * 2 * np.pi / 3
            inside &= u * np.cos(ang) + v * np.sin(ang) <= radius * 0.5
        return inside
    raise ValueError(f"Unknown shape kind {kind!r}")


def _render_object(rng: np.random.Generator, kind: str, cx: float, cy: float, radius: float,
                   h: int, w: int) -> Tuple[Tuple[int, int, int, int], np.ndarray]:
    """Rasterise one shape with 2x2 supersampling.

    Returns:
        (x0, y0, x1, y1) integer pixel window, and the coverage [y1 - y0, x1 - x0] in [0, 1].
    """
    x0, y0 = max(int(np.floor(cx - radius)) - 1, 0), max(int(np.floor(cy - radius)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + radius)) + 1, w), min(int(np.ceil(cy + radius)) + 1, h)
    # Pixel (i, j) covers [j, j + 1) x [i, i + 1); sample it at the four quarter points.
    sub = np.array([0.25, 0.75], dtype=np.float32)
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1) - cy
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1) - cx
    dy, dx = np.meshgrid(ys, xs, indexing="ij")
    theta = rng.uniform(0, 2 * np.pi)
    # Stretch one local axis (ellipses, rectangles, flattened triangles) after rotation.
    aspect = rng.uniform(0.6, 1.0)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / aspect
    inside = _shape_coverage(kind, u, v, radius).astype(np.float32)
    cov = inside.reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))
    return (x0, y0, x1, y1), cov


def render_shapes_image(rng: np.random.Generator, *, min_image_size: int = 128,
                        max_image_size: int = 160, min_object_size: float = 10.0,
                        max_object_size: float = 60.0, min_objects: int = 3,
                        max_objects: int = 8) -> Tuple[np.ndarray, List[Dict]]:
    """Render one image.

    Returns:
        uint8 RGB image [H, W, 3], and its objects as dicts with ``category_id`` (COCO id),
        ``bbox`` [x, y, w, h] in absolute pixels (the full shape, also under occluders) and
        ``area`` (visible pixels); objects below ``MIN_VISIBLE_FRACTION`` are left out.
    """
    h, w = (int(v) for v in rng.integers(min_image_size, max_image_size + 1, size=2))
    img = _render_background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int32)  # index of the top-most shape at each pixel
    objects = []
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    for i in range(num_objects):
        cat = SHAPES_CATEGORIES[rng.integers(len(SHAPES_CATEGORIES))]
        size = float(rng.uniform(min_object_size, max_object_size))
        radius = size / 2
        cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
        (x0, y0, x1, y1), cov = _render_object(rng, cat["kind"], cx, cy, radius, h, w)
        mask = cov >= 0.5
        if not mask.any():
            continue
        # Colour jitter plus a linear shading across the object, like uneven lighting.
        color = np.clip(np.asarray(cat["color"], np.float32) + rng.normal(0, 14, 3), 0, 255)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        phi = rng.uniform(0, 2 * np.pi)
        shade = 1 + rng.uniform(0, 0.25) * ((xs - cx) * np.cos(phi) + (ys - cy) * np.sin(phi)) / (
            radius + 1
        )
        a = cov[..., None]
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1 - a) + np.clip(color * shade[..., None], 0, 255) * a
        owner[y0:y1, x0:x1][mask] = i
        rows, cols = np.nonzero(mask)
        objects.append({
            "index": i,
            "category_id": cat["id"],
            "bbox": [float(x0 + cols.min()), float(y0 + rows.min()),
                     float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)],
            "full_area": int(mask.sum()),
        })
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)  # sensor noise
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    visible = np.bincount(owner.reshape(-1) + 1, minlength=num_objects + 1)[1:]
    annotations = []
    for obj in objects:
        vis = int(visible[obj["index"]])
        if vis < MIN_VISIBLE_FRACTION * obj["full_area"]:
            continue
        annotations.append({"category_id": obj["category_id"], "bbox": obj["bbox"],
                            "area": float(vis)})
    return img, annotations


# ----------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------
def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"shapes_{split}.json")


def _generation_info(split: str, num_images: int, seed: int, render_kwargs: Dict) -> Dict:
    return {"description": f"deformable_detr synthetic shapes, {split}",
            "generator_version": GENERATOR_VERSION, "split": split, "num_images": num_images,
            "seed": seed, "render": dict(render_kwargs)}


def _render_and_save(job: Tuple[str, str, int, int, Dict]) -> Tuple[Dict, List[Dict]]:
    """Render image ``idx`` of a split from its own seed and write it; return its COCO image
    record and annotations. Module-level so that worker processes can run it."""
    image_dir, split, seed, idx, render_kwargs = job
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], idx])
    img, anns = render_shapes_image(rng, **render_kwargs)
    file_name = f"{idx:06d}.png"
    # Fast zlib level: the files are small, and generation time matters more.
    Image.fromarray(img).save(os.path.join(image_dir, file_name), compress_level=1)
    record = {"id": idx + 1, "file_name": file_name, "height": int(img.shape[0]),
              "width": int(img.shape[1])}
    return record, anns


def _generate_split(root: str, split: str, num_images: int, seed: int,
                    render_kwargs: Dict, workers: int = 1) -> Dict:
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    jobs = [(image_dir, split, seed, idx, render_kwargs) for idx in range(num_images)]
    # Every image has its own seed, so the files do not depend on the number of workers.
    if workers > 1 and num_images > 1:
        with concurrent.futures.ProcessPoolExecutor(min(workers, num_images)) as pool:
            results = list(pool.map(_render_and_save, jobs, chunksize=16))
    else:
        results = [_render_and_save(job) for job in jobs]
    images, annotations = [], []
    for idx, (record, anns) in enumerate(results):
        images.append(record)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": idx + 1, "iscrowd": 0,
                                **ann})
    coco = {
        "info": _generation_info(split, num_images, seed, render_kwargs),
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["kind"]}
                       for c in SHAPES_CATEGORIES],
    }
    # The json is written last (atomically): its presence marks a complete split.
    path = _json_path(root, split)
    with open(path + ".tmp", "w") as f:
        json.dump(coco, f)
    os.replace(path + ".tmp", path)
    return coco


def generate_shapes_dataset(root: Optional[str] = None, *, num_train: int = 2000,
                            num_val: int = 200, seed: int = 0, workers: Optional[int] = None,
                            **render_kwargs) -> Dict[str, str]:
    """Write the train and val splits under ``root`` (default ``default_shapes_root()``),
    overwriting earlier files of the same names.

    Args:
        workers: processes that render images (default: one per CPU core); the files are
            the same for any number.
        render_kwargs: passed to :func:`render_shapes_image` (image and object sizes, object
            counts).

    Returns:
        {split: path of its COCO json}.
    """
    root = root or default_shapes_root()
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    render_kwargs = _check_render_kwargs(render_kwargs)
    paths = {}
    for split, n in (("train", num_train), ("val", num_val)):
        start = time.perf_counter()
        coco = _generate_split(root, split, n, seed, render_kwargs, workers)
        logger.info("shapes_%s: %d images, %d objects in %.1f s -> %s", split, n,
                    len(coco["annotations"]), time.perf_counter() - start, root)
        paths[split] = _json_path(root, split)
    return paths


def _check_render_kwargs(kw: Dict) -> Dict:
    """Validate options of :func:`render_shapes_image`; return them with defaults filled."""
    import inspect

    allowed = {p.name: p.default for p in inspect.signature(render_shapes_image).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY}
    unknown = set(kw) - set(allowed)
    if unknown:
        raise ValueError(f"Unknown render options {sorted(unknown)}; allowed: {sorted(allowed)}")
    v = {**allowed, **kw}
    if not 32 <= v["min_image_size"] <= v["max_image_size"]:
        raise ValueError("need 32 <= min_image_size <= max_image_size, got "
                         f"{v['min_image_size']}, {v['max_image_size']}")
    if not 2 <= v["min_object_size"] <= v["max_object_size"] <= v["min_image_size"]:
        raise ValueError("need 2 <= min_object_size <= max_object_size <= min_image_size, got "
                         f"{v['min_object_size']}, {v['max_object_size']}, "
                         f"{v['min_image_size']}")
    if not 1 <= v["min_objects"] <= v["max_objects"]:
        raise ValueError("need 1 <= min_objects <= max_objects, got "
                         f"{v['min_objects']}, {v['max_objects']}")
    return v


def _split_is_current(root: str, split: str, num_images: int, seed: int,
                      render_kwargs: Dict) -> bool:
    path = _json_path(root, split)
    try:
        with open(path) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return False
    if info != _generation_info(split, num_images, seed, render_kwargs):
        return False
    # Also make sure the images are there (the last one is written last).
    return os.path.isfile(os.path.join(root, split, f"{num_images - 1:06d}.png"))


def ensure_shapes_dataset(root: Optional[str] = None, *, num_train: int = 2000,
                          num_val: int = 200, seed: int = 0,
                          **render_kwargs) -> Dict[str, str]:
    """Generate the dataset under ``root`` unless a copy made with the same arguments is
    already there. Returns {split: path of its COCO json}."""
    root = root or default_shapes_root()
    render_kwargs = _check_render_kwargs(render_kwargs)
    if all(_split_is_current(root, s, n, seed, render_kwargs)
           for s, n in (("train", num_train), ("val", num_val))):
        logger.info("Using the shapes dataset in %s", root)
        return {s: _json_path(root, s) for s in ("train", "val")}
    return generate_shapes_dataset(root, num_train=num_train, num_val=num_val, seed=seed,
                                   **render_kwargs)


def register_shapes_dataset(root: Optional[str] = None,
                            names: Sequence[str] = ("shapes_train", "shapes_val")) -> None:
    """Register the splits under ``root`` (default ``default_shapes_root()``) in detectron2's
    catalogs as COCO instance datasets named ``shapes_train`` and ``shapes_val``.

    Registering again (e.g. with another root) replaces the earlier registration. The files
    need not exist yet: they are read when the dataset is first used. Importing
    ``deformable_detr.data`` registers the default names under the default root unless they
    are registered already.
    """
    root = root or default_shapes_root()
    for name, split in zip(names, ("train", "val")):
        _register_split(name, root, split)


def register_default_shapes_dataset() -> None:
    """Register ``shapes_train`` / ``shapes_val`` under ``default_shapes_root()``, each only
    if no dataset of that name is registered yet (as detectron2 registers its built-in
    datasets under ``$DETECTRON2_DATASETS`` on import)."""
    from detectron2.data import DatasetCatalog

    registered = set(DatasetCatalog.list())
    for name, split in (("shapes_train", "train"), ("shapes_val", "val")):
        if name not in registered:
            _register_split(name, default_shapes_root(), split)


def _register_split(name: str, root: str, split: str) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, _json_path(root, split), os.path.join(root, split))
    # Known before the json is read, e.g. for drawing detections of a trained model.
    MetadataCatalog.get(name).set(
        thing_classes=[c["name"] for c in SHAPES_CATEGORIES],
        thing_colors=[list(c["color"]) for c in SHAPES_CATEGORIES],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)},
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=default_shapes_root(),
                        help="output folder (default: $DETECTRON2_DATASETS/shapes or "
                             "./datasets/shapes)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-image-size", type=int, default=128)
    parser.add_argument("--max-image-size", type=int, default=160)
    parser.add_argument("--min-object-size", type=float, default=10.0)
    parser.add_argument("--max-object-size", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=None,
                        help="rendering processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate_shapes_dataset(
            args.root, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
            workers=args.workers, min_image_size=args.min_image_size,
            max_image_size=args.max_image_size, min_object_size=args.min_object_size,
            max_object_size=args.max_object_size,
        )
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()

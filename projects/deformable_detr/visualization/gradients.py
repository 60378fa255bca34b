"""What a detection depends on: the gradient norm of each element of its prediction with
respect to every input pixel (Fig. 5 of the paper).

For a query, the elements are its box, normalised (centre x, centre y, width, height), and
its class score (the sigmoid of its highest class logit). Each map is the L2 norm over the 3
colour channels of d(element) / d(image), where the image is the model's input: float pixels
in ``INPUT.FORMAT`` at the model's input size (after the test-time resize, before the
normalisation by ``PIXEL_MEAN`` / ``PIXEL_STD``). The paper's finding: the box elements
depend on the object's extreme edges (left/right for x and width, top/bottom for y and
height), the class score on its inside.

Example::

    predictor = Predictor(cfg)                       # deformable_detr.engine.predictor
    image_rgb, dets = image_gradient_maps(predictor, image, topk=3)
    fig = draw_gradient_maps(image_rgb, dets[0], "person")
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter
from torch import nn

__all__ = [
    "ELEMENTS",
    "MAX_DETECTIONS",
    "GradientMaps",
    "draw_gradient_maps",
    "gradient_maps",
    "image_gradient_maps",
    "save_gradient_maps",
    "select_queries",
    "write_gradient_pictures",
]

#: The elements of a prediction, in the order of the picture's panels and the npz arrays.
ELEMENTS = ("cx", "cy", "w", "h", "class")
_TITLES = {"cx": "centre x", "cy": "centre y", "w": "width", "h": "height",
           "class": "class score"}
logger = logging.getLogger(__name__)

#: Detections per image: each costs 5 backward passes through the whole network.
MAX_DETECTIONS = 10
#: Colour scales end at this percentile of a map (the few hottest pixels would otherwise
#: leave the rest of the map black); the colour bar's arrow marks the clipped values.
CLIP_PERCENTILE = 99.5


@dataclasses.dataclass
class GradientMaps:
    """The gradient-norm maps of one query's prediction."""

    query: int
    #: The query's highest-scoring class, and that score (sigmoid).
    label: int
    score: float
    #: The predicted box, normalised (cx, cy, w, h) [4].
    box: np.ndarray
    #: ``ELEMENTS`` -> [H, W] float32 at the model's input size.
    maps: Dict[str, np.ndarray]

    def arrays(self) -> Dict[str, np.ndarray]:
        """The npz content: one [H, W] array per element, plus ``query``, ``label``,
        ``score`` and ``box``."""
        out = {k: self.maps[k] for k in ELEMENTS}
        out.update(query=np.int64(self.query), label=np.int64(self.label),
                   score=np.float32(self.score), box=self.box.astype(np.float32))
        return out


def select_queries(pred_logits: torch.Tensor, queries: Sequence[int] = (), topk: int = 1
                   ) -> List[int]:
    """``queries`` (checked), or the ``topk`` queries with the highest class score.

    Args:
        pred_logits: [Q, C] class logits of one image.

    Raises:
        ValueError: a query outside [0, Q).
    """
    num_queries = pred_logits.shape[0]
    if queries:
        bad = [q for q in queries if not 0 <= q < num_queries]
        if bad:
            raise ValueError(f"--query must be in [0, {num_queries - 1}] (MODEL.DEFORMABLE_DETR"
                             f".NUM_QUERIES is {num_queries}), got {bad}")
        return list(dict.fromkeys(int(q) for q in queries))
    scores = pred_logits.detach().max(-1).values
    return [int(q) for q in scores.argsort(descending=True)[: max(1, topk)]]


def gradient_maps(model: nn.Module, image: torch.Tensor, queries: Sequence[int] = (),
                  topk: int = 1) -> List[GradientMaps]:
    """Gradient-norm maps of chosen queries' predictions for one image.

    Args:
        model: a DeformableDETR (``raw_outputs``) in eval mode.
        image: [3, H, W] pixels (uint8 or float, 0..255) in the model's input format, at
            its input size: the ``"image"`` of a test-time input dict.
        queries: query indices; empty: the ``topk`` queries of highest class score.

    Returns:
        one :class:`GradientMaps` per query, maps [H, W]: ``||d element / d image||_2`` over
        the channels, for ``cx, cy, w, h`` (``pred_boxes``, normalised by the image size)
        and ``class`` (sigmoid of the query's highest logit).
    """
    if not hasattr(model, "raw_outputs"):
        raise TypeError(f"{type(model).__name__} has no raw_outputs(); gradient maps need the "
                        "DeformableDETR meta-architecture")
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got {list(image.shape)}")
    device = next(model.parameters()).device
    x = image.detach().to(device=device, dtype=torch.float32).requires_grad_(True)
    # Only the image needs gradients: the weights' are never computed (faster, less memory).
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            out = model.raw_outputs([{"image": x}])
            logits, boxes = out["pred_logits"][0], out["pred_boxes"][0]  # [Q, C], [Q, 4]
            chosen = select_queries(logits, queries, topk)
            for n, q in enumerate(chosen):
                label = int(logits[q].detach().argmax())
                score = logits[q, label].sigmoid()
                elements = [boxes[q, 0], boxes[q, 1], boxes[q, 2], boxes[q, 3], score]
                maps = {}
                for k, (name, element) in enumerate(zip(ELEMENTS, elements)):
                    last = n == len(chosen) - 1 and k == len(elements) - 1
                    (grad,) = torch.autograd.grad(element, x, retain_graph=not last)
                    maps[name] = grad.norm(dim=0).float().cpu().numpy()
                results.append(GradientMaps(
                    query=q, label=label, score=float(score.detach()),
                    box=boxes[q].detach().float().cpu().numpy(), maps=maps))
    finally:
        for p in params:
            p.requires_grad_(True)
    return results


def image_gradient_maps(predictor, image: np.ndarray, queries: Sequence[int] = (),
                        topk: int = 1) -> Tuple[np.ndarray, List[GradientMaps]]:
    """:func:`gradient_maps` for an image file's pixels, resized as the model's test input.

    Args:
        predictor: a :class:`deformable_detr.engine.predictor.Predictor` (model, resize).
        image: [H0, W0, 3] uint8 in ``INPUT.FORMAT``.

    Returns:
        (the resized image, RGB uint8 [H, W, 3], the maps' size; the maps).
    """
    from detectron2.data.detection_utils import convert_image_to_rgb

    inputs = predictor.make_input(image)
    dets = gradient_maps(predictor.model, inputs["image"], queries, topk)
    resized = inputs["image"].permute(1, 2, 0).numpy()
    return convert_image_to_rgb(resized, predictor.image_format), dets


def _box_xyxy(box: np.ndarray, h: int, w: int) -> Tuple[float, float, float, float]:
    cx, cy, bw, bh = (float(v) for v in box)
    return (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h


def draw_gradient_maps(image_rgb: np.ndarray, det: GradientMaps, class_name: str,
                       title: str = "", cmap: str = "inferno"):
    """A figure of one detection: the image with its box, then one panel per element with
    the gradient-norm map over the dimmed image (its own colour scale, shown below it).

    Args:
        image_rgb: [H, W, 3] uint8, the model's input (the maps' size).
    """
    h, w = image_rgb.shape[:2]
    x0, y0, x1, y1 = _box_xyxy(det.box, h, w)
    ncols = 1 + len(ELEMENTS)
    # Panels 2.4 in wide, as tall as the image's aspect says, plus titles and colour bars.
    fig, axes = plt.subplots(1, ncols, figsize=(2.4 * ncols, 2.4 * h / w + 1.0),
                             layout="constrained")
    ax = axes[0]
    ax.imshow(image_rgb)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.8, ec="lime"))
    ax.set_title(f"query {det.query}: {class_name} {det.score:.2f}", fontsize=9)
    gray = image_rgb.astype(np.float32).mean(-1)
    for ax, name in zip(axes[1:], ELEMENTS):
        m = det.maps[name]
        vmax = float(np.percentile(m, CLIP_PERCENTILE)) or float(m.max()) or 1.0
        norm = Normalize(vmin=0.0, vmax=vmax)
        # The image in grey, dimmed, under the map: where on the object the gradient is.
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255 * 1.8)
        rgba = plt.get_cmap(cmap)(norm(m))
        rgba[..., 3] = np.clip(norm(m), 0, 1) ** 0.5 * 0.9 + 0.1
        ax.imshow(rgba)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.8, ec="white",
                               ls=(0, (3, 3)), alpha=0.7))
        ax.set_title(f"{_TITLES[name]} ({name})", fontsize=9)
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                            orientation="horizontal", fraction=0.06, pad=0.02, extend="max")
        # The values are tiny (a pixel moves a normalised box little): ticks in units of
        # 10^e, e written under the bar.
        e = int(np.floor(np.log10(vmax)))
        cbar.formatter = FuncFormatter(lambda v, _, e=e: f"{v / 10.0 ** e:g}")
        cbar.update_ticks()
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label(f"gradient norm (x 1e{e})", fontsize=7, labelpad=1)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    # The first panel gets an invisible colour bar too, so that all images line up.
    fig.colorbar(ScalarMappable(cmap=cmap), ax=axes[0], orientation="horizontal",
                 fraction=0.06, pad=0.02).ax.set_visible(False)
    fig.suptitle(title or "Gradient norm of each prediction element w.r.t. the input pixels "
                 f"(colour scales end at the {CLIP_PERCENTILE:g}th percentile)", fontsize=10)
    return fig


def save_gradient_maps(output_dir: str, stem: str, image_rgb: np.ndarray,
                       dets: Sequence[GradientMaps], class_names: Optional[Sequence[str]],
                       dpi: int = 110, title: str = "") -> List[str]:
    """Write ``<stem>_q<Q>.png`` (the picture) and ``<stem>_q<Q>.npz`` (the maps, see
    :meth:`GradientMaps.arrays`) per detection into ``output_dir``.

    Returns:
        the paths written.
    """
    written = []
    for det in dets:
        name = (class_names[det.label] if class_names and det.label < len(class_names)
                else f"class {det.label}")
        base = os.path.join(output_dir, f"{stem}_q{det.query}")
        np.savez_compressed(base + ".npz", **det.arrays())
        fig = draw_gradient_maps(image_rgb, det, name, title)
        fig.savefig(base + ".png", dpi=dpi)
        plt.close(fig)
        written += [base + ".png", base + ".npz"]
    return written


def write_gradient_pictures(config_file: str, opts: Sequence[str], inputs: Sequence[str],
                            output: str, *, queries: Sequence[int] = (), topk: int = 3,
                            dpi: int = 110, allow_random_weights: bool = False) -> int:
    """What ``tools/visualize_gradients.py`` does: :func:`save_gradient_maps` of each image
    into ``output``; returns the exit status of
    :func:`~deformable_detr.engine.predictor.run_on_images`."""
    from ..engine.predictor import output_path, run_on_images

    used: Dict[str, int] = {}

    def make_handler(cfg, predictor, metadata):
        def handle(path: str, image: np.ndarray) -> None:
            image_rgb, dets = image_gradient_maps(predictor, image, queries, topk)
            stem = os.path.splitext(os.path.basename(output_path(output, path, used)))[0]
            written = save_gradient_maps(output, stem, image_rgb, dets,
                                         metadata.get("thing_classes", None), dpi=dpi)
            logger.info(f"{path}: gradient maps of queries {[d.query for d in dets]} -> "
                        f"{', '.join(p for p in written if p.endswith('.png'))}")
        return handle

    return run_on_images(config_file, opts, inputs, output, allow_random_weights, make_handler)

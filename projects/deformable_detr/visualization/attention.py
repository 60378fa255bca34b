"""Where multi-scale deformable attention looks (the picture of the paper's Fig. 5).

For chosen object queries of the last decoder layer (default: the top-k detections) and
chosen pixels of the last encoder layer (default: the centres of those detections), the
sampling points of every head on every feature level are drawn on the image, coloured and
sized by their attention weight; the reference point (or box, with box refinement) is marked
with a star (dashed box), the detection with its box. Each row of a picture is one query:
all levels together, then one panel per level with that level's feature-map grid.

The sampling points are recorded with forward hooks on the model's :class:`MSDeformAttn`
modules (:func:`run_with_recording`); ``tools/visualize_attention.py`` is the command line
of :func:`write_attention_pictures`.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from detectron2.data import detection_utils as utils
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..layers import MSDeformAttn
from ..modeling.postprocess import topk_query_classes

__all__ = [
    "MAX_ROWS",
    "AttentionRecord",
    "draw_attention",
    "encoder_query_index",
    "run_with_recording",
    "sampling_of",
    "top_detections",
    "visualize_image",
    "write_attention_pictures",
]

logger = logging.getLogger(__name__)

#: Rows (queries) of one picture: each is ~300 px tall and draws every sampling point of
#: every head and level, so more would make pictures nobody can read, slowly.
MAX_ROWS = 10

LEVEL_MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass
class AttentionRecord:
    """What one MSDeformAttn call saw, for the first image of the batch. Coordinates are
    normalised to the padded input (x / padded width, y / padded height)."""

    name: str
    sampling_locations: np.ndarray  # [Lq, M, L, P, 2] (x, y)
    attention_weights: np.ndarray  # [Lq, M, L, P]
    reference_points: np.ndarray  # [Lq, 2] (x, y) or [Lq, 4] (cx, cy, w, h), level 0
    spatial_shapes: np.ndarray  # [L, 2] (H, W)

    @property
    def is_encoder(self) -> bool:
        # Encoder queries are the flattened multi-scale pixels themselves.
        return self.sampling_locations.shape[0] == int(self.spatial_shapes.prod(1).sum())


def sampling_of(module: MSDeformAttn, query: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sampling locations and attention weights of an :class:`MSDeformAttn` call,
    computed from its inputs as its forward computes them.

    Args:
        query: [N, Lq, C]; reference_points: [N, Lq, L, 2] (x, y) or [N, Lq, L, 4]
            (cx, cy, w, h), normalised; spatial_shapes: int64 [L, 2] (H, W).

    Returns:
        (sampling locations [N, Lq, M, L, P, 2] normalised (x, y), attention weights
        [N, Lq, M, L, P], each head's summing to 1 over levels and points).
    """
    n, lq, _ = query.shape
    m, lv, p = module.n_heads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(n, lq, m, lv, p, 2).to(reference_points.dtype)
    weights = module.attention_weights(query).view(n, lq, m, lv * p).softmax(-1)
    weights = weights.view(n, lq, m, lv, p)
    if reference_points.shape[-1] == 2:
        # Offsets in pixels of each level: x by its width, y by its height.
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normalizer.to(reference_points.dtype)[None, None, None, :, None])
    else:
        # Offsets in fractions of the box's half size, spread over the P points.
        locations = (reference_points[:, :, None, :, None, :2]
                     + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
    return locations, weights


def run_with_recording(model: torch.nn.Module, inputs: dict):
    """Run ``model.raw_outputs([inputs])`` recording every MSDeformAttn call with forward
    hooks (removed afterwards; the model keeps no state of the recording).

    Returns:
        (raw outputs dict, list of :class:`AttentionRecord` in call order, padded input
        (H, W) in pixels of the resized image).
    """
    if not hasattr(model, "raw_outputs"):
        raise TypeError(f"{type(model).__name__} has no raw_outputs(); this tool needs the "
                        "DeformableDETR meta-architecture")
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, MSDeformAttn)]
    if not modules:
        raise TypeError(f"{type(model).__name__} has no MSDeformAttn modules")
    records: List[AttentionRecord] = []
    padded: Dict[str, Tuple[int, int]] = {}

    def attn_hook(name):
        def hook(module, args, kwargs, output):
            call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            ref, shapes = call["reference_points"], call["input_spatial_shapes"]
            locations, weights = sampling_of(module, call["query"], ref, shapes)
            records.append(AttentionRecord(
                name=name,
                sampling_locations=locations[0].float().cpu().numpy(),
                attention_weights=weights[0].float().cpu().numpy(),
                reference_points=ref[0, :, 0].float().cpu().numpy(),
                spatial_shapes=shapes.cpu().numpy(),
            ))

        return hook

    def backbone_hook(module, args):
        padded["hw"] = tuple(args[0].shape[-2:])

    handles = [m.register_forward_hook(attn_hook(n), with_kwargs=True) for n, m in modules]
    if isinstance(getattr(model, "backbone", None), torch.nn.Module):
        handles.append(model.backbone.register_forward_pre_hook(backbone_hook))
    try:
        with torch.no_grad():
            outputs = model.raw_outputs([inputs])
    finally:
        for h in handles:
            h.remove()
    if len(records) != len(modules):
        raise RuntimeError("every MSDeformAttn module must run exactly once per forward; got "
                           f"{len(records)} calls of {len(modules)} modules")
    return outputs, records, padded.get("hw", tuple(inputs["image"].shape[-2:]))


def top_detections(pred_logits: torch.Tensor, pred_boxes: torch.Tensor, k: int):
    """The top-k (query, class) pairs by sigmoid score, as inference picks them
    (:func:`deformable_detr.modeling.postprocess.topk_query_classes`).

    Args:
        pred_logits: [Q, C]; pred_boxes: [Q, 4] normalised (cx, cy, w, h).

    Returns:
        list of (query index, class, score, box [4] normalised cxcywh).
    """
    scores, queries, classes = topk_query_classes(pred_logits[None], k)
    return [(int(q), int(c), float(s), pred_boxes[int(q)].tolist())
            for s, q, c in zip(scores[0], queries[0], classes[0])]


def encoder_query_index(spatial_shapes: np.ndarray, level: int, x: float, y: float,
                        padded_hw: Tuple[int, int]) -> int:
    """Index in the flattened multi-scale map of the cell of ``level`` holding the pixel
    (x, y) of the (padded) input."""
    if not 0 <= level < len(spatial_shapes):
        raise ValueError(f"--pixel-level must be in [0, {len(spatial_shapes) - 1}], got {level}")
    h, w = (int(v) for v in spatial_shapes[level])
    row = min(max(int(y / padded_hw[0] * h), 0), h - 1)
    col = min(max(int(x / padded_hw[1] * w), 0), w - 1)
    start = int(np.concatenate([[0], spatial_shapes.prod(1).cumsum()])[level])
    return start + row * w + col


def _zoom_window(points: np.ndarray, weights: np.ndarray, extra: np.ndarray,
                 image_hw: Tuple[int, int], min_side: float = 40.0):
    """A square (x0, y0, x1, y1) around ``extra`` points and the sampling ``points`` that
    carry weight (>= 5% of the largest), with a margin, inside the image where possible."""
    keep = points[weights >= 0.05 * weights.max()]
    pts = np.concatenate([keep, extra.reshape(-1, 2)])
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    side = max(x1 - x0, y1 - y0, min_side) * 1.3
    h, w = image_hw
    side = min(side, max(h, w))
    cx = min(max((x0 + x1) / 2, side / 2), max(w - side / 2, side / 2))
    cy = min(max((y0 + y1) / 2, side / 2), max(h - side / 2, side / 2))
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def _draw_row(axes, image_rgb, rec: AttentionRecord, q: int, to_pixels: np.ndarray,
              title: str, box=None, norm=None, zoom: bool = False, cmap="plasma"):
    """One row of panels for query ``q``: all levels on the whole image, then one panel per
    level (zoomed around the query with ``zoom``). ``to_pixels`` [2] scales normalised
    (x, y) to pixels of the drawn image; ``box`` is the detection, XYXY pixels."""
    h_img, w_img = image_rgb.shape[:2]
    loc = rec.sampling_locations[q] * to_pixels  # [M, L, P, 2]
    wts = rec.attention_weights[q]  # [M, L, P]
    ref = rec.reference_points[q]
    num_levels = loc.shape[1]
    ref_px = ref * np.concatenate([to_pixels, to_pixels])[: ref.shape[0]]
    window = None
    if zoom:
        extra = [ref_px[:2]]
        if ref.shape[0] == 4:
            extra += [ref_px[:2] - ref_px[2:] / 2, ref_px[:2] + ref_px[2:] / 2]
        if box is not None:
            extra += [np.asarray(box[:2]), np.asarray(box[2:])]
        window = _zoom_window(loc.reshape(-1, 2), wts.reshape(-1), np.stack(extra),
                              (h_img, w_img))
    for col, levels in enumerate([range(num_levels)] + [[lv] for lv in range(num_levels)]):
        ax = axes[col]
        ax.imshow(image_rgb, extent=(0, w_img, h_img, 0), interpolation="nearest")
        if col > 0:
            lv = levels[0]
            fh, fw = (int(v) for v in rec.spatial_shapes[lv])
            # Feature-map cells of this level (the padded map scaled to the image).
            for xg in np.arange(fw + 1) / fw * to_pixels[0]:
                ax.axvline(xg, color="white", lw=0.4, alpha=0.4)
            for yg in np.arange(fh + 1) / fh * to_pixels[1]:
                ax.axhline(yg, color="white", lw=0.4, alpha=0.4)
            ax.set_title(f"level {lv}: {fh}x{fw} map, weight "
                         f"{wts[:, lv].sum() / wts.shape[0]:.0%}", fontsize=9)
        else:
            ax.set_title(title, fontsize=9)
            if window is not None:
                ax.add_patch(Rectangle(window[:2], window[2] - window[0], window[3] - window[1],
                                       fill=False, lw=0.8, ec="white", ls=":"))
        pts, ws, marks = [], [], []
        for lv in levels:
            pts.append(loc[:, lv].reshape(-1, 2))
            ws.append(wts[:, lv].reshape(-1))
            marks += [LEVEL_MARKERS[lv % len(LEVEL_MARKERS)]] * ws[-1].size
        pts, ws = np.concatenate(pts), np.concatenate(ws)
        # Zoomed panels get bigger markers; the strongest points are painted last, on top.
        size = (30, 160) if window is not None and col > 0 else (8, 70)
        for i in np.argsort(ws):
            ax.scatter(pts[i, 0], pts[i, 1], c=[ws[i]], cmap=cmap, norm=norm, marker=marks[i],
                       s=size[0] + size[1] * ws[i] / norm.vmax, edgecolors="black",
                       linewidths=0.4, zorder=3)
        if ref.shape[0] == 4:
            cx, cy, bw, bh = ref_px
            ax.add_patch(Rectangle((cx - bw / 2, cy - bh / 2), bw, bh, fill=False, lw=1.2,
                                   ec="white", ls="--", zorder=4))
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                   ec="lime", zorder=4))
        ax.scatter([ref_px[0]], [ref_px[1]], marker="*", s=140, c="white", edgecolors="black",
                   linewidths=0.8, zorder=5)
        x0, y0, x1, y1 = window if window is not None and col > 0 else (0, 0, w_img, h_img)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_xticks([])
        ax.set_yticks([])


def draw_attention(image_rgb: np.ndarray, rec: AttentionRecord, rows: List[dict],
                   to_pixels: np.ndarray, suptitle: str, zoom: bool = False):
    """A figure with one row per entry of ``rows`` (dicts with "query", "title" and
    optionally "box", a detection XYXY in pixels); ``zoom`` the per-level panels."""
    num_levels = rec.spatial_shapes.shape[0]
    ncols = 1 + num_levels
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.6 * ncols + 1.0, 2.75 * len(rows)),
                             squeeze=False)
    vmax = max(float(rec.attention_weights[[r["query"] for r in rows]].max()), 1e-6)
    norm = Normalize(vmin=0.0, vmax=vmax)
    for r, row in enumerate(rows):
        _draw_row(axes[r], image_rgb, rec, row["query"], to_pixels, row["title"],
                  box=row.get("box"), norm=norm, zoom=zoom)
    fig.suptitle(suptitle, fontsize=11)
    legend = [Line2D([], [], ls="", marker=LEVEL_MARKERS[lv % len(LEVEL_MARKERS)], color="gray",
                     label=f"level {lv}") for lv in range(num_levels)]
    legend += [Line2D([], [], ls="", marker="*", ms=12, mfc="white", mec="black",
                      label="reference point"),
               Line2D([], [], color="lime", lw=1.5, label="detection")]
    if rec.reference_points.shape[1] == 4:
        legend.append(Line2D([], [], color="gray", ls="--", lw=1.2, label="reference box"))
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if len(rows) > 1 else 0.08, 0.93, 0.96))
    cax = fig.add_axes((0.94, 0.15, 0.015, 0.7))
    fig.colorbar(ScalarMappable(norm=norm, cmap="plasma"), cax=cax,
                 label="attention weight")
    return fig


def visualize_image(predictor, metadata, image: np.ndarray, *, topk: int = 3,
                    queries: Sequence[int] = (), pixels: Sequence[Tuple[float, float]] = (),
                    pixel_level: int = 0, image_format: str = "RGB"):
    """Decoder and encoder attention figures for one image (in ``image_format``).

    Args:
        predictor: a :class:`deformable_detr.engine.predictor.Predictor` (model, resize).
        image: [H, W, 3] uint8.
        queries: decoder query indices; empty: the queries of the ``topk`` detections.
        pixels: (x, y) pixels of the original image for the encoder; empty: the centres of
            the drawn detections.
        pixel_level: the feature level whose cell at each pixel is the encoder query.

    Returns:
        (decoder figure, encoder figure).
    """
    inputs = predictor.make_input(image)
    outputs, records, padded_hw = run_with_recording(predictor.model, inputs)
    enc = [r for r in records if r.is_encoder]
    dec = [r for r in records if not r.is_encoder]
    if not enc or not dec:
        raise RuntimeError(f"expected encoder and decoder attention, got {len(enc)} encoder "
                           f"and {len(dec)} decoder calls")
    h, w = image.shape[:2]
    rh, rw = inputs["image"].shape[-2:]
    # Normalised padded-input coordinates -> pixels of the original image.
    to_pixels = np.array([padded_hw[1] * w / rw, padded_hw[0] * h / rh])
    rgb = utils.convert_image_to_rgb(image, image_format)
    names = metadata.get("thing_classes", None)

    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    if queries:
        num_q = logits.shape[0]
        bad = [q for q in queries if not 0 <= q < num_q]
        if bad:
            raise ValueError(f"--queries must be in [0, {num_q - 1}], got {bad}")
        probs = logits.sigmoid()
        dets = [(q, int(probs[q].argmax()), float(probs[q].max()), boxes[q].tolist())
                for q in queries]
    else:
        dets = top_detections(logits, boxes, topk)
    dec_rows = []
    for q, c, s, (cx, cy, bw, bh) in dets:
        label = names[c] if names and c < len(names) else f"class {c}"
        dec_rows.append({"query": q, "title": f"query {q}: {label} {s:.2f}",
                         "box": ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                 (cy + bh / 2) * h)})
    dec_fig = draw_attention(rgb, dec[-1], dec_rows, to_pixels,
                             f"last decoder layer ({dec[-1].name}): sampling points of "
                             f"{dec[-1].attention_weights.shape[1]} heads", zoom=True)

    boxes = [None] * len(pixels)
    if not pixels:
        pixels = [((r["box"][0] + r["box"][2]) / 2, (r["box"][1] + r["box"][3]) / 2)
                  for r in dec_rows]
        boxes = [r["box"] for r in dec_rows]
    enc_rows = []
    for (x, y), box in zip(pixels, boxes):
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"pixel ({x}, {y}) is outside the {w}x{h} image")
        q = encoder_query_index(enc[-1].spatial_shapes, pixel_level, x * rw / w, y * rh / h,
                                padded_hw)
        enc_rows.append({"query": q, "title": f"pixel ({x:.0f}, {y:.0f}), level {pixel_level}",
                         "box": box})
    enc_fig = draw_attention(rgb, enc[-1], enc_rows, to_pixels,
                             f"last encoder layer ({enc[-1].name}): sampling points of "
                             f"{enc[-1].attention_weights.shape[1]} heads")
    return dec_fig, enc_fig


def write_attention_pictures(config_file: str, opts: Sequence[str], inputs: Sequence[str],
                             output: str, *, topk: int = 3, queries: Sequence[int] = (),
                             pixels: Sequence[Tuple[float, float]] = (), pixel_level: int = 0,
                             dpi: int = 110, allow_random_weights: bool = False) -> int:
    """What ``tools/visualize_attention.py`` does: ``<name>_decoder.png`` and
    ``<name>_encoder.png`` (:func:`visualize_image`) of each image in ``output``; returns the
    exit status of :func:`~deformable_detr.engine.predictor.run_on_images`."""
    from ..engine.predictor import output_path, run_on_images

    used: Dict[str, int] = {}

    def make_handler(cfg, predictor, metadata):
        def handle(path: str, image: np.ndarray) -> None:
            figs = visualize_image(predictor, metadata, image, topk=topk, queries=queries,
                                   pixels=pixels, pixel_level=pixel_level,
                                   image_format=cfg.INPUT.FORMAT)
            for fig, part in zip(figs, ("decoder", "encoder")):
                out = output_path(output, path, used, suffix=f"_{part}")
                fig.savefig(out, dpi=dpi)
                plt.close(fig)
                logger.info(f"{path}: {part} attention -> {out}")
        return handle

    return run_on_images(config_file, opts, inputs, output, allow_random_weights, make_handler)

"""Multi-scale deformable attention as export formats need it.

- :func:`ms_deform_attn_portable`: the operator in plain tensor ops, bilinear sampling as
  gathers of the four neighbouring pixels (no ``grid_sample``, so no ONNX ``GridSample``,
  which some TensorRT versions compute wrongly for this pattern). It runs in any ONNX
  runtime and takes symbolic level sizes.
- :func:`trt_plugin_translation`: the ONNX translation of the compiled op
  ``deformable_detr::ms_deform_attn_forward`` into one node of TensorRT's
  ``MultiscaleDeformableAttnPlugin_TRT`` per attention call.
- :func:`use_attention`: a context manager that makes every ``MSDeformAttn`` of a model call
  a given implementation while tracing.

Shapes as in :mod:`deformable_detr.layers.ms_deform_attn_op`: N batch, S = sum of H_l * W_l,
M heads, D channels per head, Lq queries, L levels, P points.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..layers import MSDeformAttn, check_inputs

__all__ = [
    "ATTENTION_MODES",
    "TRT_PLUGIN_DOMAIN",
    "TRT_PLUGIN_OP",
    "ms_deform_attn_portable",
    "trt_plugin_translation",
    "use_attention",
]

#: ``--attention`` values of the ONNX export.
ATTENTION_MODES = ("portable", "plugin")
#: TensorRT's plugin (``MultiscaleDeformableAttnPlugin_TRT``, version "1", empty plugin
#: namespace). TensorRT's ONNX parser finds plugins by the node's op_type; the custom domain
#: keeps the model valid for ``onnx.checker`` (an unknown op in the default domain is not).
TRT_PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
TRT_PLUGIN_DOMAIN = "trt"

# Corners of the bilinear cell as (dx, dy), each with its weight computed below.
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def ms_deform_attn_portable(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, *, spatial_shapes_list=None):
    """Multi-scale deformable attention with gathers only (export to standard ONNX ops).

    The same result as the compiled op and ``grid_sample(align_corners=False,
    padding_mode="zeros")``: a location (x, y) in [0, 1] of a level of size (H, W) lies at
    pixel ``(x * W - 0.5, y * H - 0.5)``; its four neighbours are weighted bilinearly and
    those outside the level contribute zero.

    Args:
        value: [N, S, M, D].
        spatial_shapes: int64 [L, 2] (H, W); read as a tensor, so the sizes may be symbolic.
        level_start_index: int64 [L].
        sampling_locations: [N, Lq, M, L, P, 2] (x, y).
        attention_weights: [N, Lq, M, L, P].
        spatial_shapes_list: the (H, W) pairs as ints, for the input checks only (as
            ``ms_deform_attn``).

    Returns:
        [N, Lq, M * D] in the value's dtype (float32 arithmetic for half-precision values).

    Memory: each corner gathers [N, Lq, M, L * P, D] values (as many as the ``grid_sample``
    path samples), one corner after the other.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, spatial_shapes_list=spatial_shapes_list)
    n, s, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    dtype = value.dtype
    # One table row per (image, head, position): a single Gather serves every level.
    table = value.permute(0, 2, 1, 3).reshape(n * m * s, d)
    height = spatial_shapes[:, 0].view(1, 1, 1, num_levels, 1)
    width = spatial_shapes[:, 1].view(1, 1, 1, num_levels, 1)
    start = level_start_index.view(1, 1, 1, num_levels, 1)
    # Row of (image, head) in the table: (n * M + m) * S.
    base = (torch.arange(n, device=value.device).view(n, 1, 1, 1, 1) * m
            + torch.arange(m, device=value.device).view(1, 1, m, 1, 1)) * s

    loc = sampling_locations.to(torch.float32 if dtype in (torch.float16, torch.bfloat16)
                                else dtype)
    x = loc[..., 0] * width.to(loc.dtype) - 0.5  # [N, Lq, M, L, P]
    y = loc[..., 1] * height.to(loc.dtype) - 0.5
    x0 = x.floor()
    y0 = y.floor()
    fx = x - x0
    fy = y - y0
    x0 = x0.to(torch.int64)
    y0 = y0.to(torch.int64)
    attn = attention_weights.to(loc.dtype)
    out = None
    for dx, dy in _CORNERS:
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        wx = fx if dx else 1 - fx
        wy = fy if dy else 1 - fy
        weight = torch.where(inside, wx * wy * attn, torch.zeros_like(attn))
        # A corner outside its level reads the level's first row, with weight zero.
        index = torch.where(inside, base + start + yi * width + xi, base + start)
        gathered = table.index_select(0, index.reshape(-1)).reshape(
            n, lq, m, num_levels * p, d).to(loc.dtype)
        # [N, Lq, M, 1, L*P] @ [N, Lq, M, L*P, D] -> [N, Lq, M, 1, D]
        part = torch.matmul(weight.reshape(n, lq, m, 1, num_levels * p), gathered)
        out = part if out is None else out + part
    return out.reshape(n, lq, m * d).to(dtype)


@contextlib.contextmanager
def use_attention(model: nn.Module, core: Callable | None) -> Iterator[None]:
    """Make every :class:`MSDeformAttn` of ``model`` call ``core`` (a function with
    ``ms_deform_attn``'s signature) inside the block; None keeps their own implementation.
    The previous setting is restored on exit."""
    modules = [mod for mod in model.modules() if isinstance(mod, MSDeformAttn)]
    saved = [mod.core_override for mod in modules]
    try:
        for mod in modules:
            mod.core_override = core
        yield
    finally:
        for mod, old in zip(modules, saved):
            mod.core_override = old


def _plugin_schema():
    """The plugin's signature as an ONNX schema (onnxscript needs one to write a node; it is
    not registered globally)."""
    import onnx

    param = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        TRT_PLUGIN_OP, TRT_PLUGIN_DOMAIN, 1,
        doc="TensorRT's multi-scale deformable attention plugin (no attributes).",
        inputs=[param("value", "T"), param("spatial_shapes", "tensor(int32)"),
                param("level_start_index", "tensor(int32)"), param("sampling_locations", "T"),
                param("attention_weights", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
    )


def trt_plugin_translation():
    """The ``custom_translation_table`` of ``torch.onnx.export`` (dynamo exporter) that
    writes each compiled attention call as TensorRT's plugin node.

    The node has the plugin's five inputs in its order (``value`` [N, S, M, D],
    ``spatial_shapes`` int32 [L, 2], ``level_start_index`` int32 [L],
    ``sampling_locations`` [N, Lq, M, L, P, 2], ``attention_weights`` [N, Lq, M, L, P]) and
    its output [N, Lq, M, D], reshaped to the op's [N, Lq, M * D] after it. The index inputs
    are cast to int32, the type the plugin's ``supportsFormatCombination`` accepts.

    Returns:
        dict {op overload: onnxscript function}. The exporter builds opset 18 and converts
        to the requested opset afterwards, so the function uses opset 18.
    """
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset18 as op

    plugin = onnxscript.values.Op(onnxscript.values.Opset(TRT_PLUGIN_DOMAIN, 1), TRT_PLUGIN_OP,
                                  _plugin_schema())

    def msda_trt(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
        shapes32 = op.Cast(spatial_shapes, to=onnxscript.INT32.dtype)
        starts32 = op.Cast(level_start_index, to=onnxscript.INT32.dtype)
        out = plugin(value, shapes32, starts32, sampling_locations,
                     attention_weights)  # [N, Lq, M, D]
        # ONNX cannot infer a plugin's output: state it, for tools that read the graph.
        out.dtype = value.dtype
        if value.shape is not None and sampling_locations.shape is not None:
            out.shape = ir.Shape([value.shape[0], sampling_locations.shape[1], value.shape[2],
                                  value.shape[3]])
        # [N, Lq, M, D] -> [N, Lq, M * D]
        new_shape = op.Concat(op.Shape(out, start=0, end=2),
                              op.Constant(value_ints=[-1]), axis=0)
        return op.Reshape(out, new_shape)

    return {torch.ops.deformable_detr.ms_deform_attn_forward.default: msda_trt}

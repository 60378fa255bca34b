"""The multi-scale deformable attention operator: compiled kernels and the PyTorch path.

Shapes (N batch, S = sum over levels of H_l * W_l, M heads, D channels per head, Lq queries,
L levels, P sampling points per level):

- ``value`` ``[N, S, M, D]``: the levels' value maps flattened row-major and concatenated.
- ``spatial_shapes`` int64 ``[L, 2]``: each level's (H, W).
- ``level_start_index`` int64 ``[L]``: where each level starts along S.
- ``sampling_locations`` ``[N, Lq, M, L, P, 2]``: (x, y) normalised to [0, 1] by each level's
  size, pixel centres at ``(i + 0.5) / size``; locations outside contribute zero.
- ``attention_weights`` ``[N, Lq, M, L, P]``.
- result ``[N, Lq, M * D]``, head-major.

Sampling is bilinear with zero padding: ``grid_sample(..., align_corners=False,
padding_mode="zeros")`` on ``2 * location - 1``.

Dtypes: float32 and float64 everywhere; float16 and bfloat16 values (and weights) on CUDA
and the CPU accumulate in float32. The sampling locations have the value's dtype, or stay
float32 under a float16/bfloat16 value (recommended: half precision locations lose
sub-pixel accuracy on large maps). Gradients come back in each input's own dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "has_compiled_op", "check_inputs"]

try:
    from deformable_detr import _C  # noqa: F401  (loads the kernels and registers the op)

    _COMPILED = True
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _COMPILED = False
    _IMPORT_ERROR = e


def has_compiled_op(device: torch.device | str | None = None) -> bool:
    """Whether the compiled operator exists (for ``device``'s type, if given)."""
    if not _COMPILED:
        return False
    if device is None:
        return True
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(_C.build_info()["cuda"])
    return False


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raise a clear ``ValueError``/``TypeError`` for inputs the operator cannot take.

    Size consistency with the contents of ``spatial_shapes`` (sum of H*W equal to S, start
    indices equal to the cumulative sizes) is checked in eager mode only: it reads the
    tensor, which graph capture cannot do without a break.
    """
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
             "attention_weights")
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got {_shape(value)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [N, Lq, M, L, P, 2], got {_shape(sampling_locations)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            f"attention_weights must be [N, Lq, M, L, P], got {_shape(attention_weights)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2] (H, W), got {_shape(spatial_shapes)}")
    if level_start_index.dim() != 1:
        raise ValueError(f"level_start_index must be [L], got {_shape(level_start_index)}")
    N, S, M, D = value.shape
    _, Lq, Ml, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != N:
        raise ValueError(f"batch size: value has N={N}, sampling_locations "
                         f"{_shape(sampling_locations)}")
    if Ml != M:
        raise ValueError(f"heads: value has M={M}, sampling_locations has M={Ml}")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5]):
        raise ValueError(
            f"attention_weights {_shape(attention_weights)} must be sampling_locations' "
            f"[N, Lq, M, L, P] = {_shape(sampling_locations)[:-4]}]"
        )
    if spatial_shapes.shape[0] != L or level_start_index.shape[0] != L:
        raise ValueError(
            f"levels: sampling_locations has L={L}, spatial_shapes {_shape(spatial_shapes)}, "
            f"level_start_index {_shape(level_start_index)}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
    if not value.is_floating_point():
        raise TypeError(f"value must be floating point, got {value.dtype}")
    if attention_weights.dtype != value.dtype:
        raise TypeError(
            f"attention_weights dtype {attention_weights.dtype} must equal value dtype "
            f"{value.dtype}"
        )
    half = value.dtype in (torch.float16, torch.bfloat16)
    if sampling_locations.dtype != value.dtype and not (
        half and sampling_locations.dtype == torch.float32
    ):
        raise TypeError(
            f"sampling_locations dtype {sampling_locations.dtype} must equal value dtype "
            f"{value.dtype} (or be float32 when the value is float16/bfloat16)"
        )
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            "all inputs must be on one device, got "
            + ", ".join(f"{n} on {t.device}" for n, t in zip(names, tensors))
        )
    if torch.compiler.is_compiling():
        return
    sizes = spatial_shapes.prod(1)
    if (spatial_shapes < 1).any():
        raise ValueError(f"spatial_shapes must be positive, got {spatial_shapes.tolist()}")
    if int(sizes.sum()) != S:
        raise ValueError(
            f"sum of H*W over spatial_shapes {spatial_shapes.tolist()} is {int(sizes.sum())}, "
            f"but value has S={S}"
        )
    expected_start = torch.cumsum(sizes, 0) - sizes
    if not torch.equal(expected_start, level_start_index):
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} does not match spatial_shapes: "
            f"expected {expected_start.tolist()}"
        )


def ms_deform_attn_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Multi-scale deformable attention in pure PyTorch (grid_sample); the reference path.

    Same arguments and result as :func:`ms_deform_attn`. Used for export and as the test
    reference; it materialises every sampled value ([N*M, D, Lq, L*P]), so it is slow and
    memory hungry at encoder sizes.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).to(value.dtype)
    sampled = []
    for lid, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        )  # [N*M, D, Lq, P]
    attn = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


if _COMPILED:

    @torch.library.register_fake("deformable_detr::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights):
        N, _, M, D = value.shape
        return value.new_empty((N, sampling_locations.shape[1], M * D))

    @torch.library.register_fake("deformable_detr::ms_deform_attn_backward")
    def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, grad_output):
        return (torch.empty_like(value), torch.empty_like(sampling_locations),
                torch.empty_like(attention_weights))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.deformable_detr.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, loc, attn, grad_output.contiguous()
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd(
        "deformable_detr::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention with the compiled CPU/CUDA kernels.

    See the module docstring for shapes and conventions. Differentiable in ``value``,
    ``sampling_locations`` and ``attention_weights``; goes through ``torch.compile`` and
    ``torch.export`` as the custom op ``torch.ops.deformable_detr.ms_deform_attn_forward``.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not has_compiled_op(value.device):
        reason = (f"the extension failed to import ({_IMPORT_ERROR})" if not _COMPILED
                  else f"it was built without {value.device.type} kernels")
        raise RuntimeError(
            f"the compiled ms_deform_attn op is not available for {value.device.type}: "
            f"{reason}. Rebuild with `pip install -e .` (FORCE_CUDA=1 for CUDA), or use "
            "ms_deform_attn_pytorch / MODEL.DEFORMABLE_DETR.ATTN_IMPL 'pytorch'."
        )
    return torch.ops.deformable_detr.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )

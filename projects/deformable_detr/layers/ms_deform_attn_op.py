"""The multi-scale deformable attention operator: compiled kernels and the PyTorch path.

Shapes (N batch, S = sum over levels of H_l * W_l, M heads, D channels per head, Lq queries,
L levels, P sampling points per level):

- ``value`` ``[N, S, M, D]``: the levels' value maps flattened row-major and concatenated.
- ``spatial_shapes`` int64 ``[L, 2]``: each level's (H, W).
- ``level_start_index`` int64 ``[L]``: where each level starts along S.
- ``sampling_locations`` ``[N, Lq, M, L, P, 2]``: (x, y) normalised to [0, 1] by each level's
  size, pixel centres at ``(i + 0.5) / size``; locations outside contribute zero.
- ``attention_weights`` ``[N, Lq, M, L, P]``.
- ``spatial_shapes_list`` (optional, keyword): the same (H, W) pairs as Python ints.
- result ``[N, Lq, M * D]``, head-major.

Sampling is bilinear with zero padding: ``grid_sample(..., align_corners=False,
padding_mode="zeros")`` on ``2 * location - 1``.

Dtypes. ``value`` is float64, float32, float16 or bfloat16. ``sampling_locations`` and
``attention_weights`` each have the value's dtype, or float32 when the value is
float16/bfloat16 (recommended for the locations: half-precision locations lose sub-pixel
accuracy on large maps). Half-precision values are computed in float32; the result has the
value's dtype, and the gradients come back in each input's own dtype. Both
:func:`ms_deform_attn` and :func:`ms_deform_attn_pytorch` follow these rules.

Autocast (``torch.autocast`` on "cpu" or "cuda", for the device of the inputs): a float32
value is cast to the autocast dtype (``torch.get_autocast_dtype(device)``); a float16,
bfloat16 or float64 value stays as it is. When the value is then float16/bfloat16, the
locations and weights (any floating dtype) are cast to float32; otherwise they are left
alone. The op itself runs with autocast off, and the result has the (cast) value's dtype. The
casts are differentiable: gradients reach the inputs in their original dtypes.

Device waits and memory safety. The contents of ``spatial_shapes``/``level_start_index`` are
checked (positive sizes, sum of H*W equal to S, starts equal to the cumulative sizes) only
where that costs no wait for the device: on ``spatial_shapes_list`` when given (sizes and
sum), else on the tensors when they live on the CPU. CUDA tensors are never read. The kernels
never access memory outside ``value`` whatever the shapes tensors hold (a level whose
(H, W, start) does not fit in [0, S) is treated as empty), so inconsistent shapes on CUDA give
wrong values, not crashes. The PyTorch path needs the shapes as ints: pass
``spatial_shapes_list`` there, or it reads ``spatial_shapes`` (a device wait on CUDA).
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "has_compiled_op", "check_inputs"]

_HALF = (torch.float16, torch.bfloat16)

try:
    from deformable_detr import _C  # noqa: F401  (loads the kernels and registers the op)

    _COMPILED = True
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _COMPILED = False
    _IMPORT_ERROR = e

# The device types the extension has kernels for, asked once.
_COMPILED_DEVICE_TYPES = (
    frozenset(["cpu"] + (["cuda"] if _C.build_info()["cuda"] else [])) if _COMPILED
    else frozenset()
)


def has_compiled_op(device: torch.device | str | None = None) -> bool:
    """Whether the compiled operator exists (for ``device``'s type, if given)."""
    if device is None:
        return _COMPILED
    return torch.device(device).type in _COMPILED_DEVICE_TYPES


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_cast(value, sampling_locations, attention_weights, dtype: torch.dtype):
    """The autocast rule of the module docstring: the three inputs as the op computes them."""
    if value.dtype == torch.float32:
        value = value.to(dtype)
    if value.dtype in _HALF:
        # Only floating tensors: anything else is left for the dtype check to reject.
        if sampling_locations.is_floating_point():
            sampling_locations = sampling_locations.float()
        if attention_weights.is_floating_point():
            attention_weights = attention_weights.float()
    return value, sampling_locations, attention_weights


def _shape_list(spatial_shapes_list, num_levels: int) -> list[tuple[int, int]]:
    try:
        shapes = [(operator.index(h), operator.index(w)) for h, w in spatial_shapes_list]
    except (TypeError, ValueError) as e:
        raise TypeError(f"spatial_shapes_list must be (H, W) pairs of ints, got "
                        f"{spatial_shapes_list!r}") from e
    if len(shapes) != num_levels:
        raise ValueError(f"levels: sampling_locations has L={num_levels}, spatial_shapes_list "
                         f"{shapes}")
    return shapes


def _check_levels(shapes: list[tuple[int, int]], starts: list[int] | None, S: int) -> None:
    if any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != S:
        raise ValueError(
            f"sum of H*W over spatial_shapes {shapes} is {sum(sizes)}, but value has S={S}"
        )
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    if starts is not None and starts != expected:
        raise ValueError(f"level_start_index {starts} does not match spatial_shapes: expected "
                         f"{expected}")


_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
          "attention_weights")


def _check_are_tensors(*tensors) -> None:
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_tensors(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights) -> None:
    """Ranks, sizes, dtypes (under autocast: after its casts) and devices.

    The one implementation of these checks, for both paths (the PyTorch path has to work
    without the extension). The compiled op asserts the same preconditions in C++
    (``prepare_inputs`` in csrc/ms_deform_attn_args.cpp) as one memory-safety guard for
    direct calls of ``torch.ops.deformable_detr.*``, whose message points here.
    """
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
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            "all inputs must be on one device, got "
            + ", ".join(f"{n} on {t.device}" for n, t in zip(_NAMES, tensors))
        )
    autocast_dtype = _autocast_dtype(value.device.type)
    value_dtype = value.dtype
    if autocast_dtype is not None and value_dtype == torch.float32:
        value_dtype = autocast_dtype
    half = value_dtype in _HALF
    for name, t in (("attention_weights", attention_weights),
                    ("sampling_locations", sampling_locations)):
        if half and autocast_dtype is not None:
            ok = t.is_floating_point()  # autocast casts it to float32
        else:
            ok = t.dtype == value_dtype or (half and t.dtype == torch.float32)
        if not ok:
            raise TypeError(
                f"{name} dtype {t.dtype} must equal the value dtype {value_dtype} (or be "
                "float32 when the value is float16/bfloat16)"
            )


def _check_level_contents(value, spatial_shapes, level_start_index, sampling_locations,
                          spatial_shapes_list) -> None:
    """The level contents, for inputs whose ranks and sizes have been checked.

    Only where that costs no device wait: ``spatial_shapes_list`` when given, else the
    tensors when they are on the CPU. Nothing while ``torch.compile`` traces. Not in C++:
    the compiled op never reads the shapes tensors beyond what its memory safety needs (a
    direct call with inconsistent levels gives wrong numbers, not an error), and it cannot
    know the Python ints.
    """
    if torch.compiler.is_compiling():
        return
    S, L = value.shape[1], sampling_locations.shape[3]
    if spatial_shapes_list is not None:
        _check_levels(_shape_list(spatial_shapes_list, L), None, S)
    elif value.device.type == "cpu":
        _check_levels([tuple(s) for s in spatial_shapes.tolist()], level_start_index.tolist(), S)


def check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 *, spatial_shapes_list: Sequence[tuple[int, int]] | None = None) -> None:
    """Raise a clear ``ValueError``/``TypeError`` for inputs the operator cannot take.

    Ranks, sizes, dtypes (under autocast: after its casts, see the module docstring) and
    devices are always checked. The level contents only where that costs no device wait:
    ``spatial_shapes_list`` when given (positive sizes, sum of H*W equal to S; it is trusted
    to match the tensors), else the tensors when they are on the CPU (also the start
    indices). Nothing is read while ``torch.compile`` traces.
    """
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _check_are_tensors(*tensors)
    _check_tensors(*tensors)
    _check_level_contents(value, spatial_shapes, level_start_index, sampling_locations,
                          spatial_shapes_list)


def ms_deform_attn_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
    spatial_shapes_list: Sequence[tuple[int, int]] | None = None,
):
    """Multi-scale deformable attention in pure PyTorch (grid_sample); the reference path.

    Same arguments, dtype rules and result as :func:`ms_deform_attn` (half-precision values
    are sampled in float32, so it runs on the CPU too). It materialises every sampled value
    ([N*M, D, Lq, L*P]), so it is slow and memory hungry at encoder sizes. Without
    ``spatial_shapes_list`` it reads ``spatial_shapes`` (a device wait on CUDA).
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 spatial_shapes_list=spatial_shapes_list)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if spatial_shapes_list is None:
        spatial_shapes_list = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes_list]
    autocast_dtype = _autocast_dtype(value.device.type)
    if autocast_dtype is not None:
        value, sampling_locations, attention_weights = _autocast_cast(
            value, sampling_locations, attention_weights, autocast_dtype)
    out_dtype = value.dtype
    if value.dtype in _HALF:
        # As the kernels: float32 arithmetic (grid_sample has no float16 CPU kernel).
        value = value.float()
        sampling_locations = sampling_locations.float()
        attention_weights = attention_weights.float()
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
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
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(out_dtype)


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

    # Autocast sits above autograd in the dispatcher: the casts below are recorded by
    # autograd, so gradients flow back to the inputs' original dtypes.
    # torch.library.register_autocast casts every input to one dtype, which would put the
    # locations in half precision: hence a kernel of our own per autocast key.
    _autocast_lib = torch.library.Library("deformable_detr", "IMPL")

    def _autocast_kernel(device_type: str, key: str):
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
            value, sampling_locations, attention_weights = _autocast_cast(
                value, sampling_locations, attention_weights,
                torch.get_autocast_dtype(device_type))
            # As torch.library.register_autocast: re-dispatch below the autocast key.
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return torch.ops.deformable_detr.ms_deform_attn_forward(
                    value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights)

        return kernel

    for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _autocast_lib.impl("ms_deform_attn_forward", _autocast_kernel(_device_type, _key), _key)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, *,
                   spatial_shapes_list: Sequence[tuple[int, int]] | None = None):
    """Multi-scale deformable attention with the compiled CPU/CUDA kernels.

    See the module docstring for shapes, dtypes and autocast. ``spatial_shapes_list`` (the
    (H, W) pairs as ints, matching ``spatial_shapes``) only serves the input checks here.
    Differentiable in ``value``, ``sampling_locations`` and ``attention_weights``; goes
    through ``torch.compile`` and ``torch.export`` as the custom op
    ``torch.ops.deformable_detr.ms_deform_attn_forward``.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, spatial_shapes_list=spatial_shapes_list)
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

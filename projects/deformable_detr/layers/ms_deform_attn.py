"""The multi-scale deformable attention module (Zhu et al., 2021, Eq. 3)."""
from __future__ import annotations

import logging
import math

import torch
from detectron2.utils.logger import log_first_n
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from .ms_deform_attn_op import has_compiled_op, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["MSDeformAttn", "ATTN_IMPLS", "check_attention_arguments"]

#: Values of ``attn_impl`` (``MODEL.DEFORMABLE_DETR.ATTN_IMPL``).
ATTN_IMPLS = ("auto", "compiled", "pytorch")


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Each query predicts, per head, ``n_points`` sampling offsets on each of ``n_levels``
    feature levels around its reference point, samples the value there bilinearly, and sums
    the samples with attention weights normalised jointly over levels and points.

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels.
        n_heads: attention heads; ``d_model`` must be divisible by it.
        n_points: sampling points per head and level.
        attn_impl: "compiled" (the C++/CUDA op; an error if missing), "pytorch" (the
            grid_sample path, for export) or "auto" (compiled when the extension has a
            kernel for the input's device, else PyTorch with a one-time warning).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, attn_impl: str = "auto"):
        super().__init__()
        check_attention_arguments(d_model, n_heads, attn_impl)
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.attn_impl = attn_impl
        # The device types that get the compiled op, fixed here: "auto" picks by the value's
        # device type among those the extension has kernels for.
        self._compiled_device_types = {
            "compiled": None,  # every device type: the op says which it lacks
            "pytorch": frozenset(),
            "auto": frozenset(t for t in ("cpu", "cuda") if has_compiled_op(t)),
        }[attn_impl]
        # When set, a function with ms_deform_attn's signature called instead of attn_impl:
        # export swaps in implementations its formats can express
        # (deformable_detr.export.use_attention). Not a parameter: never saved.
        self.core_override = None

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        constant_(self.sampling_offsets.weight.data, 0.0)
        # Head m starts looking in direction 2*pi*m/M, point p at distance p + 1 (in units of
        # the level's pixels, after scaling the unit vector to touch the square's border).
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(
            self.n_heads, 1, 1, 2
        ).repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid_init.view(-1))
        constant_(self.attention_weights.weight.data, 0.0)
        constant_(self.attention_weights.bias.data, 0.0)
        xavier_uniform_(self.value_proj.weight.data)
        constant_(self.value_proj.bias.data, 0.0)
        xavier_uniform_(self.output_proj.weight.data)
        constant_(self.output_proj.bias.data, 0.0)

    def _core(self, value):
        if self.core_override is not None:
            return self.core_override
        compiled = self._compiled_device_types
        if compiled is None or value.device.type in compiled:
            return ms_deform_attn
        if self.attn_impl == "auto":
            log_first_n(
                logging.WARNING,
                f"deformable_detr._C has no kernel for {value.device.type}: MSDeformAttn falls "
                "back to the (slow) PyTorch path",
                key="message",
            )
        return ms_deform_attn_pytorch

    def _point_sampling_locations(self, query, reference_points, spatial_shapes):
        """Sampling locations [N, Lq, M, L, P, 2] around points ``reference_points``
        [N, Lq, L, 2]: the reference plus the predicted offset, in pixels of each level (x
        divided by the level's width, y by its height).

        The division is folded into the offsets' linear layer (its weight rows and bias scaled
        per level), and the reference plus bias is the accumulator of the matrix product: two
        passes over the locations instead of four (product, bias, division, sum), one without
        a graph (the product in place). It runs in the reference points' dtype (float32 for
        sub-pixel accuracy on large maps); under autocast a recorded graph's product runs in
        the autocast dtype (offsets are small; autocast does not cast in-place products).
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        dtype = reference_points.dtype
        inv_size = spatial_shapes.flip(-1).to(dtype).reciprocal()  # [L, 2] (1/W, 1/H)
        scale = inv_size[None, :, None, :].expand(M, L, P, 2).reshape(-1)
        weight = self.sampling_offsets.weight.to(dtype) * scale[:, None]
        bias = (self.sampling_offsets.bias.to(dtype) * scale).view(M, L, P, 2)
        locations = reference_points[:, :, None, :, None, :] + bias
        query = query.reshape(N * Lq, -1).to(dtype)
        if torch.is_grad_enabled():
            # Autograd would copy the in-place result of a view in the backward.
            return locations + (query @ weight.t()).view(locations.shape).to(dtype)
        locations.view(N * Lq, -1).addmm_(query, weight.t())
        return locations

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None, *, spatial_shapes_list=None):
        """
        The sampling locations are computed in the reference points' dtype (float32 for
        float32 references, also under autocast: for point references the offsets' linear
        layer too, for box references it runs in the autocast dtype); the core op then applies
        the autocast rule of ``ms_deform_attn_op``.

        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (top-left (0, 0),
                bottom-right (1, 1), of the valid, unpadded region scaled by the valid
                ratios), or [N, Lq, L, 4] boxes (cx, cy, w, h) in the same coordinates.
            input_flatten: [N, S, C], the levels flattened row-major and concatenated.
            input_spatial_shapes: int64 [L, 2], each level's (H, W).
            input_level_start_index: int64 [L].
            input_padding_mask: [N, S] bool, True at padded positions, or None.
            spatial_shapes_list: the levels' (H, W) as Python ints, the same as
                ``input_spatial_shapes``; with it the forward never waits for the device
                (the PyTorch path would otherwise read the shapes tensor).

        Returns:
            [N, Lq, C].
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[-1] not in (2, 4) or reference_points.shape[:3] != (N, Lq, L):
            raise ValueError(
                f"reference_points must be [N, Lq, L, 2 or 4] = [{N}, {Lq}, {L}, 2|4], got "
                f"{list(reference_points.shape)}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # In place only without a graph: autograd copies in-place results of views (a
            # linear layer's 3-d output is one) in the backward.
            fill = value.masked_fill if torch.is_grad_enabled() else value.masked_fill_
            value = fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        attention_weights = self.attention_weights(query).view(N, Lq, M, L * P)
        attention_weights = attention_weights.softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            sampling_locations = self._point_sampling_locations(
                query, reference_points, input_spatial_shapes)
        else:
            # Offsets are fractions of the box's half size, spread over the P points. A
            # location needs float32 for sub-pixel accuracy on large maps; half-precision
            # offsets are fine (they are small).
            sampling_offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2).to(
                reference_points.dtype)
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        output = self._core(value)(
            value, input_spatial_shapes, input_level_start_index, sampling_locations,
            attention_weights, spatial_shapes_list=spatial_shapes_list,
        )
        return self.output_proj(output)


def check_attention_arguments(d_model: int, n_heads: int, attn_impl: str, *,
                              names: dict[str, str] | None = None) -> None:
    """Raise a ValueError unless :class:`MSDeformAttn` can be built with these: ``d_model``
    divisible by ``n_heads``, ``attn_impl`` one of :data:`ATTN_IMPLS`, and "compiled" only
    where the extension is built.

    Args:
        names: what the messages call the arguments (e.g. the config keys they come from);
            by default their own names.
    """
    names = {"d_model": "d_model", "n_heads": "n_heads", "attn_impl": "attn_impl",
             **(names or {})}
    if d_model % n_heads != 0:
        raise ValueError(f"{names['d_model']} ({d_model}) must be divisible by "
                         f"{names['n_heads']} ({n_heads})")
    impl = names["attn_impl"]
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"{impl} must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl == "compiled" and not has_compiled_op():
        raise ValueError(
            f"{impl}='compiled' but the deformable_detr._C extension is not available: "
            f"build it (`pip install -e .`) or set {impl} to 'auto'/'pytorch'"
        )

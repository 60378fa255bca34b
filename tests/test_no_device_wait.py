"""No device-to-host waits in the adapter, the transformer and the attention op, and no
memory access outside ``value`` whatever the level shapes say.

The recorder flags everything that reads tensor contents on the host or sizes a result from
tensor contents: on a GPU each of these blocks the host until the device has caught up.
Tensors live on the CPU here, where such reads cost nothing, but they go through the same
calls, so the recorder sees them all the same.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_tiny_cfg
from detectron2.modeling import build_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from deformable_detr.layers import has_compiled_op, ms_deform_attn, ms_deform_attn_pytorch

# Tensor methods that read the contents on the host (on CPU tensors they dispatch no op).
HOST_READS = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__",
              "__array__", "__format__", "__repr__", "__str__"}
# aten ops that return host values or whose result size depends on tensor contents.
SYNC_OPS = {"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero", "masked_select",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
            "allclose", "bincount", "histc"}


def _non_cpu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.events.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, events, ops):
        super().__init__()
        self.events = events
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(str(func))
        flagged = name in SYNC_OPS
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            # Boolean masks as indices: the result size depends on the mask (nonzero).
            flagged = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                          for i in (args[1] if len(args) > 1 else []) if i is not None)
        elif name == "repeat_interleave":
            flagged = isinstance(args[0], torch.Tensor) and "output_size" not in kwargs
        elif name in ("_to_copy", "to"):
            device = kwargs.get("device")
            if device is None and len(args) > 1 and isinstance(args[1], (torch.device, str)):
                device = args[1]
            flagged = (_non_cpu(args[0]) and device is not None
                       and torch.device(device).type == "cpu")
        elif name == "copy_":
            flagged = args[0].device.type == "cpu" and _non_cpu(args[1])
        if flagged:
            self.events.append(str(func))
        return func(*args, **kwargs)


class DeviceWaitRecorder:
    """Context manager; ``events`` lists the host reads seen, ``ops`` every aten op run."""

    def __init__(self):
        self.events: list[str] = []
        self.ops: list[str] = []
        self._modes = (_FunctionRecorder(self.events), _DispatchRecorder(self.events, self.ops))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _recorded(fn) -> list[str]:
    with DeviceWaitRecorder() as rec:
        fn()
    return rec.events


@pytest.mark.parametrize("name,fn", [
    ("tolist", lambda t: t.tolist()),
    ("bool", lambda t: bool(t.any())),
    ("int", lambda t: int(t.sum())),
    ("item", lambda t: t.sum().item()),
    ("equal", lambda t: torch.equal(t, t)),
    ("if", lambda t: 1 if (t > 2).any() else 0),
    ("nonzero", lambda t: t.nonzero()),
    ("mask index", lambda t: t[t > 2]),
    ("numpy", lambda t: t.numpy()),
    ("range", lambda t: range(t[0, 0])),
    ("unique", lambda t: t.unique()),
    ("repeat_interleave", lambda t: t[0].repeat_interleave(t[0])),
])
def test_recorder_flags_host_reads(name, fn):
    assert _recorded(lambda: fn(torch.tensor([[3, 4], [1, 2]]))), name


def test_recorder_ignores_device_side_work():
    t = torch.tensor([[3, 4], [1, 2]])
    assert _recorded(lambda: (t.prod(1).cumsum(0), t.gather(0, t.argmax(0, keepdim=True)),
                              t.masked_fill(t > 2, 0),
                              torch.topk(t.float(), 1), t[:, 0].repeat(2), t.shape[0] * 2)) == []


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(make_tiny_cfg(**overrides))


VARIANTS = {
    "plain": {},
    "plain_pytorch_attention": {"ATTN_IMPL": "pytorch"},
    "two_stage": {"WITH_BOX_REFINE": True, "TWO_STAGE": True},
}


def _adapter_and_transformer(model, images):
    """The backbone (not ours to check) outside the recorder, then the adapter, transformer
    and heads inside it."""
    features = model.backbone(images.tensor)
    with DeviceWaitRecorder() as rec:
        srcs, masks = model.adapter(features, model.padding_mask(images))
        outputs = model.forward_multiscale(srcs, masks)
    return rec, outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_does_not_wait_for_the_device(variant):
    model = _model(**VARIANTS[variant]).eval()
    # Two sizes: the padding masks, valid ratios and proposals differ between the images.
    images = model.preprocess_image(make_inputs(sizes=((64, 96), (80, 48)), with_instances=False))
    with torch.no_grad():
        rec, outputs = _adapter_and_transformer(model, images)
    assert rec.events == []
    op = ("deformable_detr.ms_deform_attn_forward" if "pytorch" not in variant
          else "aten.grid_sampler_2d")
    assert any(op in o for o in rec.ops), "the recorder saw the attention"
    assert torch.isfinite(outputs["pred_boxes"]).all()


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_backward_does_not_wait_for_the_device(variant):
    model = _model(**VARIANTS[variant]).train()
    inputs = make_inputs(sizes=((64, 96), (80, 48)))
    images = model.preprocess_image(inputs)
    rec, outputs = _adapter_and_transformer(model, images)
    assert rec.events == []
    # The criterion reads the matching on the host by design (scipy); only backward is checked.
    targets = model.prepare_targets([x["instances"] for x in inputs], images.image_sizes)
    loss = sum(model.criterion(outputs, targets).values())
    with DeviceWaitRecorder() as rec:
        loss.backward()
    assert rec.events == []
    assert any("ms_deform_attn_backward" in o for o in rec.ops), "the recorder saw backward"


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_pytorch])
def test_op_reads_shapes_only_on_the_host(fn):
    if fn is ms_deform_attn and not has_compiled_op():
        pytest.skip("extension not built")
    shapes_list = [(4, 5), (2, 3)]
    shapes = torch.tensor(shapes_list)
    starts = torch.tensor([0, 20])
    value = torch.rand(2, 26, 2, 4)
    loc = torch.rand(2, 3, 2, 2, 2, 2)
    attn = torch.rand(2, 3, 2, 2, 2)
    # Given as ints, the shapes tensor is never read.
    assert _recorded(lambda: fn(value, shapes, starts, loc, attn,
                                spatial_shapes_list=shapes_list)) == []
    # Without them the CPU tensors are read for the checks (free on the CPU).
    assert "Tensor.tolist" in _recorded(lambda: fn(value, shapes, starts, loc, attn))


# ------------------------------------------------------- inconsistent shapes, direct op calls

needs_op = pytest.mark.skipif(not has_compiled_op(), reason="extension not built")

SHAPES = [(4, 5), (2, 3)]
STARTS = [0, 20]
S = 26


def _nan_framed_value(N, M, D, g):
    """A contiguous [N, S, M, D] value in the middle of a NaN-filled buffer: a read outside
    the value turns the output NaN."""
    pad = 4096
    n = N * S * M * D
    buf = torch.full((pad + n + pad,), float("nan"), dtype=torch.float64)
    value = buf[pad:pad + n].view(N, S, M, D)
    value.copy_(torch.rand(N, S, M, D, generator=g, dtype=torch.float64))
    assert value.is_contiguous() and value.storage_offset() == pad
    return value


BAD_LEVELS = {
    # (level, (H, W) or None to keep, start or None to keep)
    "too_large": (1, (20, 20), None),
    "too_large_by_one": (1, (2, 4), None),
    "negative_start": (1, None, -5),
    "start_beyond_S": (1, None, 30),
    "start_at_S": (1, None, S),
    "huge_sizes": (1, (2 ** 40, 2 ** 40), None),
    "huge_height": (1, (2 ** 40, 3), None),
    "huge_start": (1, None, 2 ** 40),
    "min_int64_start": (1, None, -2 ** 63),
    "zero_height": (1, (0, 3), None),
    "negative_size": (1, (-2, -3), None),
    "negative_width": (0, (4, -5), None),
    "level0_shifted": (0, None, 7),
}


@needs_op
@pytest.mark.parametrize("case", list(BAD_LEVELS))
def test_inconsistent_levels_stay_inside_value(case):
    lvl, hw, start = BAD_LEVELS[case]
    g = torch.Generator().manual_seed(0)
    N, M, D, Lq, L, P = 2, 2, 4, 5, 2, 3
    value = _nan_framed_value(N, M, D, g)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    shapes = [list(s) for s in SHAPES]
    starts = list(STARTS)
    if hw is not None:
        shapes[lvl] = list(hw)
    if start is not None:
        starts[lvl] = start
    bad = (torch.tensor(shapes), torch.tensor(starts))
    op = torch.ops.deformable_detr
    out = op.ms_deform_attn_forward(value, *bad, loc, attn)
    grad_out = torch.rand(out.shape, generator=g, dtype=torch.float64)
    grad_value, grad_loc, grad_attn = op.ms_deform_attn_backward(value, *bad, loc, attn, grad_out)

    # The reference: the offending level is empty (its weights zero) on the true shapes.
    value_ref = value.clone().requires_grad_(True)
    loc_ref = loc.clone().requires_grad_(True)
    attn_ref = attn.clone()
    attn_ref[:, :, :, lvl] = 0
    attn_ref.requires_grad_(True)
    ref = ms_deform_attn_pytorch(value_ref, torch.tensor(SHAPES), torch.tensor(STARTS), loc_ref,
                                 attn_ref)
    ref.backward(grad_out)

    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    assert grad_value.shape == value.shape and torch.isfinite(grad_value).all()
    torch.testing.assert_close(grad_value, value_ref.grad, rtol=1e-10, atol=1e-10)
    keep = [i for i in range(L) if i != lvl]
    torch.testing.assert_close(grad_loc[:, :, :, keep], loc_ref.grad[:, :, :, keep],
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_attn[:, :, :, keep], attn_ref.grad[:, :, :, keep],
                               rtol=1e-10, atol=1e-10)
    # An empty level contributes nothing, not even gradient.
    assert (grad_loc[:, :, :, lvl] == 0).all() and (grad_attn[:, :, :, lvl] == 0).all()

"""Mixed precision: the attention op's dtype mixes and autocast rule, and the tiny model's
training step under CPU autocast (float16 and bfloat16)."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_VARIANTS, make_inputs, make_tiny_cfg
from detectron2.modeling import build_model

from deformable_detr.layers import (
    MSDeformAttn,
    check_inputs,
    has_compiled_op,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)
from deformable_detr.modeling import HungarianMatcher, inverse_sigmoid, proposal_pos_embed

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
HALF = (F16, BF16)

needs_op = pytest.mark.skipif(not has_compiled_op(), reason="extension not built")
IMPLS = [pytest.param(ms_deform_attn, id="compiled", marks=needs_op),
         pytest.param(ms_deform_attn_pytorch, id="pytorch")]

# (value, sampling_locations, attention_weights) dtypes the op takes.
MIXES = [(v, lo, a) for v in HALF for lo, a in itertools.product((v, F32), (v, F32))]
MIXES += [(F32, F32, F32), (F64, F64, F64)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _mix_id(mix):
    return "-".join(_name(d) for d in mix)


SHAPES = [(6, 9), (3, 5), (2, 2)]
STARTS = [0, 54, 69]
S = 73


def _inputs(N=2, M=2, D=16, Lq=12, P=3, seed=0):
    """float64 value [N, S, M, D], locations [N, Lq, M, L, P, 2] (partly outside [0, 1]) and
    normalised weights [N, Lq, M, L, P]."""
    g = torch.Generator().manual_seed(seed)
    L = len(SHAPES)
    value = torch.rand(N, S, M, D, generator=g, dtype=F64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=F64) * 1.4 - 0.2
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=F64)
    return value, loc, attn / attn.sum((-1, -2), keepdim=True)


def _shapes():
    return torch.tensor(SHAPES), torch.tensor(STARTS)


def _run(fn, value, loc, attn, grad_out, **kwargs):
    """Output and the three gradients of ``fn`` at the given (leaf) inputs."""
    value, loc, attn = (t.detach().clone().requires_grad_(True) for t in (value, loc, attn))
    out = fn(value, *_shapes(), loc, attn, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), value.grad, loc.grad, attn.grad


def _reference(value, loc, attn, grad_out):
    """float64 on the same (already rounded) inputs."""
    return _run(ms_deform_attn_pytorch, value.double(), loc.double(), attn.double(),
                grad_out.double())


def _tolerance(result_dtype, compute_dtype):
    """Relative tolerance: the final rounding to ``result_dtype`` plus the accumulation
    error of ``compute_dtype``."""
    accumulation = 1e-10 if compute_dtype == F64 else 2e-5
    return max(torch.finfo(result_dtype).eps, accumulation)


def _assert_close(actual, expected, compute_dtype, name):
    tol = _tolerance(actual.dtype, compute_dtype)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def _check_against_float64(ours, inputs, grad_out, compute_dtype):
    ref = _reference(*inputs, grad_out)
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, a, b in zip(names, ours, ref):
        _assert_close(a, b, compute_dtype, name)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("mix", MIXES, ids=_mix_id)
def test_dtype_mixes_against_float64(fn, mix):
    value64, loc64, attn64 = _inputs()
    inputs = [t.to(d) for t, d in zip((value64, loc64, attn64), mix)]
    grad_out = torch.rand(2, 12, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    # The gradient arrives in the output's dtype: round it the same way for the reference.
    grad_out = grad_out.to(mix[0])
    ours = _run(fn, *inputs, grad_out)
    assert ours[0].dtype == mix[0], "the output has the value's dtype"
    for name, grad, dtype in zip(("value", "locations", "weights"), ours[1:], mix):
        assert grad.dtype == dtype, f"grad of {name} in its own dtype"
    _check_against_float64(ours, inputs, grad_out, F64 if mix[0] == F64 else F32)


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("value_dtype,bad", [(F64, F32), (F32, F16), (F16, BF16), (F16, F64)])
def test_dtype_mismatches_are_rejected(fn, value_dtype, bad):
    value, loc, attn = _inputs()
    value = value.to(value_dtype)
    ok = F32 if value_dtype in HALF else value_dtype
    with pytest.raises(TypeError, match="attention_weights dtype"):
        fn(value, *_shapes(), loc.to(ok), attn.to(bad))
    with pytest.raises(TypeError, match="sampling_locations dtype"):
        fn(value, *_shapes(), loc.to(bad), attn.to(ok))


# (autocast dtype, value, locations, weights) -> the dtype of the result
AUTOCAST_CASES = [
    (F16, F32, F32, F32, F16),  # a float32 value is cast to the autocast dtype
    (BF16, F32, F32, F32, BF16),
    (F16, F32, F16, F16, F16),  # half locations and weights go to float32
    (BF16, F32, F64, BF16, BF16),
    (F16, BF16, BF16, F32, BF16),  # a half value stays as it is
    (BF16, F16, F16, F16, F16),
    (F16, F64, F64, F64, F64),  # so does a float64 one, and its locations and weights
]


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=lambda c: "-".join(map(_name, c)))
def test_op_under_cpu_autocast(fn, case):
    autocast_dtype, *mix, result_dtype = case
    value64, loc64, attn64 = _inputs(seed=3)
    inputs = [t.to(d) for t, d in zip((value64, loc64, attn64), mix)]
    grad_out = torch.rand(2, 12, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    grad_out = grad_out.to(result_dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autocast("cpu", dtype=autocast_dtype):
        check_inputs(leaves[0], *_shapes(), *leaves[1:])
        out = fn(leaves[0], *_shapes(), *leaves[1:])
    assert out.dtype == result_dtype
    out.backward(grad_out)
    for leaf, dtype in zip(leaves, mix):
        assert leaf.grad.dtype == dtype, "gradients reach the inputs in their own dtypes"
    # What the op computed on: the value rounded to the result dtype, the rest unrounded
    # (float32 or float64).
    rounded = (inputs[0].to(result_dtype), *inputs[1:])
    compute = F64 if result_dtype == F64 else F32
    ref = _reference(*rounded, grad_out)
    _assert_close(out, ref[0], compute, "output")
    # The value's gradient is rounded to the result dtype before it is cast back.
    _assert_close(leaves[0].grad.to(result_dtype), ref[1], compute, "grad_value")
    _assert_close(leaves[1].grad, ref[2], compute, "grad_locations")
    _assert_close(leaves[2].grad, ref[3], compute, "grad_weights")


def test_autocast_rejects_float64_value_with_float32_weights():
    value, loc, attn = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(TypeError, match="attention_weights dtype"):
        ms_deform_attn_pytorch(value, *_shapes(), loc, attn.float())


@needs_op
def test_compiled_op_under_autocast_through_torch_compile():
    torch._dynamo.reset()
    value, loc, attn = (t.float().requires_grad_(True) for t in _inputs())
    shapes, starts = _shapes()

    def f(v, lo, a):
        return ms_deform_attn(v, shapes, starts, lo, a)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(value, loc, attn)
        eager = f(value, loc, attn)
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager)
    out.float().sum().backward()
    assert value.grad.dtype == torch.float32


@pytest.mark.parametrize("autocast_dtype", HALF, ids=_name)
@pytest.mark.parametrize("n_coords", [2, 4])
def test_module_under_cpu_autocast(autocast_dtype, n_coords):
    torch.manual_seed(0)
    kwargs = dict(d_model=32, n_levels=3, n_heads=2, n_points=3)
    modules = {impl: MSDeformAttn(**kwargs, attn_impl=impl)
               for impl in (["compiled"] if has_compiled_op() else []) + ["pytorch"]}
    state = next(iter(modules.values())).state_dict()
    with torch.no_grad():
        for p in state.values():  # off the zero init, so that offsets and weights matter
            p.add_(torch.randn(p.shape) * 0.05)
    for m in modules.values():
        m.load_state_dict(state)
    query = torch.rand(2, 7, 32)
    ref_pts = torch.rand(2, 7, 3, n_coords) * 0.8 + 0.1
    src = torch.rand(2, S, 32)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, 60:69] = True
    shapes, starts = _shapes()
    reference = modules["pytorch"](query, ref_pts, src, shapes, starts, mask)
    results = {}
    for impl, m in modules.items():
        core = ms_deform_attn if impl == "compiled" else ms_deform_attn_pytorch
        seen = []

        def recording_core(value, shapes_, starts_, locations, weights, core=core, seen=seen,
                           **kwargs):
            seen.append(locations.dtype)
            return core(value, shapes_, starts_, locations, weights, **kwargs)

        m.core_override = recording_core  # the module's own core, seeing its locations
        with torch.autocast("cpu", dtype=autocast_dtype):
            results[impl] = m(query, ref_pts, src, shapes, starts, mask,
                              spatial_shapes_list=SHAPES)
        m.core_override = None
        assert results[impl].dtype == autocast_dtype
        # Locations keep float32 (the references' dtype), whatever the offsets' dtype.
        assert seen == [torch.float32]
        tol = 4 * torch.finfo(autocast_dtype).eps
        torch.testing.assert_close(results[impl].float(), reference, rtol=tol,
                                   atol=tol * float(reference.abs().max()))
        results[impl].float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    if "compiled" in results:
        # The same arithmetic on the same rounded inputs: equal up to the final rounding.
        eps = torch.finfo(autocast_dtype).eps
        torch.testing.assert_close(results["compiled"].float(), results["pytorch"].float(),
                                   rtol=eps, atol=eps * float(reference.abs().max()))


# ----------------------------------------------------------------- half-safe model helpers


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_inverse_sigmoid_in_half_precision(dtype):
    x = torch.tensor([-0.5, 0.0, 1e-7, 1e-3, 0.3, 0.5, 0.999, 1.0, 2.0]).to(dtype)
    y = inverse_sigmoid(x)
    assert y.dtype == torch.float32
    # 1 / eps = 1e5 overflows float16: computed in float32, the ends stay finite.
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, inverse_sigmoid(x.double()).float())


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_proposal_pos_embed_in_half_precision(dtype):
    proposals = torch.tensor([[[-3.0, 0.0, 2.5, float("inf")]]]).to(dtype)
    emb = proposal_pos_embed(proposals, 16)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    torch.testing.assert_close(emb, proposal_pos_embed(proposals.float(), 16))


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_matcher_in_half_precision(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 10, 5, generator=g) * 8).to(dtype)  # saturated probabilities
    boxes = (torch.rand(2, 10, 4, generator=g) * 0.5 + 0.25).to(dtype)
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.rand(2, 4, generator=g) * 0.4
                + 0.3} for _ in range(2)]
    matcher = HungarianMatcher()
    expected = matcher({"pred_logits": logits.float(), "pred_boxes": boxes.float()}, targets)
    with torch.autocast("cpu", dtype=dtype):
        got = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for (i, j), (ei, ej) in zip(got, expected):
        assert torch.equal(i, ei) and torch.equal(j, ej)


# ------------------------------------------------------------------ the model under autocast

def _build(variant):
    torch.manual_seed(0)
    # A frozen backbone: float16 convolution backward on the CPU takes seconds (no oneDNN
    # kernel), and the backbone is detectron2's, not what is tested here.
    return build_model(make_tiny_cfg(**TINY_VARIANTS[variant], **{"MODEL.BACKBONE.FREEZE_AT": 5}))


@pytest.mark.parametrize("dtype", HALF, ids=_name)
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_training_step_under_cpu_autocast(variant, dtype):
    model = _build(variant).train()
    with torch.autocast("cpu", dtype=dtype):
        losses = model(make_inputs(sizes=((64, 96), (80, 48))))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter got a gradient"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad}"
    offsets = model.transformer.encoder.layers[0].self_attn.sampling_offsets
    assert offsets.weight.grad.abs().sum() > 0, "the attention got gradients through the op"


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_two_stage_inference_under_cpu_autocast(dtype):
    model = _build("two_stage").eval()
    inputs = make_inputs(sizes=((64, 96), (80, 48)), with_instances=False)
    with torch.no_grad():
        expected = model.raw_outputs(inputs)
        with torch.autocast("cpu", dtype=dtype):
            raw = model.raw_outputs(inputs)
    assert torch.isfinite(raw["pred_logits"]).all()
    assert raw["pred_boxes"].dtype == torch.float32
    assert ((raw["pred_boxes"] >= 0) & (raw["pred_boxes"] <= 1)).all()
    # The encoder's outputs (before the top-k, which rounding may reorder) stay close.
    for key in ("pred_logits", "pred_boxes"):
        a, b = raw["enc_outputs"][key].float(), expected["enc_outputs"][key]
        assert ((a - b).abs().max() / b.abs().max()) < 8 * torch.finfo(dtype).eps, key

"""The compiled multi-scale deformable attention op against the grid_sample reference."""
import itertools
import math

import pytest
import torch

from deformable_detr.layers import (
    MSDeformAttn,
    check_inputs,
    has_compiled_op,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

pytestmark = pytest.mark.skipif(not has_compiled_op(), reason="extension not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_compiled_op("cuda") else [])


def make_inputs(shapes, N=2, M=2, D=8, Lq=5, P=4, dtype=torch.float64, device="cpu", seed=0,
                loc_dtype=None):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.as_tensor(shapes, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), shapes.shape[0]
    value = torch.rand(N, S, M, D, generator=g, dtype=torch.float64)
    # Partly outside [0, 1]: exercises zero padding, border corners and the (-1, H) cut-off.
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    attn = (attn / attn.sum((-1, -2), keepdim=True))
    to = dict(device=device)
    return (value.to(dtype=dtype, **to), shapes.to(**to), starts.to(**to),
            loc.to(dtype=loc_dtype or dtype, **to), attn.to(dtype=dtype, **to))


def run(fn, inputs, grad_out):
    value, shapes, starts, loc, attn = [t.clone() for t in inputs]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = fn(value, shapes, starts, loc, attn)
    out.backward(grad_out)
    return out.detach(), value.grad, loc.grad, attn.grad


def assert_matches_reference(inputs, rtol, atol):
    grad_out = torch.rand(inputs[0].shape[0], inputs[3].shape[1],
                          inputs[0].shape[2] * inputs[0].shape[3],
                          generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(inputs[0])
    ours = run(ms_deform_attn, inputs, grad_out)
    ref = run(ms_deform_attn_pytorch, inputs, grad_out)
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


LEVELS = [
    [(1, 1)],
    [(7, 5), (1, 1)],
    [(6, 9), (3, 5), (2, 2)],
    [(8, 11), (4, 6), (2, 3), (1, 2)],
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", LEVELS, ids=lambda s: f"{len(s)}levels")
@pytest.mark.parametrize("D", [1, 8, 30, 32, 64, 71])
def test_float64_levels_and_channels(device, shapes, D):
    inputs = make_inputs(shapes, N=2, M=2, D=D, P=4, device=device, seed=D)
    assert_matches_reference(inputs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,M,P", list(itertools.product([1, 2, 3], [1, 8], [1, 4, 8])))
def test_float64_batch_heads_points(device, N, M, P):
    inputs = make_inputs(LEVELS[3], N=N, M=M, D=8, P=P, Lq=6, device=device, seed=N * 100 + P)
    assert_matches_reference(inputs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [8, 32, 71])
# The CPU kernels read the value (and sum its gradient) in place for few queries
# (Lq * L * P < S = 120) and work on per-head copies for many: both paths.
@pytest.mark.parametrize("Lq", [2, 20])
def test_float32(device, D, Lq):
    inputs = make_inputs(LEVELS[3], N=2, M=8, D=D, P=4, Lq=Lq, dtype=torch.float32,
                         device=device, seed=D)
    assert_matches_reference(inputs, rtol=1e-5, atol=1e-5)


def test_float32_against_float64():
    inputs = make_inputs(LEVELS[3], N=2, M=8, D=32, P=4, Lq=50)
    grad_out = torch.rand(2, 50, 256, dtype=torch.float64)
    ref = run(ms_deform_attn_pytorch, inputs, grad_out)
    ours = run(ms_deform_attn, [t.float() if t.is_floating_point() else t for t in inputs],
               grad_out.float())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(device, dtype):
    inputs64 = make_inputs(LEVELS[2], N=2, M=2, D=32, P=4, Lq=16)
    value, shapes, starts, loc, attn = inputs64
    half = (value.to(dtype), shapes, starts, loc.float(), attn.to(dtype))
    half = [t.to(device) for t in half]
    out = ms_deform_attn(*half)
    assert out.dtype == dtype
    # Reference: float64 on the same (rounded) inputs; the only error left is the final cast.
    ref = ms_deform_attn_pytorch(half[0].double().cpu(), shapes, starts, half[3].double().cpu(),
                                 half[4].double().cpu())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


def test_gradcheck():
    inputs = make_inputs([(3, 4), (2, 2)], N=1, M=2, D=3, P=2, Lq=3, seed=3)
    value, shapes, starts, loc, attn = inputs
    # Keep the samples away from pixel centres' kinks so finite differences are smooth.
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), (value, loc, attn),
        eps=1e-6, atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# Lq=3 reads the value in place, Lq=40 works on per-head copies (Lq * L * P >= S = 19).
@pytest.mark.parametrize("Lq", [3, 40])
def test_opcheck(dtype, Lq):
    # The schema, the fake kernel, the autograd registration and the op under AOT dispatch
    # (torch.compile's path), each against the eager kernels.
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2), (1, 3)], N=2, M=2, D=4,
                                                   P=2, Lq=Lq, dtype=dtype, seed=5)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_forward.default,
                          (value, shapes, starts, loc, attn))
    grad_out = torch.rand(2, Lq, 8, dtype=dtype)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_backward.default,
                          (value.detach(), shapes, starts, loc.detach(), attn.detach(), grad_out))


def test_backward_is_deterministic():
    inputs = make_inputs(LEVELS[3], N=2, M=8, D=32, P=4, Lq=300, dtype=torch.float32, seed=7)
    # Many queries share value positions: racy accumulation would show up as bit differences.
    inputs = list(inputs)
    inputs[3] = inputs[3] * 0.2 + 0.4
    grad_out = torch.rand(2, 300, 256)
    first = run(ms_deform_attn, inputs, grad_out)
    for _ in range(2):
        again = run(ms_deform_attn, inputs, grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs(LEVELS[2], N=2, M=2, D=8)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    torch.testing.assert_close(
        ms_deform_attn(value_nc, shapes, starts, loc_nc, attn),
        ms_deform_attn_pytorch(value, shapes, starts, loc, attn), rtol=1e-10, atol=1e-10,
    )


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty(N, Lq):
    value, shapes, starts, loc, attn = make_inputs(LEVELS[1], N=max(N, 1), M=2, D=4, Lq=max(Lq, 1))
    value, loc, attn = value[:N], loc[:N, :Lq], attn[:N, :Lq]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (N, Lq, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape


def _bad(**changes):
    value, shapes, starts, loc, attn = make_inputs(LEVELS[2], N=2, M=2, D=8, P=4)
    args = dict(value=value, spatial_shapes=shapes, level_start_index=starts,
                sampling_locations=loc, attention_weights=attn)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(spatial_shapes=torch.tensor([[6, 9], [3, 5], [2, 3]])), ValueError, "sum of H\\*W"),
        (dict(level_start_index=torch.tensor([0, 54, 60])), ValueError, "level_start_index"),
        (dict(spatial_shapes=torch.tensor([[6, 9], [3, 5]])), ValueError, "levels"),
        (dict(value=torch.rand(2, 73, 3, 8, dtype=torch.float64)), ValueError, "heads"),
        (dict(value=torch.rand(3, 73, 2, 8, dtype=torch.float64)), ValueError, "batch"),
        (dict(attention_weights=torch.rand(2, 5, 2, 3, 2, dtype=torch.float64)), ValueError,
         "attention_weights"),
        (dict(value=torch.rand(2, 73, 16, dtype=torch.float64)), ValueError, "value must be"),
        (dict(spatial_shapes=torch.tensor([[6, 9], [3, 5], [2, 2]], dtype=torch.int32)),
         TypeError, "int64"),
        (dict(attention_weights=torch.rand(2, 5, 2, 3, 4)), TypeError, "attention_weights dtype"),
        (dict(value=torch.randint(0, 3, (2, 73, 2, 8))), TypeError, "floating point"),
    ],
)
@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_pytorch])
def test_validation_errors(fn, changes, error, match):
    with pytest.raises(error, match=match):
        fn(**_bad(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        dict(spatial_shapes=torch.tensor([[6, 9], [3, 5]])),
        dict(value=torch.rand(2, 73, 3, 8, dtype=torch.float64)),
        dict(value=torch.rand(3, 73, 2, 8, dtype=torch.float64)),
        dict(attention_weights=torch.rand(2, 5, 2, 3, 2, dtype=torch.float64)),
        dict(value=torch.rand(2, 73, 16, dtype=torch.float64)),
        dict(spatial_shapes=torch.tensor([[6, 9], [3, 5], [2, 2]], dtype=torch.int32)),
        dict(attention_weights=torch.rand(2, 5, 2, 3, 4)),
        dict(value=torch.randint(0, 3, (2, 73, 2, 8))),
    ],
)
def test_direct_op_calls_are_guarded(changes):
    """torch.ops.* skips the Python checks: the kernels still refuse what they cannot index."""
    args = list(_bad(**changes).values())
    grad_out = torch.rand(2, 5, 16, dtype=torch.float64)
    ops = torch.ops.deformable_detr
    for call in (lambda: ops.ms_deform_attn_forward(*args),
                 lambda: ops.ms_deform_attn_backward(*args, grad_out)):
        with pytest.raises(ValueError, match="check_inputs names the problem"):
            call()


@pytest.mark.parametrize(
    "shapes_list,error,match",
    [
        ([(6, 9), (3, 5), (2, 3)], ValueError, "sum of H\\*W"),
        ([(6, 9), (3, 5)], ValueError, "levels"),
        ([(6, 9), (3, 5), (2, 2), (1, 1)], ValueError, "levels"),
        ([(6, 9), (0, 5), (2, 2)], ValueError, "positive"),
        ([(6, 9), (3, 5), (2.0, 2)], TypeError, "pairs of ints"),
        ([(6, 9, 1), (3, 5), (2, 2)], TypeError, "pairs of ints"),
    ],
)
@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_pytorch])
def test_validation_errors_of_the_shapes_list(fn, shapes_list, error, match):
    with pytest.raises(error, match=match):
        fn(**_bad(), spatial_shapes_list=shapes_list)


def test_shapes_list_is_trusted_and_device_tensors_are_not_read():
    args = _bad(level_start_index=torch.tensor([0, 54, 60]))
    with pytest.raises(ValueError, match="level_start_index"):
        check_inputs(**args)
    # With the ints given, the tensors' contents are not read (no device wait on a GPU).
    check_inputs(**args, spatial_shapes_list=[(6, 9), (3, 5), (2, 2)])
    # Nor are they on a device other than the CPU ("meta" has no contents to read).
    check_inputs(**{k: v.to("meta") for k, v in _bad(spatial_shapes=torch.tensor(
        [[60, 9], [3, 5], [-2, 2]]), level_start_index=torch.tensor([7, 0, -1])).items()})


@pytest.mark.parametrize("impl", ["compiled", "pytorch"])
def test_module_with_shapes_list(impl):
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, attn_impl=impl)
    args = (torch.rand(2, 7, 32), torch.rand(2, 7, 2, 2), torch.rand(2, 39, 32),
            torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30]))
    torch.testing.assert_close(module(*args, spatial_shapes_list=[(6, 5), (3, 3)]),
                               module(*args), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices():
    with pytest.raises(ValueError, match="one device"):
        ms_deform_attn(**_bad(value=_bad()["value"].cuda()))


def test_torch_compile_fullgraph_with_backward():
    torch._dynamo.reset()
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, attn_impl="compiled")
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    query = torch.rand(2, 7, 32)
    ref_pts = torch.rand(2, 7, 2, 2)
    src = torch.rand(2, 39, 32)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(query, ref_pts, src, shapes, starts)
    out.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    eager = module(query, ref_pts, src, shapes, starts)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for a, p in zip(grads, module.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_torch_export_uses_the_custom_op():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2, attn_impl="compiled")
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    args = (torch.rand(1, 7, 32), torch.rand(1, 7, 2, 2), torch.rand(1, 39, 32), shapes, starts)
    ep = torch.export.export(module, args)
    assert "deformable_detr.ms_deform_attn_forward" in str(ep.graph)
    torch.testing.assert_close(ep.module()(*args), module(*args))


def test_module_initial_sampling_pattern():
    M, L, P = 8, 4, 4
    module = MSDeformAttn(d_model=256, n_levels=L, n_heads=M, n_points=P)
    bias = module.sampling_offsets.bias.detach().view(M, L, P, 2)
    for m in range(M):
        theta = 2 * math.pi * m / M
        direction = torch.tensor([math.cos(theta), math.sin(theta)])
        direction = direction / direction.abs().max()
        for lvl, p in itertools.product(range(L), range(P)):
            torch.testing.assert_close(bias[m, lvl, p], direction * (p + 1))
    assert module.sampling_offsets.weight.abs().sum() == 0
    assert module.attention_weights.weight.abs().sum() == 0
    assert module.attention_weights.bias.abs().sum() == 0
    assert module.value_proj.bias.abs().sum() == 0 and module.output_proj.bias.abs().sum() == 0
    # Xavier-uniform bound for a 256x256 weight.
    bound = math.sqrt(6 / 512)
    assert module.value_proj.weight.abs().max() <= bound
    assert module.value_proj.weight.std() > bound / 3


@pytest.mark.parametrize("n_coords", [2, 4])
def test_module_compiled_vs_pytorch_and_padding(n_coords):
    torch.manual_seed(0)
    kwargs = dict(d_model=64, n_levels=2, n_heads=4, n_points=3)
    compiled = MSDeformAttn(**kwargs, attn_impl="compiled").double()
    reference = MSDeformAttn(**kwargs, attn_impl="pytorch").double()
    reference.load_state_dict(compiled.state_dict())
    for p in compiled.parameters():  # move off the zero init so every path matters
        p.data += torch.randn_like(p) * 0.05
    reference.load_state_dict(compiled.state_dict())
    shapes = torch.tensor([[5, 6], [3, 3]])
    starts = torch.tensor([0, 30])
    query = torch.rand(2, 9, 64, dtype=torch.float64)
    ref_pts = torch.rand(2, 9, 2, n_coords, dtype=torch.float64)
    src = torch.rand(2, 39, 64, dtype=torch.float64)
    mask = torch.zeros(2, 39, dtype=torch.bool)
    mask[1, 25:30] = True
    out = compiled(query, ref_pts, src, shapes, starts, mask)
    torch.testing.assert_close(out, reference(query, ref_pts, src, shapes, starts, mask))
    # Padded positions hold exactly zero value: changing their input changes nothing.
    src2 = src.clone()
    src2[1, 25:30] += 100.0
    torch.testing.assert_close(compiled(query, ref_pts, src2, shapes, starts, mask), out)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="attn_impl"):
        MSDeformAttn(attn_impl="cuda")
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with pytest.raises(ValueError, match="reference_points"):
        module(torch.rand(1, 3, 32), torch.rand(1, 3, 2, 3), torch.rand(1, 39, 32),
               torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30]))

"""GPU-only checks (skipped as a whole without CUDA): the CUDA kernels against the PyTorch path
in every dtype, gradcheck, determinism, no device waits (sync debug mode, CUDA graph capture),
and mixed-precision training of the three main variants, plus a short train_net.py AMP run.

``make gpu-check`` (benchmarks/gpu_check.py) runs these on a GPU machine. The model-level
tests need detectron2 and skip without it (the op-level ones need only torch and the
extension).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_VARIANTS

from deformable_detr.layers import has_compiled_op, ms_deform_attn, ms_deform_attn_pytorch

if not (torch.cuda.is_available() and has_compiled_op("cuda")):
    pytest.skip("needs a CUDA GPU and the extension built with its CUDA kernels",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = [(12, 17), (6, 9), (3, 5), (2, 3)]
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
#: Largest relative L2 error against a float64 reference on the same (rounded) inputs. The
#: kernels accumulate half precision in float32, so what is left is the final rounding.
TOLERANCE = {F64: 1e-12, F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}


def make_inputs(N=2, Lq=40, M=4, D=32, P=4, levels=LEVELS, dtype=F32, loc_dtype=None,
                attn_dtype=None, seed=0, loc_range=(-0.3, 1.3)):
    """CUDA inputs; locations uniform in ``loc_range`` (partly outside [0, 1]: zero padding
    and the border cut-off), weights normalised per (query, head)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(levels)
    value = torch.randn(N, S, M, D, generator=g, dtype=F64)
    lo, hi = loc_range
    loc = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=F64)
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=F64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return [value.to(dtype).cuda(), shapes.cuda(), starts.cuda(),
            loc.to(loc_dtype or dtype).cuda(), attn.to(attn_dtype or dtype).cuda()]


def grad_output_for(inputs, dtype, seed=1):
    value, _, _, loc, _ = inputs
    N, _, M, D = value.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, loc.shape[1], M * D, generator=g, dtype=F64).to(dtype).cuda()


def forward_backward(fn, inputs, grad_out, **kwargs):
    """fn's output and its gradients in value, locations and weights (fresh leaves)."""
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2], **kwargs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def reference(inputs, grad_out):
    """The PyTorch path in float64 on the same inputs (upcast after their rounding)."""
    up = [t.double() if t.is_floating_point() else t for t in inputs]
    return forward_backward(ms_deform_attn_pytorch, up, grad_out.double())


def rel_error(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close_to(results, ref, tol):
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                          results, ref):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = rel_error(a, b)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# ---------------------------------------------------------------------------- op vs PyTorch

DTYPE_CASES = [
    (F64, F64, F64), (F32, F32, F32),
    # Half values: locations and weights each in the value's dtype or float32 (autocast
    # gives float32 locations and weights).
    *[(h, loc, attn) for h in (F16, BF16) for loc in (h, F32) for attn in (h, F32)],
]


@pytest.mark.parametrize("dtype,loc_dtype,attn_dtype", DTYPE_CASES,
                         ids=lambda t: str(t).replace("torch.", ""))
def test_matches_pytorch_path(dtype, loc_dtype, attn_dtype):
    inputs = make_inputs(dtype=dtype, loc_dtype=loc_dtype, attn_dtype=attn_dtype)
    grad_out = grad_output_for(inputs, dtype)
    ours = forward_backward(ms_deform_attn, inputs, grad_out)
    # Gradients come back in each input's own dtype, the output in the value's.
    assert [t.dtype for t in ours] == [dtype, dtype, loc_dtype, attn_dtype]
    assert_close_to(ours, reference(inputs, grad_out), TOLERANCE[dtype])
    # And the PyTorch path in the same dtypes computes the same function.
    theirs = forward_backward(ms_deform_attn_pytorch, inputs, grad_out)
    assert_close_to(theirs, reference(inputs, grad_out), TOLERANCE[dtype])


@pytest.mark.parametrize("D", [1, 8, 30, 32, 64, 71])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_channel_counts(D, dtype):
    """Vectorised and scalar channel paths (D a multiple of the vector width or not)."""
    inputs = make_inputs(N=1, Lq=25, M=2, D=D, dtype=dtype, loc_dtype=F32, seed=D)
    grad_out = grad_output_for(inputs, dtype)
    assert_close_to(forward_backward(ms_deform_attn, inputs, grad_out),
                    reference(inputs, grad_out), TOLERANCE[dtype])


def test_large_batch_of_queries():
    """Many (query, head) groups: the grid-stride loops go around more than once."""
    inputs = make_inputs(N=3, Lq=3000, M=8, D=32, levels=[(40, 50), (20, 25)], seed=5)
    grad_out = grad_output_for(inputs, F32)
    assert_close_to(forward_backward(ms_deform_attn, inputs, grad_out),
                    reference(inputs, grad_out), TOLERANCE[F32])


def test_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=3, M=2, D=3, P=2,
                                                   levels=[(3, 4), (2, 2)], dtype=F64, seed=3,
                                                   loc_range=(0.05, 0.95))
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    # nondet_tol: the value gradient is summed with atomics outside deterministic mode.
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), leaves,
        eps=1e-6, atol=1e-5, nondet_tol=1e-12,
    )


# ---------------------------------------------------------------------------- determinism


def colliding_inputs(dtype):
    """Many queries sampling the same few value positions: 2,000 queries per image on maps
    of at most 4x5, so every value row gets hundreds of contributions per head."""
    return make_inputs(N=2, Lq=2000, M=8, D=32, levels=[(4, 5), (2, 3), (1, 1)], dtype=dtype,
                       loc_dtype=F32 if dtype in (F16, BF16) else None, seed=11,
                       loc_range=(0.2, 0.8))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_deterministic_backward_is_bit_identical(dtype):
    inputs = colliding_inputs(dtype)
    grad_out = grad_output_for(inputs, dtype)
    ref = reference(inputs, grad_out)  # grid_sample's backward is not deterministic itself
    with deterministic_algorithms(True):
        runs = [forward_backward(ms_deform_attn, inputs, grad_out) for _ in range(3)]
    for again in runs[1:]:
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"),
                              runs[0], again):
            assert torch.equal(a, b), f"{name} differs between runs"
    assert_close_to(runs[0], ref, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_nondeterministic_backward_matches_reference(dtype):
    inputs = colliding_inputs(dtype)
    grad_out = grad_output_for(inputs, dtype)
    with deterministic_algorithms(False):
        ours = forward_backward(ms_deform_attn, inputs, grad_out)
    assert_close_to(ours, reference(inputs, grad_out), TOLERANCE[dtype])


# ----------------------------------------------------------------------- no device waits


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_forward_backward_never_wait_for_the_device(deterministic):
    """No device-to-host copy or synchronisation anywhere in the op: sync debug mode turns
    any into an error."""
    value, shapes, starts, loc, attn = make_inputs(dtype=F32)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    grad_out = grad_output_for([value, shapes, starts, loc, attn], F32)
    torch.cuda.synchronize()
    with deterministic_algorithms(deterministic):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
            grads = torch.autograd.grad(out, leaves, grad_out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)


def test_cuda_graph_capture_and_replay():
    """Forward and backward captured in one CUDA graph (capture fails on any device wait),
    replayed on new inputs copied into the captured buffers."""
    value, shapes, starts, loc, attn = make_inputs(dtype=F32, seed=0)
    leaves = [t.requires_grad_(True) for t in (value, loc, attn)]
    grad_out = grad_output_for([value, shapes, starts, loc, attn], F32)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
            torch.autograd.grad(out, leaves, grad_out)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_out)

    new = make_inputs(dtype=F32, seed=1)
    with torch.no_grad():
        for leaf, t in zip(leaves, (new[0], new[3], new[4])):
            leaf.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to([out, *grads], reference(new, grad_out), TOLERANCE[F32])


# ---------------------------------------------------------------- mixed-precision training

#: The variants of conftest.TINY_VARIANTS trained under AMP here (the multi-scale ones).
AMP_VARIANTS = ("plain", "box_refine", "two_stage")


def train_steps(overrides, amp_dtype, steps=15, lr=1e-4, device="cuda"):
    """A tiny model (tests/conftest.py) trained on one fixed batch under autocast, with a
    GradScaler for float16. Returns the losses, the steps whose unscaled gradients were not
    finite (the scaler skips those), and whether the attention's sampling offsets got a
    gradient."""
    from conftest import make_inputs as make_model_inputs
    from conftest import make_tiny_cfg
    from detectron2.modeling import build_model

    cfg = make_tiny_cfg(**overrides, **{"MODEL.DEVICE": device,
                                        "MODEL.DEFORMABLE_DETR.ATTN_IMPL": "compiled"})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == F16)
    inputs = make_model_inputs(sizes=((64, 96), (96, 64)), num_classes=5, boxes_per_image=2)
    losses, skipped, offsets_grad = [], [], False
    for step in range(steps):
        with torch.autocast(device, dtype=amp_dtype):
            loss_dict = model(inputs)
        total = sum(loss_dict.values())
        assert torch.isfinite(total), f"step {step}: loss {total.item()} ({loss_dict})"
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            skipped.append(step)
        offsets_grad = offsets_grad or any(
            p.grad is not None and p.grad.abs().sum() > 0
            for n, p in model.named_parameters() if "sampling_offsets" in n)
        scaler.step(optimizer)
        scaler.update()
        losses.append(total.item())
    return losses, skipped, offsets_grad


@pytest.mark.parametrize("amp_dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("variant", AMP_VARIANTS)
def test_amp_training_steps(variant, amp_dtype):
    pytest.importorskip("detectron2")
    losses, skipped, offsets_grad = train_steps(TINY_VARIANTS[variant], amp_dtype)
    assert all(math.isfinite(x) for x in losses), losses
    # float16: the scaler may skip the first steps while it lowers its scale from 2**16;
    # bfloat16 has float32's range and never overflows.
    assert len(skipped) <= (3 if amp_dtype == F16 else 0), f"non-finite gradients: {skipped}"
    assert skipped == [] or skipped[-1] < len(losses) - 5, f"late non-finite steps: {skipped}"
    assert offsets_grad, "no gradient reached the deformable attention's sampling offsets"
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first, f"the loss did not go down on a fixed batch: {losses}"


def test_train_net_amp(tmp_path):
    """train_net.py on a few synthetic 'shapes' images with SOLVER.AMP.ENABLED: it finishes
    and logs finite losses."""
    pytest.importorskip("detectron2")
    from deformable_detr.data import generate_shapes_dataset

    datasets = tmp_path / "datasets"
    generate_shapes_dataset(str(datasets / "shapes"), num_train=16, num_val=2, workers=2)
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"),
           "--config-file", os.path.join(ROOT, "configs", "demo", "deformable_detr_shapes.yaml"),
           "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "8",
           "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "2", "DATALOADER.NUM_WORKERS",
           "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses, "no training metrics were written:\n" + log[-3000:]
    assert all(math.isfinite(x) for x in losses), losses

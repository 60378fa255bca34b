"""The CUDA kernels of csrc/cuda, compiled unchanged as C++ and run by the CUDA launch emulator
(tests/cuda_emulation), against the PyTorch reference; and the emulator's own self-tests.

No GPU needed: this is how CI runs the CUDA kernels. The first run builds the emulator
(build/cuda_emulation/, reused afterwards).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from cuda_emulation.build import Mutation, MutationError, cuda_sources, load, load_mutants
from test_ms_deform_attn import LEVELS, make_inputs

from deformable_detr.layers import has_compiled_op, ms_deform_attn_pytorch

FULL = 0xFFFFFFFF
CUDA_SOURCE = "\n".join(p.read_text() for p in cuda_sources())
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def emu():
    return load()


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


# ---------------------------------------------------------------------------------------
# The emulator itself, on purpose-written kernels (tests/cuda_emulation/selftest_kernels.cpp).


def test_shared_memory_reduction_needs_its_barriers(emu):
    x = torch.randint(-1000, 1000, (8 * 256,), generator=torch.Generator().manual_seed(0))
    x = x.double()  # integers: the sums are exact in any order
    expected = x.view(8, 256).sum(1)
    with emu.settings(workers=2):
        assert torch.equal(emu.selftest.block_sum(x, True), expected)
    # Without __syncthreads a thread adds partial sums that others have not written yet.
    # The fiber order is a function of the seed: reproducible, and it varies with the seed.
    broken = []
    for seed in range(3):
        with emu.settings(seed=seed, workers=1):
            first = emu.selftest.block_sum(x, False)
        with emu.settings(seed=seed, workers=1):
            assert torch.equal(emu.selftest.block_sum(x, False), first)
        assert not torch.equal(first, expected)
        broken.append(first)
    assert not all(torch.equal(broken[0], b) for b in broken[1:])


def test_syncwarp_is_a_barrier(emu):
    x = torch.arange(8 * 64, dtype=torch.int32)
    assert torch.equal(emu.selftest.warp_exchange(x, True), x ^ 1)
    # Without __syncwarp some threads read their neighbour's slot before it is written.
    assert not torch.equal(emu.selftest.warp_exchange(x + 1000, False), (x + 1000) ^ 1)


SHUFFLE_KINDS = ["idx", "up", "down", "xor"]


def shuffle_model(kind, values, params, width, mask):
    """CUDA's shuffles per the PTX definition of shfl.sync: lanes form segments of `width`;
    idx reads lane srcLane mod width of the segment; up/down/xor (offset mod 32) keep the
    lane's own value where the source is past the segment's start/end (xor may read an
    earlier segment). Reading a lane outside `mask` is undefined: None here."""
    out = list(values)
    for i in range(len(values)):
        lane, base = i % 32, i - i % 32
        if not mask >> lane & 1:
            continue
        first, b = lane & ~(width - 1), params[i] & 31
        last = first + width - 1
        if kind == "idx":
            src = first | (params[i] & (width - 1))
        elif kind == "up":
            src = lane - b if lane - b >= first else lane
        elif kind == "down":
            src = lane + b if lane + b <= last else lane
        else:
            src = lane ^ b if lane ^ b <= last else lane
        out[i] = values[base + src] if mask >> src & 1 else None
    return out


def poison(dtype):
    """What the emulator returns for an undefined shuffle read (all bits set)."""
    return float("nan") if dtype.is_floating_point else -1


def test_shuffles_match_the_cuda_semantics(emu):
    g = torch.Generator().manual_seed(0)
    n = 64  # two warps
    ranges = {"idx": (-40, 41), "up": (0, 34), "down": (0, 34), "xor": (0, 40)}
    masks = [FULL, 0x0000FFFF, 0xA5A5A5A5]
    dtypes = [torch.int32, torch.int64, torch.float32, torch.float64, "struct16"]
    emu.reset_counters()
    undefined = calls = 0
    for kind_id, kind in enumerate(SHUFFLE_KINDS):
        for width in [1, 2, 4, 8, 16, 32]:
            for mask in masks:
                params = torch.randint(*ranges[kind], (n,), generator=g, dtype=torch.int32)
                for dtype in dtypes:
                    ids = (torch.arange(n) * 7 + 3).tolist()
                    expected = shuffle_model(kind, ids, params.tolist(), width, mask)
                    if dtype == "struct16":  # a 16-byte struct: four ints per lane
                        values = torch.tensor([[v, -v, v + 1, 5] for v in ids], dtype=torch.int32)
                        want = torch.tensor([[v, -v, v + 1, 5] if v is not None else [-1] * 4
                                             for v in expected], dtype=torch.int32)
                    else:
                        values = torch.tensor(ids, dtype=dtype)
                        want = torch.tensor([v if v is not None else poison(dtype)
                                             for v in expected], dtype=dtype)
                    got = emu.selftest.shuffle(values, params, kind_id, width, mask)
                    torch.testing.assert_close(
                        got, want, equal_nan=True, rtol=0, atol=0,
                        msg=lambda m, k=kind, w=width, mk=mask, d=dtype:
                        f"{k} width {w} mask {mk:#x} {d}: {m}")
                    undefined += sum(v is None for v in expected)
                    calls += 1
    counters = emu.counters()
    assert counters["undefined_shuffle_reads"] == undefined > 0
    # One completed shuffle per warp and launch (lanes outside the mask exit first).
    assert counters["shuffles"] == 2 * calls


def test_shuffle_examples_from_the_programming_guide(emu):
    lanes = torch.arange(32, dtype=torch.int32)

    def shfl(kind, param, width):
        p = torch.full((32,), param, dtype=torch.int32)
        return emu.selftest.shuffle(lanes, p, SHUFFLE_KINDS.index(kind), width, FULL).tolist()

    # Broadcast from lane 0 of each 8-lane segment; srcLane wraps within the segment.
    assert shfl("idx", 0, 8) == [lane & ~7 for lane in range(32)]
    assert shfl("idx", 9, 4) == [(lane & ~3) + 1 for lane in range(32)]
    assert shfl("idx", -1, 16) == [(lane & ~15) + 15 for lane in range(32)]
    # Scan step: the first `delta` lanes of each segment keep their value.
    assert shfl("up", 2, 8) == [lane if lane % 8 < 2 else lane - 2 for lane in range(32)]
    # Reduction step: the last lanes of each segment keep their value.
    assert shfl("down", 4, 16) == [lane if lane % 16 >= 12 else lane + 4 for lane in range(32)]
    # Butterfly: within the segment; towards a later segment the lane keeps its value, towards
    # an earlier one it reads it.
    assert shfl("xor", 1, 32) == [lane ^ 1 for lane in range(32)]
    assert shfl("xor", 16, 8) == [lane if lane < 16 else lane - 16 for lane in range(32)]


def test_votes_and_counting_barriers(emu):
    g = torch.Generator().manual_seed(1)
    cases = [torch.randint(0, 2, (64,), generator=g), torch.ones(64), torch.zeros(64)]
    cases[0][40:] = 1
    for pred in cases:
        pred = pred.int()
        for mask in [FULL, 0x0F0F0F0F]:
            out = emu.selftest.vote(pred, mask, 64)
            count = int(pred.sum())
            for i in range(64):
                assert out[i, 3:].tolist() == [count, int(count == 64), int(count > 0)]
                if not mask >> (i % 32) & 1:
                    continue
                warp = pred[i - i % 32:i - i % 32 + 32].tolist()
                ballot = sum(1 << j for j in range(32) if mask >> j & 1 and warp[j])
                assert out[i, 0].item() & FULL == ballot
                assert out[i, 1].item() == int(ballot != 0)
                assert out[i, 2].item() == int(ballot == mask)


FAULTS = [
    # (mode, threads, message)
    (0, 32, r"deadlock: warp 0 of block \(0, 0, 0\): lanes 0-4,6-31 wait at "
            r"__shfl_sync\(mask 0xffffffff\) at selftest_kernels\.cpp:\d+, but lane 5 never "
            r"arrived: lane 5 exited"),
    (1, 32, r"mismatched warp-synchronous calls: warp 0 .*lanes 0-15 wait at __shfl_xor_sync"
            r".*lanes 16-31 wait at __ballot_sync\(mask 0xffffffff\)"),
    (2, 32, r"mismatched warp-synchronous calls: .*lane 0 waits at __shfl_down_sync\(mask "
            r"0x00000003\).*lane 1 waits at __shfl_down_sync\(mask 0xffffffff\)"),
    (3, 64, r"deadlock: warp 0 .*lane 0 waits at __syncwarp\(mask 0xffffffff\).*lanes 1-31 "
            r"wait at __syncthreads at selftest_kernels\.cpp:\d+"),
    (4, 32, r"__shfl_sync at selftest_kernels\.cpp:\d+ by lane 0 of warp 0 with mask "
            r"0x00000002, which does not name the calling lane"),
    (5, 32, r"width 3 \(must be a power of two"),
    (6, 32, r"device-side assertion `t != 7` failed at selftest_kernels\.cpp:\d+ in "
            r"fault_kernel, thread \(7, 0, 0\)"),
    (7, 48, r"deadlock: warp 1 .*lanes 16-31 do not exist \(the block has 48 threads\)"),
    (8, 32, r"8-byte operand instead of 4"),
]


@pytest.mark.parametrize("mode,threads,message", FAULTS, ids=[str(f[0]) for f in FAULTS])
def test_kernel_bugs_raise_instead_of_hanging(emu, mode, threads, message):
    with pytest.raises(RuntimeError, match=message) as info:
        emu.selftest.fault(mode, threads)
    # The report names the kernel, its launch site and the block.
    report = str(info.value)
    assert "kernel cuda_emu::selftest::fault_kernel launched at selftest_kernels.cpp:" in report
    # The abandoned block's fibers were unwound: the emulator goes on working.
    x = torch.arange(256, dtype=torch.float64)
    assert torch.equal(emu.selftest.block_sum(x, True), x.sum().view(1))


def test_exited_lanes_may_be_allowed_in_masks(emu):
    with emu.settings(allow_exited_lanes=True):
        out = emu.selftest.fault(0, 32)  # lane 5 exits; the others broadcast lane 0
        assert out.tolist() == [-1 if t == 5 else 0 for t in range(32)]
        out = emu.selftest.fault(7, 48)  # xor 1 in a partial warp
        assert out.tolist() == [t ^ 1 for t in range(48)]


def test_atomics_are_exact_under_concurrent_blocks(emu):
    blocks, threads, iters = 512, 128, 4
    n = blocks * threads
    with emu.settings(workers=4):
        counts, tickets = emu.selftest.atomic_counts(blocks, threads, iters)
    assert counts.tolist() == [n * iters, n * iters * 0.5, n * iters, 2 * n * iters,
                               3 * n * iters, -n * iters]
    # atomicAdd returns the old value: every ticket handed out exactly once.
    assert torch.equal(tickets.sort().values, torch.arange(n, dtype=torch.int32))


def test_every_thread_of_a_3d_grid_runs_once_in_a_seeded_block_order(emu):
    grid, block = [5, 3, 2], [8, 4, 2]
    blocks, per_block = 30, 64
    orders = []
    for seed in [0, 1, 0]:
        with emu.settings(seed=seed, workers=1):
            hits = emu.selftest.coverage(grid, block)
        threads = blocks * per_block
        assert torch.equal(hits[:threads], torch.ones(threads, dtype=torch.int32))
        order = hits[threads:]
        assert torch.equal(order.sort().values, torch.arange(blocks, dtype=torch.int32))
        orders.append(order)
    assert torch.equal(orders[0], orders[2]) and not torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], torch.arange(blocks, dtype=torch.int32))


def test_invalid_launch_configurations_raise(emu):
    with pytest.raises(RuntimeError, match="invalid configuration argument: block"):
        emu.selftest.coverage([1, 1, 1], [33, 32, 1])
    with pytest.raises(RuntimeError, match="invalid configuration argument: grid"):
        emu.selftest.coverage([1, 0, 1], [1, 1, 1])


# ---------------------------------------------------------------------------------------
# The ops of csrc/cuda against the PyTorch reference.


def run_op(ops, inputs, grad_out):
    value, shapes, starts, loc, attn = inputs
    out = ops.ms_deform_attn_forward(value, shapes, starts, loc, attn)
    return (out, *ops.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out))


def run_reference(inputs, grad_out):
    """Forward and gradients in float64 (on the inputs as given, rounded or not)."""
    value, shapes, starts, loc, attn = [t.double() if t.is_floating_point() else t
                                        for t in inputs]
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    out.backward(grad_out.double())
    return out.detach(), value.grad, loc.grad, attn.grad


def make_grad_out(inputs, seed=1):
    value, loc = inputs[0], inputs[3]
    g = torch.rand(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                   generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.to(value.dtype)


def assert_matches_reference(ops, inputs, tol=None):
    grad_out = make_grad_out(inputs)
    ours = run_op(ops, inputs, grad_out)
    ref = run_reference(inputs, grad_out)
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    wanted = (inputs[0], inputs[0], inputs[3], inputs[4])
    for name, a, b, like in zip(names, ours, ref, wanted):
        assert a.dtype == like.dtype and a.shape == b.shape, name
        t = tol if tol is not None else TOLERANCE[a.dtype]
        torch.testing.assert_close(a.double(), b, rtol=t, atol=t,
                                   msg=lambda m, n=name: f"{n}: {m}")
    return ours


@pytest.mark.parametrize("shapes", LEVELS, ids=lambda s: f"{len(s)}levels")
@pytest.mark.parametrize("D", [1, 8, 30, 32, 64, 71])
def test_float64_levels_and_channels(emu, shapes, D):
    inputs = make_inputs(shapes, N=2, M=2, D=D, P=4, seed=D)
    assert_matches_reference(emu.ops, inputs)


@pytest.mark.parametrize("N,M,P", [(n, m, p) for n in [1, 2, 3] for m in [1, 8] for p in [1, 4, 8]])
def test_float64_batch_heads_points(emu, N, M, P):
    inputs = make_inputs(LEVELS[3], N=N, M=M, D=8, P=P, Lq=6, seed=N * 100 + P)
    assert_matches_reference(emu.ops, inputs)


@pytest.mark.parametrize("D", [8, 32, 71])
@pytest.mark.parametrize("Lq", [2, 20])
def test_float32(emu, D, Lq):
    inputs = make_inputs(LEVELS[3], N=2, M=8, D=D, P=4, Lq=Lq, dtype=torch.float32, seed=D)
    assert_matches_reference(emu.ops, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights_dtype", ["float32", "value"])
@pytest.mark.parametrize("D", [30, 32])  # 16-byte loads (D % 8 == 0) and single elements
def test_half_precision_accumulates_in_float32(emu, dtype, weights_dtype, D):
    value, shapes, starts, loc, attn = make_inputs(LEVELS[2], N=2, M=2, D=D, P=4, Lq=16)
    weights = torch.float32 if weights_dtype == "float32" else dtype
    inputs = (value.to(dtype), shapes, starts, loc.float(), attn.to(weights))
    # The reference is float64 on the same rounded inputs: what is left is the float32
    # accumulation and the final cast.
    assert_matches_reference(emu.ops, inputs)


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty(emu, N, Lq):
    value, shapes, starts, loc, attn = make_inputs(LEVELS[1], N=max(N, 1), M=2, D=4,
                                                   Lq=max(Lq, 1))
    inputs = (value[:N], shapes, starts, loc[:N, :Lq], attn[:N, :Lq])
    grad_out = torch.rand(N, Lq, 8, dtype=torch.float64)
    out, gv, gl, ga = run_op(emu.ops, inputs, grad_out)
    assert out.shape == (N, Lq, 8) and not out.any()
    for g, t in zip((gv, gl, ga), (inputs[0], inputs[3], inputs[4])):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


def test_kernels_launch_and_use_warp_operations(emu):
    inputs = make_inputs(LEVELS[2], N=2, M=2, D=8, P=4, Lq=5)
    emu.reset_counters()
    run_op(emu.ops, inputs, make_grad_out(inputs))
    c = emu.counters()
    assert c["launches"] >= 2 and c["blocks"] >= 2 and c["threads"] >= c["blocks"]
    if "_sync(" in CUDA_SOURCE:
        assert c["shuffles"] + c["votes"] + c["syncwarp"] > 0 and c["warp_lane_ops"] > 0
    # No shuffle of the real kernels reads a lane outside its mask.
    assert c["undefined_shuffle_reads"] == 0


def spread_inputs(dtype=torch.float32):
    """Many queries sampling the same value rows: summation order matters."""
    value, shapes, starts, loc, attn = make_inputs(LEVELS[3], N=2, M=2, D=32, P=4, Lq=30,
                                                   dtype=dtype, seed=7)
    return value, shapes, starts, loc * 0.2 + 0.4, attn


SCHEDULES = [(0, 1), (1, 2), (2, 4), (3, 3)]  # (seed, workers)


def test_deterministic_backward_is_bit_identical_across_schedules(emu):
    if "deterministicAlgorithms" not in CUDA_SOURCE:
        pytest.skip("the CUDA backward has no deterministic path yet")
    inputs = spread_inputs()
    grad_out = make_grad_out(inputs)
    results = []
    with deterministic_algorithms():
        for seed, workers in SCHEDULES:
            with emu.settings(seed=seed, workers=workers):
                try:
                    results.append(emu.ops.ms_deform_attn_backward(*inputs, grad_out))
                except RuntimeError as e:
                    if "determinis" in str(e):
                        pytest.skip(f"the CUDA backward has no deterministic path yet: {e}")
                    raise
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    ref = run_reference(inputs, grad_out)[1:]
    for a, b in zip(results[0], ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_nondeterministic_backward_matches_the_reference_in_any_schedule(emu):
    inputs = spread_inputs()
    grad_out = make_grad_out(inputs)
    ref = run_reference(inputs, grad_out)[1:]
    grad_values = []
    with deterministic_algorithms(False):
        for seed, workers in SCHEDULES:
            with emu.settings(seed=seed, workers=workers):
                grads = emu.ops.ms_deform_attn_backward(*inputs, grad_out)
            for a, b in zip(grads, ref):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
            grad_values.append(grads[0])
    if "atomicAdd" in CUDA_SOURCE:
        # The schedules differ in the order of the float atomics, so in the last bits.
        assert not all(torch.equal(grad_values[0], g) for g in grad_values[1:])


@pytest.mark.skipif(not has_compiled_op(), reason="deformable_detr._C not built")
def test_coexists_with_the_main_extension(emu):
    inputs = make_inputs(LEVELS[2], N=1, M=2, D=8)
    torch.testing.assert_close(emu.ops.ms_deform_attn_forward(*inputs),
                               torch.ops.deformable_detr.ms_deform_attn_forward(*inputs),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Deliberately broken copies of the kernels are caught. The mutations follow the current
# csrc/cuda/ms_deform_attn_cuda.cu: when it changes so that one no longer applies, its test
# fails and the mutation needs updating. tag: (mutations, expected failure, deterministic).

MUTANTS = {
    # Lanes whose group is past the end leave the grid-stride loop: the group's shuffles then
    # name lanes that have exited (CUDA: undefined), which the emulator reports.
    "loop_exit": ([Mutation(r"(const QueryGroup<index_t> group = groups\.at\(first\);)",
                            r"\1\n    if (!group.active) break;", count=2, regex=True)],
                  "deadlock", False),
    # A field of the sample broadcast without the group width: every group reads the first
    # group's fractional part (positions stay in bounds, so only the values go wrong).
    "width": ([Mutation("r.lh = __shfl_sync(kFullMask, m.lh, src, G);",
                        "r.lh = __shfl_sync(kFullMask, m.lh, src);")], "mismatch", False),
    # The butterfly reduction skips its first step: half of each dot product is lost.
    "butterfly": ([Mutation("for (int offset = G / 2; offset > 0; offset /= 2)",
                            "for (int offset = G / 4; offset > 0; offset /= 2)")],
                  "mismatch", False),
    # Deterministic mode: every entry of a run of equal rows writes the row (with a partial
    # sum), in whatever order the blocks run.
    "gather": ([Mutation("if (key == kNoRow || (e > 0 && keys[e - 1] == key)) continue;",
                         "if (key == kNoRow) continue;")], "mismatch", True),
}


@pytest.fixture(scope="module")
def mutants():
    return load_mutants({tag: mutations for tag, (mutations, _, _) in MUTANTS.items()})


@pytest.mark.parametrize("tag", sorted(MUTANTS))
def test_broken_kernel_is_caught(mutants, tag):
    variant = mutants[tag]
    if isinstance(variant, MutationError):
        pytest.fail(f"{variant}: update MUTANTS for the current kernel")
    _, expected, deterministic = MUTANTS[tag]
    # float64 (the only dtype the variants dispatch); D = 8 makes groups of 4 lanes, and the
    # 20 (query, head) pairs leave the last warp partly idle.
    inputs = make_inputs(LEVELS[2], N=2, M=2, D=8, P=4, Lq=5, seed=1)
    grad_out = make_grad_out(inputs)
    with deterministic_algorithms(deterministic):
        if expected == "deadlock":
            with pytest.raises(RuntimeError, match="deadlock: .* never arrived"):
                run_op(variant.ops, inputs, grad_out)
            return
        ours = run_op(variant.ops, inputs, grad_out)
    ref = run_reference(inputs, grad_out)
    assert not all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(ours, ref))

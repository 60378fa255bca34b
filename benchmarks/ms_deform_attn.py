#!/usr/bin/env python
"""Time the compiled multi-scale deformable attention op against the PyTorch (grid_sample) path.

Shapes: the encoder of one 800x1333 image (levels 100x167, 50x84, 25x42, 13x21; Lq = S =
22,223; M=8, D=32, L=4, P=4) at batch 1 and 2, and the decoder (Lq=300) at batch 2. Prints
median forward and backward times, their ratios, and the peak memory each pass adds on top
of its inputs (CPU: peak RSS, polled, of a fresh subprocess; CUDA: max_memory_allocated), as a
markdown table. All implementations are measured in the same run.

On CUDA the times come from CUDA events (median of ``--repeats`` after ``--warmup`` runs), in
float32, float16 and bfloat16 (half: value and weights in half, locations float32, as the
model feeds them under autocast), and the original Deformable DETR kernel design
(``benchmarks/original_design``, JIT-built on first use, float32 only) is timed as a
baseline. The backward time is that of ``out.backward(grad)`` alone (the forward graph is
kept between repeats). ``--json`` writes every number for ``benchmarks/gpu_check.py``.

    python benchmarks/ms_deform_attn.py [--device cpu|cuda|all] [--repeats N] [--threads N]
        [--dtypes fp32 fp16 bf16] [--no-baseline] [--quick] [--json results.json]
"""
import argparse
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from deformable_detr.layers import has_compiled_op, ms_deform_attn, ms_deform_attn_pytorch

LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
#: Levels of a 200x333 image: the --quick shapes, for checking the script itself.
SMALL_LEVELS = [(25, 42), (13, 21), (7, 11), (4, 6)]
SHAPES = {
    "encoder N=1": dict(N=1, Lq=None),
    "encoder N=2": dict(N=2, Lq=None),
    "decoder N=2 (Lq=300)": dict(N=2, Lq=300),
}
QUICK_SHAPES = {
    "small encoder N=1": dict(N=1, Lq=None, levels=SMALL_LEVELS),
    "small decoder N=1 (Lq=50)": dict(N=1, Lq=50, levels=SMALL_LEVELS),
}
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
IMPLS = {"compiled": ms_deform_attn, "pytorch": ms_deform_attn_pytorch}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


def make_inputs(N, Lq, device, M=8, D=32, P=4, dtype=torch.float32, levels=LEVELS):
    """Inputs laid out as the model produces them.

    Encoder (Lq None): one query per value position, its reference point at its own pixel
    centre, sampling offsets of the initial pattern (head m looks in direction 2*pi*m/M, point
    p at p + 1 pixels) plus noise of a pixel. Decoder: Lq random reference points with the
    same offsets. Attention weights: a random softmax over the L*P points of each head.
    Half-precision ``dtype``: value and weights in it, locations float32 (what autocast
    gives the op: sub-pixel positions on a 100x167 map need float32's mantissa).
    """
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(levels)
    if Lq is None:
        refs = []
        for h, w in levels:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(refs)[None].expand(N, S, 2)
        Lq = S
    else:
        ref = torch.rand(N, Lq, 2, generator=g)
    theta = torch.arange(M) * (2 * torch.pi / M)
    direction = torch.stack([theta.cos(), theta.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True)[0]
    pixels = direction[:, None, None, :] * (torch.arange(P) + 1.0)[None, None, :, None]
    pixels = pixels + torch.randn(N, Lq, M, L, P, 2, generator=g)  # [N, Lq, M, L, P, 2]
    wh = shapes.flip(-1).to(torch.float32)  # (W, H) per level
    loc = ref[:, :, None, None, None, :] + pixels / wh[None, None, None, :, None, :]
    value = torch.rand(N, S, M, D, generator=g).to(dtype)
    attn = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    half = dtype in (torch.float16, torch.bfloat16)
    out = [value, shapes, starts, loc.to(torch.float32 if half else dtype), attn.to(dtype)]
    return [t.to(device) for t in out]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn, inputs, backward):
    value, shapes, starts, loc, attn = inputs
    if not backward:
        with torch.no_grad():
            return fn(value, shapes, starts, loc, attn)
    for t in (value, loc, attn):
        t.requires_grad_(True)
        t.grad = None
    out = fn(value, shapes, starts, loc, attn)
    grad = torch.ones_like(out)
    sync(value.device.type)
    t0 = time.perf_counter()
    out.backward(grad)
    sync(value.device.type)
    return time.perf_counter() - t0


def time_pass(fn, inputs, backward, repeats, device):
    run_once(fn, inputs, backward)  # warm-up
    times = []
    for _ in range(repeats):
        if backward:
            times.append(run_once(fn, inputs, True))
        else:
            sync(device)
            t0 = time.perf_counter()
            run_once(fn, inputs, False)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(impl, shape, backward, device, threads):
    """Memory a pass adds on top of its inputs, measured in a fresh process (CPU)."""
    if device == "cuda":
        inputs = make_inputs(**ALL_SHAPES[shape], device="cuda")
        return cuda_peak_memory_mb(IMPLS[impl], inputs, backward)
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps([impl, shape, backward]),
           "--threads", str(threads)]
    return float(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(spec):
    impl, shape, backward = json.loads(spec)
    inputs = make_inputs(**ALL_SHAPES[shape], device="cpu")
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():  # RSS polled every 0.5 ms: the peak of the pass over its inputs
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_once(IMPLS[impl], inputs, backward)
    done.set()
    sampler.join()
    print((max(peak[0], _rss_bytes()) - base) / 2**20)


def run_cpu(args):
    """The CPU table: float32, compiled vs PyTorch (each timed, then its peak RSS measured in
    a fresh process)."""
    print(f"\n### CPU, {args.threads} threads (torch {torch.__version__}, float32, "
          f"median of {args.repeats})\n")
    print("| shape | pass | compiled ms | PyTorch ms | speed-up | compiled peak MiB "
          "| PyTorch peak MiB |")
    print("|---|---|---|---|---|---|---|")
    records = []
    for shape in args.shapes:
        inputs = make_inputs(**ALL_SHAPES[shape], device="cpu")
        for backward in (False, True):
            res = {}
            for impl, fn in IMPLS.items():
                reps = args.repeats if impl == "compiled" else max(2, args.repeats // 2)
                t = time_pass(fn, inputs, backward, reps, "cpu")
                mem = peak_memory_mb(impl, shape, backward, "cpu", args.threads)
                res[impl] = (t * 1e3, mem)
                records.append(dict(device="cpu", shape=shape, dtype="fp32",
                                    phase="backward" if backward else "forward", impl=impl,
                                    ms=t * 1e3, peak_mib=mem))
            c, p = res["compiled"], res["pytorch"]
            print(f"| {shape} | {'backward' if backward else 'forward'} | {c[0]:.1f} | "
                  f"{p[0]:.1f} | {p[0] / c[0]:.1f}x | {c[1]:.0f} | {p[1]:.0f} |", flush=True)
    return records


# ------------------------------------------------------------------------------------ CUDA


def cuda_time_ms(fn, inputs, backward, repeats, warmup):
    """Median milliseconds of the forward (under no_grad) or of ``out.backward(grad)`` alone,
    from CUDA events around each repeat."""
    value, shapes, starts, loc, attn = inputs
    if backward:
        leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        grad = torch.rand_like(out)

        def step():
            for t in leaves:
                t.grad = None  # each repeat assigns fresh gradients, as a training step does
            out.backward(grad, retain_graph=True)
    else:
        def step():
            with torch.no_grad():
                fn(value, shapes, starts, loc, attn)
    for _ in range(warmup):
        step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cuda_peak_memory_mb(fn, inputs, backward):
    """What a forward (no_grad), or a forward plus backward, allocates on top of its inputs:
    ``max_memory_allocated`` over the memory allocated before it."""
    value, shapes, starts, loc, attn = inputs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if backward:
        leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
        out.backward(torch.ones_like(out))
        del out, leaves
    else:
        with torch.no_grad():
            fn(value, shapes, starts, loc, attn)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel_error(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_agreement(fn, ref_fn, inputs):
    """Largest relative error (L2 norm) of fn's output and three gradients against ref_fn's,
    for the same random output gradient: a check that both compute one function."""
    results = []
    grad = None
    for f in (fn, ref_fn):
        value, shapes, starts, loc, attn = inputs
        leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
        out = f(leaves[0], shapes, starts, leaves[1], leaves[2])
        if grad is None:
            grad = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    return max(_rel_error(a, b) for a, b in zip(*results))


def with_shapes_list(fn, levels):
    """fn with the levels as Python ints (``spatial_shapes_list``) where it takes them: the
    PyTorch path would otherwise read the shapes tensor back from the device every call."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    if "spatial_shapes_list" not in params:
        return fn
    return functools.partial(fn, spatial_shapes_list=[tuple(lv) for lv in levels])


def _import_package(path: str):
    """The package in folder ``path``, imported by its location (it is not installed)."""
    import importlib.util

    name = os.path.basename(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_baseline():
    """The original-design kernels as a function, or (None, reason)."""
    try:
        original_design = _import_package(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "original_design"))
        return original_design.ms_deform_attn_original(original_design.load()), None
    except Exception as e:  # reported in the table, the other numbers still come
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


def fmt(x, spec=".2f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def run_cuda(args):
    """All (shape, dtype, pass, implementation) on CUDA; prints the tables, returns records."""
    impls = {"compiled": ms_deform_attn}
    notes = []
    if args.baseline:
        fn, err = load_baseline()
        if fn is not None:
            impls["original"] = fn
        else:
            notes.append(f"original-design baseline unavailable: {err}")
    impls["pytorch"] = ms_deform_attn_pytorch
    name = torch.cuda.get_device_name()
    print(f"\n### {name} (torch {torch.__version__}, CUDA {torch.version.cuda}, CUDA events, "
          f"median of {args.repeats} after {args.warmup} warm-up runs)\n")
    records, errors = [], []
    for shape in args.shapes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            inputs = make_inputs(**ALL_SHAPES[shape], device="cuda", dtype=dtype)
            levels = ALL_SHAPES[shape].get("levels", LEVELS)
            for impl, fn in impls.items():
                if impl == "original" and dtype not in (torch.float32, torch.float64):
                    continue  # the original design has no half-precision kernels
                fn = with_shapes_list(fn, levels)
                rec = dict(device="cuda", shape=shape, dtype=dname, impl=impl)
                for backward in (False, True):
                    phase = "backward" if backward else "forward"
                    try:
                        ms = cuda_time_ms(fn, inputs, backward, args.repeats, args.warmup)
                        mem = cuda_peak_memory_mb(fn, inputs, backward)
                        records.append(dict(rec, phase=phase, ms=ms, peak_mib=mem))
                    except Exception as e:  # e.g. out of memory: the other rows still come
                        errors.append(dict(rec, phase=phase,
                                           error=f"{type(e).__name__}: {str(e)[:300]}"))
                        torch.cuda.empty_cache()
                if impl == "original":
                    try:
                        err = cuda_agreement(fn, ms_deform_attn, inputs)
                        records.append(dict(rec, phase="agreement", rel_error=err))
                    except Exception as e:
                        errors.append(dict(rec, phase="agreement",
                                           error=f"{type(e).__name__}: {str(e)[:300]}"))
            del inputs
            torch.cuda.empty_cache()
    print_cuda_tables(records, errors, notes)
    return records, errors, notes


def _lookup(records, **key):
    for r in records:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def print_cuda_tables(records, errors, notes):
    print("| shape | dtype | pass | ours ms | original ms | PyTorch ms | original / ours "
          "| PyTorch / ours | ours MiB | original MiB | PyTorch MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    seen = []
    for r in records:
        key = (r["shape"], r["dtype"], r["phase"])
        if r["phase"] == "agreement" or key in seen:
            continue
        seen.append(key)
        row = {i: _lookup(records, shape=key[0], dtype=key[1], phase=key[2], impl=i)
               for i in ("compiled", "original", "pytorch")}
        ms = {i: (x["ms"] if x else None) for i, x in row.items()}
        mem = {i: (x["peak_mib"] if x else None) for i, x in row.items()}
        ours = ms["compiled"]
        ratio = {i: (ms[i] / ours if ms[i] is not None and ours else None)
                 for i in ("original", "pytorch")}
        print(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(ours, '.3f')} | "
              f"{fmt(ms['original'], '.3f')} | {fmt(ms['pytorch'], '.3f')} | "
              f"{fmt(ratio['original'], '.2f', 'x')} | {fmt(ratio['pytorch'], '.2f', 'x')} | "
              f"{fmt(mem['compiled'], '.0f')} | {fmt(mem['original'], '.0f')} | "
              f"{fmt(mem['pytorch'], '.0f')} |")
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    rows = []
    for shape in shapes:
        for phase in ("forward", "backward"):
            f32 = _lookup(records, shape=shape, dtype="fp32", phase=phase, impl="compiled")
            for half in ("bf16", "fp16"):
                h = _lookup(records, shape=shape, dtype=half, phase=phase, impl="compiled")
                if f32 and h:
                    rows.append(f"| {shape} | {phase} | {half} | {f32['ms']:.3f} | "
                                f"{h['ms']:.3f} | {f32['ms'] / h['ms']:.2f}x |")
    if rows:
        print("\nOur kernels in half precision against float32 (> 1: half is faster):\n")
        print("| shape | pass | dtype | fp32 ms | half ms | fp32 / half |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
    agreement = [r for r in records if r["phase"] == "agreement"]
    if agreement:
        print("\nOriginal design against ours (largest relative L2 error of the output and "
              "the three gradients): " + ", ".join(
                  f"{r['shape']} {r['dtype']} {r['rel_error']:.1e}" for r in agreement))
    for e in errors:
        print(f"\nerror: {e['shape']} {e['dtype']} {e['impl']} {e['phase']}: {e['error']}")
    for n in notes:
        print(f"\nnote: {n}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs (default: 5 on the CPU, 25 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (CUDA)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shapes", nargs="*", default=None, choices=list(ALL_SHAPES),
                        help="default: the encoder and decoder shapes (--quick: small ones)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (levels of a 200x333 image), for a fast check")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"],
                        choices=list(DTYPES), help="CUDA dtypes (the CPU table is float32)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="time the original-design kernels too (CUDA; JIT-built)")
    parser.add_argument("--json", help="write all measurements to this file")
    parser.add_argument("--_memory-child", dest="memory_child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.shapes is None:
        args.shapes = list(QUICK_SHAPES if args.quick else SHAPES)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    out = dict(torch=torch.__version__, cuda=torch.version.cuda, records=[], errors=[],
               notes=[])
    for device in devices:
        if not has_compiled_op(device):
            print(f"no compiled kernel for {device}; skipping")
            out["notes"].append(f"no compiled kernel for {device}")
            continue
        if device == "cpu":
            args_cpu = argparse.Namespace(**vars(args))
            args_cpu.repeats = args.repeats or 5
            out["records"] += run_cpu(args_cpu)
        else:
            args_cuda = argparse.Namespace(**vars(args))
            args_cuda.repeats = args.repeats or 25
            out["device_name"] = torch.cuda.get_device_name()
            records, errors, notes = run_cuda(args_cuda)
            out["records"] += records
            out["errors"] += errors
            out["notes"] += notes
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time the compiled multi-scale deformable attention op against the PyTorch (grid_sample) path.

Shapes: the encoder of one 800x1333 image (levels 100x167, 50x84, 25x42, 13x21; Lq = S =
22,223; M=8, D=32, L=4, P=4) at batch 1 and 2, and the decoder (Lq=300) at batch 2. Prints
median forward and backward times, their ratios, and the peak memory each pass adds on top
of its inputs (CPU: peak RSS, polled, of a fresh subprocess; CUDA: max_memory_allocated), as a
markdown table. Both implementations are measured in the same run.

    python benchmarks/ms_deform_attn.py [--device cpu|cuda|all] [--repeats 5] [--threads N]
"""
import argparse
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
SHAPES = {
    "encoder N=1": dict(N=1, Lq=None),
    "encoder N=2": dict(N=2, Lq=None),
    "decoder N=2 (Lq=300)": dict(N=2, Lq=300),
}
IMPLS = {"compiled": ms_deform_attn, "pytorch": ms_deform_attn_pytorch}


def make_inputs(N, Lq, device, M=8, D=32, P=4, dtype=torch.float32):
    """Inputs laid out as the model produces them.

    Encoder (Lq None): one query per value position, its reference point at its own pixel
    centre, sampling offsets of the initial pattern (head m looks in direction 2*pi*m/M, point
    p at p + 1 pixels) plus noise of a pixel. Decoder: Lq random reference points with the
    same offsets. Attention weights: a random softmax over the L*P points of each head.
    """
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(LEVELS)
    if Lq is None:
        refs = []
        for h, w in LEVELS:
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
    value = torch.rand(N, S, M, D, generator=g, dtype=dtype)
    attn = torch.randn(N, Lq, M, L * P, generator=g).softmax(-1).view(N, Lq, M, L, P)
    out = [value, shapes, starts, loc.to(dtype), attn.to(dtype)]
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
    """Memory a pass adds on top of its inputs, measured in a fresh process."""
    if device == "cuda":
        inputs = make_inputs(**SHAPES[shape], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(IMPLS[impl], inputs, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps([impl, shape, backward]),
           "--threads", str(threads)]
    return float(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(spec):
    impl, shape, backward = json.loads(spec)
    inputs = make_inputs(**SHAPES[shape], device="cpu")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--_memory-child", dest="memory_child")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    for device in devices:
        if not has_compiled_op(device):
            print(f"no compiled kernel for {device}; skipping")
            continue
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
        print(f"\n### {name} (torch {torch.__version__}, float32, median of {args.repeats})\n")
        print("| shape | pass | compiled ms | PyTorch ms | speed-up | compiled peak MiB "
              "| PyTorch peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes:
            inputs = make_inputs(**SHAPES[shape], device=device)
            for backward in (False, True):
                res = {}
                for impl, fn in IMPLS.items():
                    reps = args.repeats if impl == "compiled" or device == "cuda" else max(
                        2, args.repeats // 2)
                    t = time_pass(fn, inputs, backward, reps, device)
                    mem = peak_memory_mb(impl, shape, backward, device, args.threads)
                    res[impl] = (t * 1e3, mem)
                c, p = res["compiled"], res["pytorch"]
                print(f"| {shape} | {'backward' if backward else 'forward'} | {c[0]:.1f} | "
                      f"{p[0]:.1f} | {p[0] / c[0]:.1f}x | {c[1]:.0f} | {p[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()

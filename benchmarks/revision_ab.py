#!/usr/bin/env python
"""Time a workload with the working tree's code against the same workload with the code of
another git revision, interleaved in one run (an A/B test of a change).

Machines differ by 2x from day to day, so a speed-up is only shown by a ratio measured in
the same run, under the same load. This script runs each side in its own child process
(``PYTHONPATH=<tree>/projects``, so ``import deformable_detr`` is that tree's package, and
the tree as working directory), warms both up, then times chunks of ``--iterations``
iterations: one chunk on each side per repeat, the side that goes first alternating from
repeat to repeat, and only one side computing at a time, so that a change of load hits
both alike.

The sides:

- new: the repository this script is in, as it is on disk (uncommitted edits included);
- baseline: ``--baseline REV``, checked out with ``git worktree add --detach`` under
  ``output/revision_ab/<sha>`` (kept for later runs), or ``--baseline-tree PATH``, an
  existing checkout. Its compiled extension is the working tree's ``_C*.so`` copied over when
  ``csrc/`` and ``setup.py`` are the same in REV as in the working tree, else built there
  with ``FORCE_CUDA=0 python setup.py build_ext --inplace`` (a few minutes, once). An
  existing checkout that already has its ``_C*.so`` keeps it.

``--opts KEY VALUE ...`` overrides the config of the new side, ``--baseline-opts`` that of the
baseline: with ``--baseline HEAD`` this times a recipe change on the same code (e.g.
``--opts MODEL.DEFORMABLE_DETR.ENC_LAYERS 1``), and the demo estimates below use the
overridden ``SOLVER.MAX_ITER``.

Workloads (each side reads the config files of its own tree, then its overrides):

- ``demo``: one training iteration of the CPU demo, ``configs/demo/deformable_detr_shapes.yaml``
  on the synthetic ``shapes`` dataset, as detectron2's ``SimpleTrainer`` runs it: the next
  batch of ``Trainer.build_train_loader(cfg)`` (real data loading with the config's
  ``DATALOADER.NUM_WORKERS``), forward with losses, their sum, ``zero_grad``, backward and
  the step of ``Trainer.build_optimizer`` (no LR scheduler, no metrics); with
  ``SOLVER.AMP.ENABLED True`` the forward and the losses under bfloat16 CPU autocast, as the
  trainer runs them (``deformable_detr.engine.cpu_autocast``). The dataset is
  generated once (by the working tree's code) under ``$DETECTRON2_DATASETS/shapes``, else
  ``datasets/shapes`` of the working tree. Also printed: each side's ``SOLVER.MAX_ITER`` and
  ``IMS_PER_BATCH``, the demo's training time estimated as MAX_ITER x median s/iter, and the
  new demo's training time on the slow reference machine (0.65 s per baseline iteration).
- ``infer``: ``configs/deformable_detr_R_50_50ep.yaml`` with random weights
  (``MODEL.WEIGHTS ""``, ``torch.manual_seed(0)`` before ``build_model``, so both sides have
  the same weights as long as the order of parameter creation is unchanged) on the CPU,
  ``eval()`` and ``torch.no_grad()``: ``model([{"image": uint8 [3, H, W]}])`` on one seeded
  random image of ``--size H W``. The last outputs of both sides are compared: the largest
  absolute differences of boxes and scores, and whether the classes are equal (for a pure
  speed-up: differences at float32 rounding, classes equal).
- ``train``: the same model and image with 5 seeded random target boxes, one training
  iteration at batch 1: forward with losses, backward, ``Trainer.build_optimizer`` step.

Each side turns on its tree's CPU memory cache (``deformable_detr.utils.cpu_memory``) where
it has one, as that tree's tools, predictor and trainer do; the table prints whether it is on.

Reading the table: seconds per iteration (median and minimum over the repeats of
``chunk time / iterations``) and ``ratio = baseline median / new median``: above 1 the new
code is faster (1.25 = the baseline takes 25 % longer). The first chunks after the warm-up
of ``demo`` include a little data loading that the idle side's loader workers did ahead.

Examples (run it niced on a shared machine)::

    nice -n 19 python benchmarks/revision_ab.py --baseline HEAD --workload demo
    nice -n 19 python benchmarks/revision_ab.py --baseline main~3 --workload infer train \\
        --size 800 1333 --repeats 5 --json output/ab.json
    nice -n 19 python benchmarks/revision_ab.py --baseline-tree ../old-checkout --workload infer
    python benchmarks/revision_ab.py --baseline HEAD --opts SOLVER.IMS_PER_BATCH 4

    python benchmarks/revision_ab.py --baseline REV [--baseline-tree PATH]
        [--workload demo|infer|train ...] [--repeats 5] [--iterations K] [--warmup N]
        [--threads 2] [--size 800 1333] [--opts KEY VALUE ...] [--baseline-opts KEY VALUE ...]
        [--json out.json]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("projects") / "deformable_detr"
CACHE_DIR = ROOT / "output" / "revision_ab"
WORKLOADS = ("demo", "infer", "train")
#: Iterations per timed chunk and warm-up iterations, per workload.
DEFAULT_ITERATIONS = {"demo": 10, "infer": 1, "train": 1}
DEFAULT_WARMUP = {"demo": 2, "infer": 1, "train": 1}
CONFIGS = {
    "demo": "configs/demo/deformable_detr_shapes.yaml",
    "infer": "configs/deformable_detr_R_50_50ep.yaml",
    "train": "configs/deformable_detr_R_50_50ep.yaml",
}
#: Seconds per baseline demo iteration on the slow reference machine.
REFERENCE_S_PER_ITER = 0.65
#: Lines of a failed child's (or build's) stderr to print.
TAIL_LINES = 40

# Runs in each side's child process, with that tree's package on PYTHONPATH. It may only use
# what both old and new trees have: get_cfg, add_deformable_detr_config, build_model,
# Trainer.build_model/build_optimizer/build_train_loader, ensure/register_shapes_dataset.
CHILD_CODE = r'''
import json, os, sys, time
args = json.loads(sys.argv[1])
# The protocol owns the real stdout; anything else printed (C code, loader workers) goes to
# stderr.
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch
torch.set_num_threads(args["threads"])
import deformable_detr
tree = os.path.realpath(args["tree"])
where = os.path.realpath(deformable_detr.__file__)
print("revision_ab: deformable_detr from", where, file=sys.stderr, flush=True)
if not where.startswith(tree + os.sep):
    sys.exit("revision_ab: deformable_detr resolves to %s, not under %s" % (where, tree))
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.env import seed_all_rng
from deformable_detr import add_deformable_detr_config
from deformable_detr.engine import Trainer

cfg = get_cfg()
add_deformable_detr_config(cfg)
cfg.merge_from_file(os.path.join(tree, args["config"]))
cfg.merge_from_list(args["opts"])
workload = args["workload"]
info = {"file": where, "torch": torch.__version__, "threads": torch.get_num_threads()}
# The tree's CPU memory set-up where it has one, as its tools and predictor use it.
try:
    from deformable_detr.utils.cpu_memory import enable_cpu_memory_cache
except ImportError:
    info["cpu_memory_cache"] = None
else:
    info["cpu_memory_cache"] = enable_cpu_memory_cache()

if workload == "demo":
    from deformable_detr.data import register_shapes_dataset
    register_shapes_dataset(args["shapes_root"])
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)
    batches = iter(Trainer.build_train_loader(cfg))
    info.update(max_iter=cfg.SOLVER.MAX_ITER, ims_per_batch=cfg.SOLVER.IMS_PER_BATCH,
                num_workers=cfg.DATALOADER.NUM_WORKERS)

    amp = cfg.SOLVER.AMP.ENABLED

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses = sum(model(next(batches)).values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
else:
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    h, w = args["size"]
    g = torch.Generator().manual_seed(0)
    x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
    last = []
    if workload == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                last[:] = model([x])
    else:
        model.train()
        n = 5
        xy0 = torch.rand(n, 2, generator=g) * 0.6
        wh = 0.1 + torch.rand(n, 2, generator=g) * 0.3
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy0, xy0 + wh], 1) * torch.tensor([w, h, w, h]))
        inst.gt_classes = torch.randint(0, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, (n,),
                                        generator=g)
        x["instances"] = inst
        optimizer = Trainer.build_optimizer(cfg, model)

        def step():
            losses = sum(model([x]).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()

for _ in range(args["warmup"]):
    step()
proto.write("ready " + json.dumps(info) + "\n")
for line in sys.stdin:
    cmd = line.split()
    if cmd and cmd[0] == "run":
        t0 = time.perf_counter()
        for _ in range(int(cmd[1])):
            step()
        proto.write("%r\n" % (time.perf_counter() - t0))
    elif cmd == ["quit"]:
        break
if workload == "infer" and args.get("outputs"):
    import numpy as np
    inst = last[0]["instances"]
    np.savez(args["outputs"], boxes=inst.pred_boxes.tensor.numpy(),
             scores=inst.scores.numpy(), classes=inst.pred_classes.numpy())
'''


class BenchmarkError(Exception):
    """A failure to report in one line (plus, where given, a child's stderr tail)."""


def git(*args, cwd=ROOT, check=True):
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise BenchmarkError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc


def tail(path, lines=TAIL_LINES):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def describe_tree(tree):
    """'<short sha>' or '<short sha> + uncommitted changes'."""
    sha = git("rev-parse", "--short", "HEAD", cwd=tree).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=tree).stdout.strip()
    return sha + (" + uncommitted changes" if dirty else "")


def compiled_extensions(tree):
    return sorted((Path(tree) / PACKAGE).glob("_C*.so"))


def resolve_baseline(args):
    """Returns (tree path, full sha of the baseline revision), checking out REV if needed."""
    sha = None
    if args.baseline is not None:
        proc = git("rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}",
                   check=False)
        if proc.returncode != 0:
            raise BenchmarkError(f"unknown revision {args.baseline!r} in {ROOT}")
        sha = proc.stdout.strip()
    if args.baseline_tree is not None:
        tree = Path(args.baseline_tree).resolve()
        if not (tree / PACKAGE / "__init__.py").is_file():
            raise BenchmarkError(f"--baseline-tree {tree} has no {PACKAGE}/__init__.py")
        head = git("rev-parse", "HEAD", cwd=tree).stdout.strip()
        if sha is not None and head != sha:
            raise BenchmarkError(f"--baseline-tree {tree} is at {head[:12]}, not at "
                                 f"--baseline {args.baseline} ({sha[:12]})")
        return tree, head
    tree = CACHE_DIR / sha
    if tree.exists():
        proc = git("rev-parse", "HEAD", cwd=tree, check=False)
        if proc.returncode != 0 or proc.stdout.strip() != sha:
            raise BenchmarkError(f"{tree} exists but is not a checkout of {sha[:12]}; remove it "
                                 f"(git worktree remove --force {tree}; git worktree prune)")
        print(f"baseline: reusing the checkout {tree}")
    else:
        print(f"baseline: git worktree add --detach {tree} {sha[:12]}")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(tree), sha)
    return tree, sha


def prepare_extension(tree, sha, existing_checkout):
    """Give the baseline tree a compiled extension for revision ``sha``."""
    have = compiled_extensions(tree)
    if existing_checkout and have:
        print(f"baseline: using its own {have[0].name}")
        return
    same = git("diff", "--quiet", sha, "--", "csrc", "setup.py", check=False).returncode
    if same not in (0, 1):
        raise BenchmarkError(f"git diff {sha[:12]} -- csrc setup.py failed in {ROOT}")
    if same == 0:
        ours = compiled_extensions(ROOT)
        if not ours:
            raise BenchmarkError(f"the working tree has no compiled extension in "
                                 f"{ROOT / PACKAGE}; build it first: "
                                 f"python setup.py build_ext --inplace")
        for so in have:
            so.unlink()
        for so in ours:
            shutil.copy2(so, tree / PACKAGE / so.name)
        print(f"baseline: csrc/ and setup.py unchanged since {sha[:12]}: copied "
              f"{', '.join(so.name for so in ours)}")
        return
    stamp = tree / "build" / "revision_ab.built"
    if have and stamp.is_file():
        print(f"baseline: csrc/ or setup.py changed since {sha[:12]}: reusing the extension "
              f"built earlier in {tree}")
        return
    log = tree / "build" / "revision_ab.build.log"
    log.parent.mkdir(exist_ok=True)
    print(f"baseline: csrc/ or setup.py changed since {sha[:12]}: building the extension in "
          f"{tree} (FORCE_CUDA=0 python setup.py build_ext --inplace, log {log}) ...",
          flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                              env={**os.environ, "FORCE_CUDA": "0"}, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not compiled_extensions(tree):
        raise BenchmarkError(f"building the baseline extension failed (exit {proc.returncode});"
                             f" the end of {log}:\n{tail(log)}")
    stamp.touch()
    print(f"baseline: built in {time.perf_counter() - t0:.0f} s")


def prepare_shapes(root, threads):
    """Generate the shapes dataset under ``root`` once, with the working tree's code."""
    code = ("import sys\nfrom deformable_detr.data import ensure_shapes_dataset\n"
            "ensure_shapes_dataset(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT,
                          env=child_env(ROOT, threads, root.parent), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()[-TAIL_LINES:]
        raise BenchmarkError(f"generating the shapes dataset in {root} failed:\n"
                             + "\n".join(lines))


def child_env(tree, threads, datasets=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(tree) / "projects")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = str(datasets)
    return env


class Child:
    """One side: a child process that answers ``run K`` with the seconds K iterations took."""

    def __init__(self, name, tree, workload, args, tmpdir, shapes_root):
        self.name = name
        self.stderr_path = Path(tmpdir) / f"{name}.stderr"
        self.outputs = Path(tmpdir) / f"{name}.npz" if workload == "infer" else None
        spec = {
            "tree": str(tree), "workload": workload, "config": CONFIGS[workload],
            "threads": args.threads, "warmup": args.warmup[workload], "size": args.size,
            "shapes_root": str(shapes_root) if shapes_root else None,
            "outputs": str(self.outputs) if self.outputs else None,
            "opts": args.opts if name == "new" else args.baseline_opts,
        }
        if not (Path(tree) / CONFIGS[workload]).is_file():
            raise BenchmarkError(f"{name}: {Path(tree) / CONFIGS[workload]} does not exist")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, json.dumps(spec)], cwd=tree,
            env=child_env(tree, args.threads, shapes_root.parent if shapes_root else None),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            bufsize=1)

    def _read(self, what):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise BenchmarkError(f"the {self.name} child exited (code {self.proc.returncode}) "
                                 f"while {what}; the end of its stderr:\n"
                                 f"{tail(self.stderr_path)}")
        return line.strip()

    def wait_ready(self):
        line = self._read("setting up")
        if not line.startswith("ready "):
            raise BenchmarkError(f"the {self.name} child said {line!r} instead of 'ready'")
        self.info = json.loads(line[len("ready "):])

    def run(self, iterations):
        self.proc.stdin.write(f"run {iterations}\n")
        self.proc.stdin.flush()
        return float(self._read(f"running {iterations} iterations"))

    def quit(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        if self.proc.wait() != 0:
            raise BenchmarkError(f"the {self.name} child exited with code "
                                 f"{self.proc.returncode}; the end of its stderr:\n"
                                 f"{tail(self.stderr_path)}")
        self._stderr.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def compare_outputs(base_path, new_path):
    import numpy as np

    base, new = np.load(base_path), np.load(new_path)
    if base["boxes"].shape != new["boxes"].shape:
        return {"same_shape": False, "num_base": len(base["scores"]),
                "num_new": len(new["scores"])}
    return {
        "same_shape": True,
        "num": len(new["scores"]),
        "max_abs_diff_boxes": float(np.abs(base["boxes"] - new["boxes"]).max(initial=0.0)),
        "max_abs_diff_scores": float(np.abs(base["scores"] - new["scores"]).max(initial=0.0)),
        "classes_equal": bool((base["classes"] == new["classes"]).all()),
    }


def run_workload(workload, trees, args, shapes_root):
    iterations = args.iterations or DEFAULT_ITERATIONS[workload]
    print(f"\n== {workload}: {args.repeats} repeats x {iterations} iterations per side, "
          f"{args.threads} threads" + ("" if workload == "demo" else f", size {args.size}"))
    with tempfile.TemporaryDirectory(prefix="revision_ab_") as tmpdir:
        children = {}
        try:
            for name in ("baseline", "new"):
                children[name] = Child(name, trees[name], workload, args, tmpdir,
                                       shapes_root if workload == "demo" else None)
            for child in children.values():
                child.wait_ready()
                print(f"  {child.name}: deformable_detr from {child.info['file']}, CPU memory "
                      f"cache: {child.info.get('cpu_memory_cache')}", flush=True)
            times = {name: [] for name in children}
            order = ["baseline", "new"]
            for r in range(args.repeats):
                for name in order:
                    times[name].append(children[name].run(iterations) / iterations)
                print(f"  repeat {r + 1}/{args.repeats}: "
                      + ", ".join(f"{n} {times[n][-1]:.4f} s/iter" for n in ("baseline", "new")),
                      flush=True)
                order.reverse()
            for child in children.values():
                child.quit()
        finally:
            for child in children.values():
                child.kill()
        result = {"iterations": iterations, "repeats": args.repeats, "sides": {}}
        for name, child in children.items():
            result["sides"][name] = {
                "tree": str(trees[name]), "per_iter_s": times[name],
                "median_s": statistics.median(times[name]), "min_s": min(times[name]),
                **child.info,
            }
        sides = result["sides"]
        result["ratio"] = sides["baseline"]["median_s"] / sides["new"]["median_s"]
        if workload == "infer":
            result["outputs"] = compare_outputs(children["baseline"].outputs,
                                                children["new"].outputs)
    if workload == "demo":
        base, new = sides["baseline"], sides["new"]
        for s in (base, new):
            s["demo_train_s"] = s["max_iter"] * s["median_s"]
        result["demo_train_ratio"] = base["demo_train_s"] / new["demo_train_s"]
        result["reference_new_demo_train_s"] = (
            new["max_iter"] * REFERENCE_S_PER_ITER * new["median_s"] / base["median_s"])
    print_table(workload, result)
    return result


def print_table(workload, result):
    sides = result["sides"]
    print(f"\n{workload:<8} {'median s/iter':>14} {'min s/iter':>11}   ratio baseline/new")
    for name in ("baseline", "new"):
        s = sides[name]
        ratio = f"{result['ratio']:.3f}" if name == "new" else ""
        print(f"{name:<8} {s['median_s']:>14.4f} {s['min_s']:>11.4f}   {ratio}")
    print(f"(ratio > 1: the new code is faster; here the baseline takes {result['ratio']:.3f}x "
          f"the new time per iteration)")
    if workload == "infer":
        out = result["outputs"]
        if out["same_shape"]:
            print(f"outputs ({out['num']} detections): max |diff| boxes "
                  f"{out['max_abs_diff_boxes']:.3g} px, scores {out['max_abs_diff_scores']:.3g}, "
                  f"classes {'equal' if out['classes_equal'] else 'DIFFERENT'}")
        else:
            print(f"outputs: DIFFERENT numbers of detections ({out['num_base']} baseline, "
                  f"{out['num_new']} new)")
    if workload == "demo":
        base, new = sides["baseline"], sides["new"]
        for name, s in (("baseline", base), ("new", new)):
            print(f"{name}: SOLVER.MAX_ITER {s['max_iter']}, IMS_PER_BATCH {s['ims_per_batch']}, "
                  f"NUM_WORKERS {s['num_workers']}: demo training ~ {s['demo_train_s']:.0f} s "
                  f"({s['demo_train_s'] / 60:.1f} min) here")
        print(f"demo training time ratio baseline/new: {result['demo_train_ratio']:.3f}")
        reference = result["reference_new_demo_train_s"]
        t_ratio = new["median_s"] / base["median_s"]
        print(f"at {REFERENCE_S_PER_ITER} s per baseline iteration: new demo training = "
              f"{new['max_iter']} x {REFERENCE_S_PER_ITER} x {t_ratio:.3f} = {reference:.0f} s "
              f"({reference / 60:.1f} min)")

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV",
                        help="git revision to compare against (checked out under "
                             "output/revision_ab/)")
    parser.add_argument("--baseline-tree", metavar="PATH",
                        help="use this existing checkout as the baseline instead")
    parser.add_argument("--workload", nargs="+", choices=WORKLOADS, default=["demo"],
                        help="one or more, run one after another (default: demo)")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks per side (default: 5)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per chunk (default: demo 10, infer 1, train 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations before the first chunk (default: demo 2, "
                             "infer 1, train 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per side (default: 2)")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                        help="image size of infer and train (default: 800 1333)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the new side")
    parser.add_argument("--baseline-opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the baseline side")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)
    for name in ("opts", "baseline_opts"):
        if len(getattr(args, name)) % 2:
            parser.error(f"--{name.replace('_', '-')} takes KEY VALUE pairs, got "
                         f"{getattr(args, name)}")
    if args.baseline is None and args.baseline_tree is None:
        parser.error("give --baseline REV or --baseline-tree PATH")
    for name in ("repeats", "iterations", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}")
    if min(args.size) < 32:
        parser.error("--size must be at least 32 x 32")
    args.warmup = {w: DEFAULT_WARMUP[w] if args.warmup is None else args.warmup
                   for w in WORKLOADS}
    args.workload = list(dict.fromkeys(args.workload))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        base_tree, sha = resolve_baseline(args)
        prepare_extension(base_tree, sha, existing_checkout=args.baseline_tree is not None)
        trees = {"baseline": base_tree, "new": ROOT}
        shapes_root = None
        if "demo" in args.workload:
            datasets = os.environ.get("DETECTRON2_DATASETS") or str(ROOT / "datasets")
            shapes_root = (Path(datasets) / "shapes").resolve()
            prepare_shapes(shapes_root, args.threads)
        print(f"baseline: {base_tree} at {describe_tree(base_tree)}")
        print(f"new:      {ROOT} at {describe_tree(ROOT)}")
        for name, opts in (("baseline", args.baseline_opts), ("new", args.opts)):
            if opts:
                print(f"{name} config overrides: {' '.join(opts)}")
        results = {
            "baseline": {"tree": str(base_tree), "sha": sha,
                         "describe": describe_tree(base_tree)},
            "new": {"tree": str(ROOT), "describe": describe_tree(ROOT)},
            "threads": args.threads, "size": args.size,
            "opts": {"new": args.opts, "baseline": args.baseline_opts},
            "shapes_root": str(shapes_root) if shapes_root else None, "workloads": {},
        }
        for workload in args.workload:
            results["workloads"][workload] = run_workload(workload, trees, args, shapes_root)
    except BenchmarkError as e:
        print(f"revision_ab: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""``make gpu-check``: build for the local GPU, run the CUDA tests and benchmarks, write a report.

Stages, each in a subprocess with a time limit (the report is rewritten after each, so a run
cut short still leaves one):

1. environment: no GPU (``torch.cuda.is_available()`` false or no ``nvidia-smi``) prints why
   and exits with status 2 before anything is built;
2. dependencies: detectron2 importable, else installed from a wheelhouse (``--wheelhouse``,
   made beforehand with ``--make-wheelhouse`` on a machine with network access) into the
   output folder; without it the model-level stages are skipped and the op-level ones run
   with ``deformable_detr`` imported without its ``__init__`` (which imports detectron2);
3. build: the extension with CUDA kernels for this GPU's architecture only
   (``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<capability> MAX_JOBS=<cores>``): through
   ``make .venv/.build`` when run from the project's venv, else ``setup.py build_ext
   --inplace`` with this Python (a GPU machine's preinstalled PyTorch); the original-design
   baseline kernels (``benchmarks/original_design``) are JIT-built meanwhile;
4. tests: the CUDA cases of tests/test_ms_deform_attn.py and tests/test_mixed_precision.py
   (``-k cuda``) and all of tests/test_gpu.py;
5. op benchmark: ``benchmarks/ms_deform_attn.py --device cuda`` (ours, original design,
   PyTorch path; fp32/fp16/bf16);
6. model benchmark: ``benchmarks/model.py --device cuda`` (800x1333, inference at batch 1
   and 4, training at batch 4, float32 and AMP float16).

The report (``--report``, default ``output/gpu_check/gpu_check_report.md``; copied with the
logs to ``$OUT`` when that is set) has the device, versions, build, test summary, both
benchmark tables and the goals (encoder shape: forward >= 2x and backward >= 3x faster than
the original design, bf16 >= 1.5x fp32), each met or not. Exit status: 0 all stages ran and
every test passed (goals are reported, not enforced), 1 otherwise, 2 no GPU. docs/gpu_check.md
has the details.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
# Running this file first (runpy) registers the bare package in op-only mode.
GPU_CHECK = os.path.abspath(__file__)
EXIT_NO_GPU = 2
#: Environment variable that makes this module, when imported (as a pytest plugin or by a
#: child process), register ``deformable_detr`` without running its ``__init__``.
OP_ONLY_ENV = "GPU_CHECK_OP_ONLY"
#: Python packages detectron2 0.6 (and this project) need that a GPU machine's stock PyTorch
#: image may lack; ``--make-wheelhouse`` fetches them (the rest, e.g. numpy, matplotlib,
#: pyyaml, tabulate, tqdm, scipy, opencv, is expected there).
WHEEL_PACKAGES = ["fvcore", "iopath", "yacs", "termcolor", "omegaconf", "hydra-core",
                  "antlr4-python3-runtime"]
BINARY_PACKAGES = ["pycocotools"]
#: Per-stage time limits in seconds, each also capped by what is left of --budget.
STAGE_LIMITS = {"deps": 120, "build": 360, "tests": 240, "op-bench": 150, "model-bench": 210}
#: What a run leaves in the output folder besides the report, most useful first ($OUT gets
#: the report and the first 7 that exist).
RESULT_FILES = ["op_bench.json", "model_bench.json", "tests.log", "build.log", "op_bench.log",
                "model_bench.log", "baseline_build.log", "deps.log"]
#: Goals at the encoder shape: (label, what is compared, threshold).
GOALS = [
    ("forward >= 2x faster than the original design (fp32)", "original", "forward", 2.0),
    ("backward >= 3x faster than the original design (fp32)", "original", "backward", 3.0),
    ("bf16 forward >= 1.5x faster than fp32", "bf16", "forward", 1.5),
    ("bf16 backward >= 1.5x faster than fp32", "bf16", "backward", 1.5),
]


def install_op_only_stub() -> None:
    """Register the package ``deformable_detr`` as a bare module over its folder, so that
    ``deformable_detr._C`` and ``deformable_detr.layers`` import without the package's
    ``__init__`` (it imports the model, hence detectron2)."""
    import importlib.util
    import types

    if "deformable_detr" in sys.modules:
        return
    spec = importlib.util.find_spec("deformable_detr")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("deformable_detr")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["deformable_detr"] = pkg


if os.environ.get(OP_ONLY_ENV) == "1":
    install_op_only_stub()


# ------------------------------------------------------------------------------- helpers


class Budget:
    """Wall-clock budget of the whole run; each stage gets min(its limit, what is left)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def for_stage(self, name: str) -> float:
        return max(0.0, min(STAGE_LIMITS.get(name, 120), self.left()))


def run_logged(cmd, log_path, timeout, env=None, cwd=ROOT):
    """Run cmd with stdout and stderr into log_path; returns (returncode or None on timeout,
    seconds). A command that outlives ``timeout`` is killed with its whole process group."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[gpu-check] killed after {timeout:.0f} s (time limit)\n")
            rc = None
    return rc, time.monotonic() - start


def tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def shown(path):
    """A path relative to the checkout when inside it (shorter in the report)."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def say(msg):
    print(f"[gpu-check] {msg}", flush=True)


# ------------------------------------------------------------------------------- the run


class GpuCheck:
    def __init__(self, args):
        self.args = args
        self.out_dir = os.path.abspath(args.output)
        os.makedirs(self.out_dir, exist_ok=True)
        self.report_path = os.path.abspath(args.report or os.path.join(self.out_dir,
                                                                       "gpu_check_report.md"))
        self.budget = Budget(args.budget)
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.env_info = {}
        self.stages = []  # (name, status, seconds, detail)
        self.sections = {}  # title -> markdown
        self.op_only = False
        self.op_only_reason = ""
        self.child_env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.logs = []
        self.baseline_ok = True  # until its build says otherwise
        for name in RESULT_FILES + ["pytest.xml"]:  # nothing of an earlier run left to mislead
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)

    # --------------------------------------------------------------------------- report

    def log_path(self, name):
        path = os.path.join(self.out_dir, name)
        if path not in self.logs:
            self.logs.append(path)
            if os.path.exists(path):
                os.remove(path)
        return path

    def stage(self, name, status, seconds, detail=""):
        self.stages.append((name, status, seconds, detail))
        say(f"{name}: {status} ({seconds:.0f} s){' - ' + detail if detail else ''}")
        self.write_report()

    def write_report(self):
        e = self.env_info
        lines = ["# GPU check report", "",
                 f"Started {self.started}; written {time.strftime('%H:%M:%S')}. "
                 "Produced by `make gpu-check` (benchmarks/gpu_check.py, docs/gpu_check.md).",
                 "", "## Environment", ""]
        for key in ("device", "capability", "memory", "driver", "torch", "torch CUDA", "nvcc",
                    "python", "cpus", "build arch", "build", "detectron2"):
            if key in e:
                lines.append(f"- {key}: {e[key]}")
        if self.op_only:
            lines.append(f"- **model-level stages skipped**: {self.op_only_reason}")
        lines += ["", "## Stages", "", "| stage | status | seconds | detail |",
                  "|---|---|---|---|"]
        for name, status, seconds, detail in self.stages:
            lines.append(f"| {name} | {status} | {seconds:.0f} | {detail} |")
        order = ["Goals", "Tests", "Op benchmark", "Model benchmark", "Build failure"]
        for title in sorted(self.sections, key=lambda t: order.index(t) if t in order else 99):
            lines += ["", f"## {title}", "", self.sections[title].rstrip()]
        text = "\n".join(lines) + "\n"
        os.makedirs(os.path.dirname(self.report_path), exist_ok=True)
        tmp = self.report_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.report_path)
        self.copy_to_out()

    def copy_to_out(self):
        """$OUT (set on the project's GPU machines): the report, the logs and the benchmark
        JSON, at most 8 files."""
        out = os.environ.get("OUT")
        if not out or not os.path.isdir(out):
            return
        files = [self.report_path] + [os.path.join(self.out_dir, n) for n in RESULT_FILES]
        for path in [f for f in files if os.path.exists(f)][:8]:
            try:
                shutil.copy(path, os.path.join(out, os.path.basename(path)))
            except OSError:
                pass

    # --------------------------------------------------------------------------- stages

    def python(self, script, *args):
        """Command running a script with this Python; in op-only mode through this module,
        so that the bare ``deformable_detr`` package is registered first."""
        if not self.op_only:
            return [sys.executable, script, *args]
        code = (f"import sys, runpy; runpy.run_path({GPU_CHECK!r}); "
                f"sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, "
                "run_name='__main__')")
        return [sys.executable, "-c", code]

    def probe(self):
        """Exit 2, before anything is built, unless PyTorch sees a GPU and nvidia-smi exists."""
        try:
            import torch
        except ImportError as e:
            print(f"gpu-check: no PyTorch in {sys.executable} ({e}); run it with a Python that "
                  "has a CUDA build of PyTorch (docs/gpu_check.md).")
            sys.exit(EXIT_NO_GPU)
        reasons = []
        if not torch.cuda.is_available():
            reasons.append(f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                           f"built for CUDA {torch.version.cuda})")
        if shutil.which("nvidia-smi") is None:
            reasons.append("no nvidia-smi on PATH")
        if reasons:
            print("gpu-check: no GPU here: " + "; ".join(reasons) + ". It needs a machine "
                  "with an NVIDIA GPU (docs/gpu_check.md); nothing was built.")
            sys.exit(EXIT_NO_GPU)
        return torch

    def environment(self, torch):
        start = time.monotonic()
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        self.arch = f"{major}.{minor}"
        e = self.env_info
        e["device"] = f"{props.name} ({props.multi_processor_count} SMs)"
        e["capability"] = self.arch
        e["memory"] = f"{props.total_memory / 2**30:.0f} GiB"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            e["driver"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else "?"
        except (OSError, subprocess.SubprocessError, IndexError):
            e["driver"] = "?"
        e["torch"] = f"{torch.__version__} ({sys.executable})"
        e["torch CUDA"] = str(torch.version.cuda)
        nvcc = self.find_nvcc()
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
            e["nvcc"] = f"{out.strip().splitlines()[-1]} ({nvcc})"
        except (OSError, subprocess.SubprocessError, IndexError, TypeError):
            e["nvcc"] = "not found"
        e["python"] = sys.version.split()[0]
        e["cpus"] = str(self.jobs)
        e["build arch"] = f"TORCH_CUDA_ARCH_LIST={self.arch} (this GPU only)"
        self.stage("environment", "ok", time.monotonic() - start, e["device"])

    @staticmethod
    def find_nvcc():
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                     "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                return os.path.join(home, "bin", "nvcc")
        return shutil.which("nvcc")

    def check_import(self, code, timeout=120):
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=self.child_env, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s"
        return res.returncode == 0, (res.stdout + res.stderr).strip()

    def in_venv(self):
        venv = os.path.realpath(os.path.join(ROOT, ".venv"))
        return (os.path.realpath(sys.prefix) == venv
                and os.path.exists(os.path.join(venv, ".deps")))

    def dependencies(self):
        """detectron2 (for the model-level stages), from the wheelhouse if need be; and the
        path that makes this checkout's ``deformable_detr`` importable."""
        start = time.monotonic()
        paths = []
        if not self.in_venv():
            # The extension is built in place (projects/deformable_detr/_C*.so).
            paths.append(os.path.join(ROOT, "projects"))
        paths.append(BENCH_DIR)  # gpu_check (op-only plugin) and original_design
        self.set_path(paths)
        probe = ("import detectron2, detectron2.config, fvcore, pycocotools, scipy; "
                 "print(detectron2.__version__, detectron2.__file__)")
        ok, msg = self.check_import(probe)
        source = "already installed"
        wheelhouse = os.path.abspath(self.args.wheelhouse)
        wheels = sorted(glob.glob(os.path.join(wheelhouse, "*.whl")))
        if not ok and wheels:
            site = os.path.join(self.out_dir, "site")
            log = self.log_path("deps.log")
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-compile", "--disable-pip-version-check", "--upgrade", "--target",
                   site, *wheels]
            rc, _ = run_logged(cmd, log, self.budget.for_stage("deps"), env=self.child_env)
            if rc != 0:  # e.g. one wheel for another Python: install the others one by one
                for wheel in wheels:
                    run_logged(cmd[:-len(wheels)] + [wheel], log, 60, env=self.child_env)
            self.set_path([site] + paths)
            ok, msg = self.check_import(probe)
            source = f"installed from {shown(wheelhouse)} into {shown(site)}"
        if ok:
            version, path = msg.splitlines()[-1].split(" ", 1)
            self.env_info["detectron2"] = f"{version}, {source} ({os.path.dirname(path)})"
            self.stage("dependencies", "ok", time.monotonic() - start, f"detectron2 {version}")
        else:
            self.op_only = True
            last = msg.strip().splitlines()[-1] if msg.strip() else "not importable"
            self.op_only_reason = (
                f"detectron2 (or fvcore/pycocotools) is not importable here ({last}) and no "
                f"usable wheelhouse was found in {shown(wheelhouse)}: the model "
                "tests and the model benchmark need it; make one with `python "
                "benchmarks/gpu_check.py --make-wheelhouse` on a machine with network access "
                "(docs/gpu_check.md)")
            self.env_info["detectron2"] = "missing: op-level checks only"
            self.child_env[OP_ONLY_ENV] = "1"
            self.stage("dependencies", "partial", time.monotonic() - start,
                       "no detectron2: op-level checks only")

    def set_path(self, paths):
        base = os.environ.get("PYTHONPATH", "")
        self.child_env["PYTHONPATH"] = os.pathsep.join(paths + ([base] if base else []))

    def build(self):
        start = time.monotonic()
        log = self.log_path("build.log")
        env = dict(self.child_env, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=self.arch,
                   MAX_JOBS=str(self.jobs))
        # The baseline compiles meanwhile (two small files), into the output folder.
        base_log = self.log_path("baseline_build.log")
        base_env = dict(env, MAX_JOBS="2", ORIGINAL_DESIGN_BUILD_DIR=self.baseline_dir)
        with open(base_log, "a") as f:
            baseline = subprocess.Popen(
                [sys.executable, os.path.join(BENCH_DIR, "original_design", "loader.py"),
                 "--build", "--arch", self.arch], stdout=f, stderr=subprocess.STDOUT,
                cwd=ROOT, env=base_env, start_new_session=True)
        if self.in_venv():
            # The Makefile's own machinery: .venv/.build-env records the CUDA settings, so a
            # change of them rebuilds.
            cmd = ["make", os.path.join(".venv", ".build"), "FORCE_CUDA=1",
                   f"TORCH_CUDA_ARCH_LIST={self.arch}", f"MAX_JOBS={self.jobs}"]
            how = "make .venv/.build"
        else:
            cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
            how = "setup.py build_ext --inplace"
        rc, _ = run_logged(cmd, log, self.budget.for_stage("build"), env=env)
        info = None
        if rc == 0:
            ok, msg = self.check_import(
                "import json; from deformable_detr import _C; print(json.dumps(dict("
                "_C.build_info())))" if not self.op_only else
                f"import json, runpy; runpy.run_path({GPU_CHECK!r}); "
                "from deformable_detr import _C; print(json.dumps(dict(_C.build_info())))")
            if ok:
                info = json.loads(msg.splitlines()[-1])
            else:
                with open(log, "a") as f:
                    f.write("\n[gpu-check] import after the build failed:\n" + msg + "\n")
        try:  # the baseline gets what is left of the build's time, at most a minute more
            baseline.wait(timeout=max(1.0, min(60.0, self.budget.left() - 200)))
        except subprocess.TimeoutExpired:
            os.killpg(baseline.pid, signal.SIGKILL)
            baseline.wait()
            # torch's JIT build holds a lock file while it compiles; one left behind would
            # make the benchmark's load() wait for it forever.
            lock = os.path.join(self.baseline_dir, "lock")
            if os.path.exists(lock):
                os.remove(lock)
        self.baseline_ok = baseline_ok = baseline.returncode == 0
        seconds = time.monotonic() - start
        if info and info.get("cuda"):
            self.env_info["build"] = (f"{how}; CUDA kernels for {info.get('cuda_archs')!r}, "
                                      f"built against torch {info.get('torch_version')}")
            detail = "with CUDA kernels" + ("" if baseline_ok else "; baseline build failed")
            self.stage("build", "ok", seconds, detail)
            return True
        reason = ("timed out" if rc is None else f"exit {rc}" if rc else
                  "no CUDA kernels in the build" if info else "import failed")
        self.env_info["build"] = f"{how}: FAILED ({reason})"
        self.sections["Build failure"] = f"```\n{tail(log, 60)}```"
        self.stage("build", "FAILED", seconds, reason)
        return False

    def tests(self):
        log = self.log_path("tests.log")
        xml = os.path.join(self.out_dir, "pytest.xml")
        if os.path.exists(xml):
            os.remove(xml)
        files = ["tests/test_ms_deform_attn.py", "tests/test_mixed_precision.py",
                 "tests/test_gpu.py"]
        files = [f for f in files if os.path.exists(os.path.join(ROOT, f))]
        extra = []
        notes = []
        if self.op_only:
            # No detectron2: no conftest (it builds detectron2 configs), the bare package,
            # and no test file that needs detectron2 at import.
            extra = ["--noconftest", "-p", "gpu_check"]
            needs_d2 = re.compile(r"^\s*(from|import)\s+(detectron2|conftest)\b", re.M)
            for f in list(files):
                with open(os.path.join(ROOT, f)) as fh:
                    text = fh.read()
                if f != "tests/test_gpu.py" and needs_d2.search(text):
                    files.remove(f)
                    notes.append(f"{f} left out: it imports detectron2 or the conftest")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "-o", "faulthandler_timeout=150",
               f"--junitxml={xml}", "-k", "cuda or test_gpu", *extra, *files]
        rc, seconds = run_logged(cmd, log, self.budget.for_stage("tests"), env=self.child_env)
        summary = parse_junit(xml)
        if summary is None:
            status = "TIMED OUT" if rc is None else f"FAILED (exit {rc}, no results)"
            self.sections["Tests"] = f"{status}\n\n```\n{tail(log, 60)}```"
            self.stage("tests", status, seconds)
            return False
        passed = summary["tests"] - summary["failures"] - summary["errors"] - summary["skipped"]
        counts = (f"{passed} passed, {summary['failures']} failed, {summary['errors']} errors, "
                  f"{summary['skipped']} skipped")
        body = [f"{counts} ({' '.join(files)}, `-k \"cuda or test_gpu\"`, "
                f"{summary['time']:.0f} s)"]
        body += [f"- {n}" for n in notes]
        if rc is None:
            body.append("- **timed out**: the counts cover the tests that finished")
        if summary["failed"]:
            body += ["", "Failures:", ""]
            for name, message in summary["failed"]:
                body.append(f"- `{name}`: {message}")
        if summary["skip_reasons"]:
            body += ["", "Skipped:", ""]
            for reason, n in summary["skip_reasons"].items():
                body.append(f"- {n} x {reason}")
        self.sections["Tests"] = "\n".join(body)
        ok = rc == 0 and not summary["failed"]
        self.stage("tests", "ok" if ok else "FAILED" if rc is not None else "TIMED OUT",
                   seconds, counts)
        return ok

    def op_bench(self):
        log = self.log_path("op_bench.log")
        path = os.path.join(self.out_dir, "op_bench.json")
        if os.path.exists(path):
            os.remove(path)
        env = dict(self.child_env, ORIGINAL_DESIGN_BUILD_DIR=self.baseline_dir,
                   TORCH_CUDA_ARCH_LIST=self.arch)
        args = ["--device", "cuda", "--dtypes", "fp32", "fp16", "bf16", "--json", path]
        if not self.baseline_ok:  # it failed to compile once: no second try on the clock
            args.append("--no-baseline")
        cmd = self.python(os.path.join(BENCH_DIR, "ms_deform_attn.py"), *args)
        rc, seconds = run_logged(cmd, log, self.budget.for_stage("op-bench"), env=env)
        if not os.path.exists(path):
            status = "TIMED OUT" if rc is None else f"FAILED (exit {rc})"
            self.sections["Op benchmark"] = f"{status}\n\n```\n{tail(log, 40)}```"
            self.sections["Goals"] = "Not evaluated: the op benchmark did not finish."
            self.stage("op benchmark", status, seconds)
            return False
        with open(path) as f:
            data = json.load(f)
        self.sections["Op benchmark"] = op_tables(data, log)
        if not self.baseline_ok:
            self.sections["Op benchmark"] += ("\n\nThe original-design baseline did not build "
                                              "(baseline_build.log): no comparison with it.")
        self.sections["Goals"] = goals_table(evaluate_goals(data["records"]))
        errors = len(data.get("errors", []))
        self.stage("op benchmark", "ok" if rc == 0 and not errors else "partial", seconds,
                   f"{len(data['records'])} measurements, {errors} errors")
        return rc == 0

    def model_bench(self):
        if self.op_only:
            self.sections["Model benchmark"] = f"Skipped: {self.op_only_reason}."
            self.stage("model benchmark", "skipped", 0.0, "no detectron2")
            return True
        log = self.log_path("model_bench.log")
        path = os.path.join(self.out_dir, "model_bench.json")
        if os.path.exists(path):
            os.remove(path)
        limit = self.budget.for_stage("model-bench")
        # The PyTorch path roughly doubles the stage: kept when the budget allows.
        impls = ["compiled", "pytorch"] if limit >= 150 else ["compiled"]
        cmd = self.python(os.path.join(BENCH_DIR, "model.py"), "--device", "cuda",
                          "--variants", "plain", "--train-variants", "plain", "--batches", "1",
                          "4", "--train-batch", "4", "--amp", "both", "--amp-dtype", "float16",
                          "--repeats", "5", "--no-stages", "--impls", *impls, "--json", path)
        rc, seconds = run_logged(cmd, log, limit, env=self.child_env)
        if not os.path.exists(path):
            status = "TIMED OUT" if rc is None else f"FAILED (exit {rc})"
            self.sections["Model benchmark"] = f"{status}\n\n```\n{tail(log, 40)}```"
            self.stage("model benchmark", status, seconds)
            return False
        with open(path) as f:
            self.sections["Model benchmark"] = model_table(json.load(f), impls)
        self.stage("model benchmark", "ok", seconds, ", ".join(impls))
        return True

    def run(self):
        torch = self.probe()
        self.jobs = self.args.jobs or os.cpu_count() or 1
        self.baseline_dir = os.path.join(self.out_dir, "original_design_build")
        say(f"report: {self.report_path} (budget {self.args.budget:.0f} s)")
        self.environment(torch)
        self.dependencies()
        ok = True
        built = True
        if "build" in self.args.skip:
            self.stage("build", "skipped", 0.0, "--skip build")
        else:
            built = self.build()
            ok &= built
        for name, label, fn in (("tests", "tests", self.tests),
                                ("op-bench", "op benchmark", self.op_bench),
                                ("model-bench", "model benchmark", self.model_bench)):
            if name in self.args.skip:
                self.stage(label, "skipped", 0.0, f"--skip {name}")
            elif not built:
                self.stage(label, "not run", 0.0, "the build failed")
                ok = False
            elif self.budget.left() < 20:
                self.stage(label, "not run", 0.0, "time budget used up")
                ok = False
            else:
                ok &= fn()
        self.print_summary()
        return 0 if ok else 1

    def print_summary(self):
        print(f"\nreport: {self.report_path}\n")
        print("| stage | status | seconds | detail |")
        print("|---|---|---|---|")
        for name, status, seconds, detail in self.stages:
            print(f"| {name} | {status} | {seconds:.0f} | {detail} |")
        goals = self.sections.get("Goals", "")
        for line in goals.splitlines():
            if line.startswith("| ") and not line.startswith("| goal"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                print(f"| goal: {cells[0]} | {cells[-1]} | | {cells[1]} |")


# ------------------------------------------------------------------------- reading results


def parse_junit(path):
    """Counts, failures (name, first line of the message) and skip reasons from pytest's
    JUnit XML, or None when there is none."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0, "failed": [],
           "skip_reasons": {}}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(s.get(key, 0))
        out["time"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
            for kind in ("failure", "error"):
                for el in case.findall(kind):
                    message = (el.get("message") or el.text or kind).strip().splitlines()
                    out["failed"].append((name, (message[0] if message else kind)[:300]))
            for el in case.findall("skipped"):
                reason = (el.get("message") or "skipped").strip()
                # A module-level skip says only "collection skipped"; its text has the reason.
                found = re.search(r"Skipped: (.*?)['\"]\)?$", (el.text or "").strip())
                if reason == "collection skipped" and found:
                    reason = found.group(1)
                reason = reason[:200]
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
    return out


def _find(records, **key):
    for r in records:
        if all(r.get(k) == v for k, v in key.items()):
            return r
    return None


def op_tables(data, log):
    """The op benchmark's own tables (the end of its log), which list every number."""
    text = tail(log, 200)
    start = text.find("### ")
    body = text[start:] if start >= 0 else "(no table in the log)"
    keep = [line for line in body.splitlines() if not line.startswith(("W1", "/", "  warn"))]
    return "\n".join(keep)


def evaluate_goals(records):
    """[(goal, value text, met or None)] at the encoder shapes."""
    shapes = [s for s in dict.fromkeys(r["shape"] for r in records) if s.startswith("encoder")]
    results = []
    for label, kind, phase, threshold in GOALS:
        values = []
        for shape in shapes:
            ours = _find(records, shape=shape, dtype="fp32", phase=phase, impl="compiled")
            if kind == "original":
                other = _find(records, shape=shape, dtype="fp32", phase=phase, impl="original")
                if ours and other:
                    values.append((shape, other["ms"] / ours["ms"]))
            else:
                half = _find(records, shape=shape, dtype="bf16", phase=phase, impl="compiled")
                if ours and half:
                    values.append((shape, ours["ms"] / half["ms"]))
        if not values:
            results.append((label, "not measured", None))
            continue
        text = ", ".join(f"{v:.2f}x at {s}" for s, v in values)
        results.append((label, text, all(v >= threshold for _, v in values)))
    return results


def goals_table(results):
    lines = ["Ratios of median times (> 1: ours / bf16 is faster); met only when it holds at "
             "every encoder shape measured.", "", "| goal | measured | met |", "|---|---|---|"]
    for label, text, met in results:
        mark = "not measured" if met is None else "met" if met else "NOT MET"
        lines.append(f"| {label} | {text} | {mark} |")
    return "\n".join(lines)


def model_table(data, impls):
    lines = [f"{data.get('device_name', '?')}, torch {data.get('torch', '?')}, "
             f"{data['size'][0]}x{data['size'][1]}, random weights, median of "
             f"{data['repeats']} after 1 warm-up; seconds per call (inference: the whole "
             "batch). amp-fp16: torch.autocast float16 (+ GradScaler in training).", "",
             "| variant | pass | precision | compiled s | PyTorch s | PyTorch / compiled "
             "| compiled images/s | AMP speed-up |", "|---|---|---|---|---|---|---|---|"]
    records = data["records"]
    for r in records:
        c, p = r["seconds"].get("compiled"), r["seconds"].get("pytorch")
        fp32 = _find(records, variant=r["variant"], kind=r["kind"], batch=r["batch"],
                     precision="fp32")
        speedup = "—"
        if r["precision"] != "fp32" and fp32 and c and fp32["seconds"].get("compiled"):
            speedup = f"{fp32['seconds']['compiled'] / c:.2f}x"
        lines.append(
            f"| {r['variant']} | {r['kind']}, batch {r['batch']} | {r['precision']} | "
            f"{c:.4f} | " + (f"{p:.4f}" if p else "—") + " | "
            + (f"{p / c:.2f}x" if p and c else "—") + f" | {r['batch'] / c:.1f} | {speedup} |")
    if "pytorch" not in impls:
        lines.append("\nPyTorch path left out (not enough of the time budget left).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- wheelhouse


def make_wheelhouse(dest, python_version):
    """Wheels for a GPU machine without network access: detectron2 0.6 (the patched
    registry sdist, as tools/install_detectron2.py installs it, built here into a pure-Python
    wheel) and the packages it needs beyond a stock PyTorch image, pinned to this
    environment's versions where installed."""
    import runpy
    import types
    from importlib import metadata

    install_detectron2 = types.SimpleNamespace(
        **runpy.run_path(os.path.join(ROOT, "tools", "install_detectron2.py")))

    os.makedirs(dest, exist_ok=True)

    def pinned(name):
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return name

    pip = [sys.executable, "-m", "pip"]
    major, minor = python_version.split(".")
    subprocess.check_call(
        pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "--abi", f"cp{major}{minor}",
               "--abi", "abi3", "--abi", "none", "-d", dest]
        + [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                       "manylinux2014_x86_64") for a in ("--platform", p)]
        + [pinned(n) for n in BINARY_PACKAGES])
    # Pure-Python packages (some only as sdists): built into py3-none-any wheels here.
    subprocess.check_call(pip + ["wheel", "-q", "--no-deps", "-w", dest]
                          + [pinned(n) for n in WHEEL_PACKAGES])
    with tempfile.TemporaryDirectory() as tmp:
        archive = install_detectron2.download_sdist(pathlib.Path(tmp))
        with tarfile.open(archive) as tar:
            tar.extractall(os.path.join(tmp, "src"), filter="data")
        (root,) = pathlib.Path(tmp, "src").iterdir()
        install_detectron2.patch_source(root)
        subprocess.check_call(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                                     dest, str(root)])
    wheels = sorted(os.listdir(dest))
    size = sum(os.path.getsize(os.path.join(dest, w)) for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest}:\n  " + "\n  ".join(wheels))
    return 0


# ----------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Exit status: 0 all stages ran and all tests passed, 1 otherwise, 2 no GPU. "
               "See docs/gpu_check.md.")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "gpu_check"),
                        help="folder for logs, results and the report (default: %(default)s)")
    parser.add_argument("--report", help="report path (default: OUTPUT/gpu_check_report.md)")
    parser.add_argument("--budget", type=float, default=450,
                        help="seconds for all stages together; each also has its own limit "
                        "(default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel compile jobs (default: all cores)")
    parser.add_argument("--wheelhouse", default=os.path.join(ROOT, "output", "wheelhouse"),
                        help="wheels to install when detectron2 is missing (default: "
                        "%(default)s)")
    parser.add_argument("--skip", nargs="+", default=[],
                        choices=["build", "tests", "op-bench", "model-bench"],
                        help="stages to leave out")
    parser.add_argument("--make-wheelhouse", metavar="DIR", nargs="?", const="",
                        help="instead of the check: fetch and build the wheelhouse (needs "
                        "network; default DIR: the --wheelhouse folder)")
    parser.add_argument("--python-version", default="3.12",
                        help="Python of the GPU machine, for --make-wheelhouse (default: "
                        "%(default)s)")
    args = parser.parse_args(argv)
    if args.make_wheelhouse is not None:
        return make_wheelhouse(os.path.abspath(args.make_wheelhouse or args.wheelhouse),
                               args.python_version)
    return GpuCheck(args).run()


if __name__ == "__main__":
    sys.exit(main())

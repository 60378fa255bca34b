"""Build and load the CUDA launch emulator (see README.md in this folder).

``load()`` compiles ``csrc/cuda/*.cu`` unchanged as C++ (each through a generated wrapper that
includes ``cuda_emulation.h`` first, then the ``.cu`` file by path), with
``csrc/ms_deform_attn_args.cpp``, the emulator runtime and its self-test kernels, into a
library that registers the ops of ``csrc/ms_deform_attn_op.cpp`` for CPU tensors as
``torch.ops.deformable_detr_cuda_emu.*``. ``load_mutants({tag: [Mutation, ...]})`` builds
variants from edited copies of the ``.cu`` files (for tests that show a broken kernel is
caught), each as ``torch.ops.deformable_detr_cuda_emu_<tag>.*``, all in one more module.

Builds live in ``build/cuda_emulation/<name>/`` at the repository root and are reused: a new
process runs ninja, which recompiles only what changed (the ``.cu`` files are tracked as
headers of their wrappers). Load one set of mutants per process.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD_ROOT = REPO / "build" / "cuda_emulation"
LIBRARY = "deformable_detr_cuda_emu"
SELFTEST_LIBRARY = "cuda_emu_selftest"

CFLAGS = [
    "-O2",
    # The same C++ symbols (deformable_detr::...) exist in deformable_detr._C and in every
    # variant built here; hidden visibility keeps each library bound to its own.
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-DMSDA_CUDA_DISPATCH_KEY=CPU",
]  # MSDA_CUDA_LIBRARY is defined per file, in the generated wrappers


class MutationError(ValueError):
    """A mutation's text is not in the source (the kernel changed: update the mutation)."""


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` by ``new`` in a copy of ``csrc/cuda/<file>``.

    ``count`` is the number of occurrences expected (``None``: at least one; all replaced).
    ``regex``: ``old`` is a regular expression and ``new`` its replacement template.
    """

    old: str
    new: str
    file: str = "ms_deform_attn_cuda.cu"
    count: int | None = 1
    regex: bool = False

    def apply(self, text: str) -> str:
        pattern = self.old if self.regex else re.escape(self.old)
        found = len(re.findall(pattern, text))
        if found == 0 or (self.count is not None and found != self.count):
            expected = "at least 1" if self.count is None else str(self.count)
            raise MutationError(
                f"mutation of {self.file}: {self.old!r} occurs {found} times, expected "
                f"{expected}"
            )
        if self.regex:
            return re.sub(pattern, self.new, text)
        return text.replace(self.old, self.new)


class Emulator:
    """A loaded emulator library: ``ops`` are the kernels' ops, ``selftest`` the emulator's
    self-test ops (main build only); the rest controls scheduling and reads counters.

    Settings and counters belong to the built module (each has its own emulator runtime):
    the variants of one ``load_mutants`` call share theirs.
    """

    def __init__(self, library: str, control_library: str, path: str, selftest: bool):
        self.library = library
        self.path = path
        self.ops = getattr(torch.ops, library)
        self._control = getattr(torch.ops, control_library)
        self.selftest = getattr(torch.ops, SELFTEST_LIBRARY) if selftest else None

    def configure(self, seed: int | None = None, workers: int | None = None,
                  allow_exited_lanes: bool | None = None) -> None:
        """Scheduling seed (also restarts the per-launch seed sequence), number of worker
        threads, and whether warp-synchronous calls may name exited lanes."""
        self._control.emu_configure(seed, workers, allow_exited_lanes)

    def config(self) -> dict:
        seed, workers, allow = self._control.emu_config()
        return {"seed": seed, "workers": workers, "allow_exited_lanes": bool(allow)}

    @contextlib.contextmanager
    def settings(self, **kwargs) -> Iterator[Emulator]:
        """``configure(**kwargs)`` for the duration of a ``with`` block."""
        old = self.config()
        self.configure(**kwargs)
        try:
            yield self
        finally:
            self.configure(**old)

    def counters(self) -> dict:
        """launches, blocks, threads, syncthreads, syncwarp, shuffles, votes (completed
        calls), warp_lane_ops (lanes taking part in them), undefined_shuffle_reads,
        fiber_switches: totals since the last reset."""
        return dict(zip(self._control.emu_counter_names(), self._control.emu_counters()))

    def reset_counters(self) -> None:
        self._control.emu_reset_counters()


_LOADED: dict[str, object] = {}


def cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def load(verbose: bool = False) -> Emulator:
    """The kernels of csrc/cuda as they are, as ``torch.ops.deformable_detr_cuda_emu.*``, with
    the emulator's self-test kernels (``torch.ops.cuda_emu_selftest.*``)."""
    name = "msda_cuda_emu"
    if name not in _LOADED:
        src_dir = _src_dir(name)
        # The op registrations, the shared host code and the self-tests in one file (the
        # torch headers dominate compile times: parse them once), each .cu file in another.
        host = [
            "// Generated by tests/cuda_emulation/build.py: the emulator library's op",
            "// registrations, csrc/ms_deform_attn_args.cpp and the emulator's self-tests.",
            '#include "cuda_emulation.h"',
            f'#include "{CSRC / "ms_deform_attn_args.cpp"}"',
            f'#include "{HERE / "selftest_kernels.cpp"}"',
            *_registration([LIBRARY], LIBRARY),
        ]
        sources = [HERE / "emulator.cpp", _write_source(src_dir / "host_emu.cpp", host)]
        for cu in cuda_sources():
            sources.append(_write_source(src_dir / f"{cu.stem}_emu.cpp", [
                f"// Generated by tests/cuda_emulation/build.py: {cu.relative_to(REPO)} "
                "compiled as C++",
                "// for the CUDA emulator.",
                '#include "cuda_emulation.h"',
                f"#define MSDA_CUDA_LIBRARY {LIBRARY}",
                f'#include "{cu}"',
            ]))
        path = _build(name, sources, verbose)
        _LOADED[name] = Emulator(LIBRARY, LIBRARY, path, selftest=True)
    return _LOADED[name]


def load_mutants(mutants: Mapping[str, Sequence[Mutation]],
                 verbose: bool = False) -> dict[str, Emulator | MutationError]:
    """Variants of the kernels, each from copies of csrc/cuda/*.cu with its mutations
    applied, as ``torch.ops.deformable_detr_cuda_emu_<tag>.*``; all in one module (one build).
    Only float64 inputs are dispatched in the variants (the others raise).

    Returns, per tag, the variant, or the ``MutationError`` that kept it out of the build
    (its text no longer occurs in the source: the kernel changed).
    """
    key = repr(sorted((tag, tuple(ms)) for tag, ms in mutants.items()))
    if key in _LOADED:
        return _LOADED[key]
    name = "msda_cuda_emu_mutants"
    control = f"{LIBRARY}_mutants"
    src_dir = _src_dir(name)
    result: dict[str, Emulator | MutationError] = {}
    built: list[str] = []
    # One file holds every variant (with the shared host code): the torch headers, which
    # dominate compile times, are parsed once. Each variant's definitions in namespace
    # deformable_detr move to a namespace of their own (which sees the project's
    # declarations), so that the variants link together; the .cu files must therefore
    # define nothing at global scope but their op registrations. Only float64 is
    # dispatched, which compiles a quarter of the kernels.
    lines = [
        "// Generated by tests/cuda_emulation/build.py: variants of csrc/cuda/*.cu (edited",
        "// copies) compiled as C++ for the CUDA emulator, each in its own namespace and op",
        "// library, with csrc/ms_deform_attn_args.cpp.",
        '#include "cuda_emulation.h"',
        f'#include "{CSRC / "ms_deform_attn_args.cpp"}"',
        # The project's headers first, in their own namespace (#pragma once then keeps the
        # .cu files' includes of them from reopening them in a variant's namespace).
        *[f'#include "{h.name}"' for h in sorted(CSRC.glob("*.h"))],
        "#include <ATen/Dispatch.h>",
        "#undef AT_DISPATCH_FLOATING_TYPES_AND2",
        "#define AT_DISPATCH_FLOATING_TYPES_AND2(T1, T2, TYPE, NAME, ...) \\",
        "  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))",
    ]
    for tag, mutations in sorted(mutants.items()):
        if not re.fullmatch(r"[a-z0-9_]+", tag):
            raise ValueError(f"tag must be lowercase letters, digits and _: {tag!r}")
        unknown = {m.file for m in mutations} - {cu.name for cu in cuda_sources()}
        if unknown:
            result[tag] = MutationError(f"{tag}: no such file in csrc/cuda: {sorted(unknown)}")
            continue
        try:
            texts = {}
            for cu in cuda_sources():
                text = cu.read_text()
                for m in mutations:
                    if m.file == cu.name:
                        text = m.apply(text)
                texts[cu] = text
        except MutationError as e:
            result[tag] = MutationError(f"{tag}: {e}")
            continue
        ns = f"deformable_detr_mutant_{tag}"
        lines += ["", f"// Variant {tag}",
                  f"namespace {ns} {{ using namespace ::deformable_detr; }}",
                  f"#define deformable_detr {ns}",
                  f"#define MSDA_CUDA_LIBRARY {LIBRARY}_{tag}"]
        for cu, text in texts.items():
            copy = src_dir / tag / cu.name
            copy.parent.mkdir(exist_ok=True)
            _write_if_changed(copy, text)
            lines.append(f'#include "{copy}"')
        lines += ["#undef MSDA_CUDA_LIBRARY", "#undef deformable_detr"]
        built.append(tag)
    lines += ["", *_registration([f"{LIBRARY}_{t}" for t in built], control)]
    sources = [HERE / "emulator.cpp", _write_source(src_dir / "mutants_emu.cpp", lines)]
    path = _build(name, sources, verbose)
    for tag in built:
        result[tag] = Emulator(f"{LIBRARY}_{tag}", control, path, selftest=False)
    _LOADED[key] = result
    return result


def _src_dir(name: str) -> Path:
    path = BUILD_ROOT / name / "src"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(name: str, sources: list[Path], verbose: bool) -> str:
    # torch runs `ninja` from PATH; the pip-installed one sits beside the interpreter of a
    # virtual environment that was not activated (as under `make test`).
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and shutil.which("ninja", path=bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return torch.utils.cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=CFLAGS,
        extra_ldflags=["-ldl"],
        extra_include_paths=[str(HERE / "include"), str(HERE), str(CSRC)],
        build_directory=str(BUILD_ROOT / name),
        with_cuda=False,
        is_python_module=False,
        verbose=verbose,
    )


def _write_source(path: Path, lines: list[str]) -> Path:
    _write_if_changed(path, "\n".join(lines) + "\n")
    return path


def _op_schemas() -> list[str]:
    """The ``m.def(...)`` arguments (C++ string literals) of ``TORCH_LIBRARY(deformable_detr,
    ...)`` in csrc/ms_deform_attn_op.cpp, so the emulated ops have exactly its schemas."""
    text = (CSRC / "ms_deform_attn_op.cpp").read_text()
    start = re.search(r"TORCH_LIBRARY\(\s*deformable_detr\s*,\s*\w+\s*\)\s*\{", text)
    if start is None:
        raise RuntimeError("no TORCH_LIBRARY(deformable_detr, ...) in ms_deform_attn_op.cpp")
    depth, end = 1, start.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    body = text[start.end():end - 1]
    schemas = re.findall(r'\.def\(\s*((?:"(?:[^"\\\n]|\\.)*"\s*)+)\)', body)
    if not schemas:
        raise RuntimeError("no m.def(\"schema\") in TORCH_LIBRARY(deformable_detr, ...)")
    return [" ".join(s.split()) for s in schemas]


def _registration(libraries: list[str], control: str) -> list[str]:
    """C++ lines registering the libraries (each with the op schemas of
    csrc/ms_deform_attn_op.cpp) and the emulator's control ops (in ``control``)."""
    schemas = _op_schemas()
    lines = ['#include "control_ops.h"']
    for library in sorted(set(libraries) | {control}):
        lines.append(f"TORCH_LIBRARY({library}, m) {{")
        if library in libraries:
            lines += [f"  m.def({s});" for s in schemas]
        if library == control:
            lines.append("  cuda_emu::register_control_ops(m);")
        lines.append("}")
    return lines


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and not at all if unchanged (ninja rebuilds on a newer mtime)."""
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)

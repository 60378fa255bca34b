#!/usr/bin/env python
"""Deformable DETR as a detectron2 project, with a compiled multi-scale deformable attention op.

The extension ``deformable_detr._C`` always has the CPU kernels; it gets the CUDA kernels
when CUDA is available or ``FORCE_CUDA=1`` (architectures from ``TORCH_CUDA_ARCH_LIST``),
which works on a machine with the CUDA toolkit and no GPU.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """CUDA_HOME as torch guessed it, unless nvcc's folder is not the toolkit root.

    torch guesses the toolkit from where ``nvcc`` sits on PATH; a launcher script there
    (as in /usr/local/bin) makes that guess wrong and the link fails with
    "cannot find -lcudart". The toolkit root is the folder whose bin/ holds nvcc and whose
    lib/ or lib64/ holds libcudart.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME,
                  "/usr/local/cuda"]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and any(
            glob.glob(os.path.join(c, lib, "libcudart.so*")) for lib in ("lib", "lib64")
        ):
            return c
    return None


def get_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("DEFORMABLE_DETR_TORCH_VERSION", f'"{torch.__version__}"')]
    # -g0 overrides the -g of Python's build flags: debug info of the template-heavy kernels
    # and libtorch headers makes the build about 1.5x slower and the library 10x larger.
    extra_compile_args = {"cxx": ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]}
    extension = CppExtension
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.cuda.is_available() and CUDA_HOME is not None
    )
    if with_cuda:
        cuda_home = _cuda_home()
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (bin/nvcc and lib/libcudart) "
                               "was found; set CUDA_HOME to the toolkit root")
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros += [("WITH_CUDA", None), ("DEFORMABLE_DETR_CUDA_ARCHS", f'"{archs}"')]
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    return [
        extension(
            "deformable_detr._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="deformable_detr",
    version="0.1.0",
    description="Deformable DETR for detectron2 with a compiled multi-scale deformable attention",
    packages=["deformable_detr"]
    + ["deformable_detr." + p for p in find_packages(os.path.join("projects", "deformable_detr"))],
    package_dir={"deformable_detr": "projects/deformable_detr"},
    python_requires=">=3.9",
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "scipy"],
    # deformable_detr.export and tools/export_model.py: the ONNX exporter (torch's dynamo
    # exporter needs onnxscript) and onnxruntime to check and run the exported models.
    # Tested with the versions pinned in requirements/test.txt.
    extras_require={
        "export": ["onnx>=1.23,<2", "onnxruntime>=1.32,<2", "onnxscript>=0.7.2,<0.8"],
    },
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)

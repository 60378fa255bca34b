#!/usr/bin/env python
"""Install detectron2 into the current environment only if ``import detectron2`` fails.

detectron2 publishes no wheel on the package registry. The fallback takes the registry's
``pb1-detectron2==0.6`` source distribution (the detectron2 v0.6 release, Python sources
only, pinned by hash) and applies the smallest changes that make it import and run with a
current PyTorch, Pillow and setuptools:

1. ``setup.py``: no C++/CUDA extension (its sources are not in the sdist) and no
   ``black==21.4b2`` pin (only ``LazyConfig.save`` formats with it, and it imports it lazily).
2. ``detectron2/_C.py``: a stand-in for the compiled ops. Importing it works (so
   ``detectron2.layers`` and ``detectron2.modeling`` import); touching any op raises an
   ``ImportError`` naming the op and how to get it (build detectron2 from source).
   Deformable DETR needs none of them. ``deformable_detr.utils.detectron2_has_compiled_ops()``
   tells the two apart, e.g. to pick ``COCOEvaluator(use_fast_impl=False)``.
3. ``detectron2/data/transforms/transform.py``: ``Image.LINEAR`` (removed in Pillow 10) is
   ``Image.BILINEAR``, the constant it always aliased.
4. ``detectron2/model_zoo/model_zoo.py``: no ``pkg_resources`` (gone from recent setuptools);
   package files are found relative to the module.

A detectron2 that is already importable (for example a source build, any version >= 0.6)
is never touched.
"""
import argparse
import hashlib
import importlib.util
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# detectron2 0.6's runtime requirements, less black (see above).
REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

C_STANDIN = '''"""Stand-in for detectron2's compiled ops (installed by deformable_detr's fallback).

This detectron2 was built from the pb1-detectron2 0.6 source distribution, which lacks the
C++/CUDA sources. Deformable DETR needs none of these ops.
"""
__deformable_detr_stub__ = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"detectron2's compiled op '{name}' is not available: this detectron2 was installed "
        "by deformable_detr's fallback (tools/install_detectron2.py) without its C++/CUDA "
        "extension. Ops such as deformable convolution, rotated boxes, ROIAlignRotated and "
        "the fast COCO evaluation need it: build detectron2 from its source repository "
        "(pip install 'git+<detectron2 repository>') to use them. For COCO evaluation, "
        "COCOEvaluator(..., use_fast_impl=False) gives the same numbers without it."
    )
'''


def _patch(path: pathlib.Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    if text.count(old) < count:
        raise RuntimeError(f"patching {path}: expected text not found: {old!r}")
    path.write_text(text.replace(old, new))


def patch_source(root: pathlib.Path) -> None:
    """Apply the compatibility changes listed in the module docstring to an unpacked sdist."""
    setup = root / "setup.py"
    _patch(setup, "ext_modules=get_extensions(),", "ext_modules=[],")
    _patch(setup, '"black==21.4b2",', "")
    (root / "detectron2" / "_C.py").write_text(C_STANDIN)
    _patch(root / "detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")
    zoo = root / "detectron2/model_zoo/model_zoo.py"
    text = zoo.read_text()
    text = text.replace("import pkg_resources\n", "")
    text, n = re.subn(
        r'pkg_resources\.resource_filename\(\s*"detectron2\.model_zoo",\s*(.*?)\)\n',
        r"os.path.join(os.path.dirname(__file__), \1)\n",
        text,
        flags=re.S,
    )
    if n != 1 or "pkg_resources" in text:
        raise RuntimeError(f"patching {zoo}: unexpected pkg_resources use")
    zoo.write_text(text)


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="install even if importable")
    args = parser.parse_args()
    if detectron2_importable() and not args.force:
        import detectron2

        print(f"detectron2 {detectron2.__version__} already installed at "
              f"{pathlib.Path(detectron2.__file__).parent}; leaving it as it is")
        return 0
    pip("install", "-q", *REQUIREMENTS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        req = tmp / "requirements.txt"
        req.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
        # --no-build-isolation: the sdist's setup.py imports torch to prepare its metadata.
        pip("download", "-q", "--no-deps", "--no-build-isolation", "--require-hashes",
            "-r", str(req), "-d", str(tmp / "dl"))
        (archive,) = (tmp / "dl").glob("*.tar.gz")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{archive.name}: sha256 {digest} != pinned {SDIST_SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "src", filter="data")
        (root,) = (tmp / "src").iterdir()
        patch_source(root)
        pip("install", "-q", "--no-deps", "--no-build-isolation", str(root))
    print("installed detectron2 0.6 (pb1-detectron2 sdist, patched as tools/install_detectron2.py "
          "describes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

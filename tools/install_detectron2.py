#!/usr/bin/env python
"""Install detectron2 into the current environment only if ``import detectron2`` fails.

detectron2 publishes no wheel on the package registry. The fallback takes the registry's
``pb1-detectron2==0.6`` source distribution (the detectron2 v0.6 release, Python sources
only, pinned by hash) and applies the smallest changes that make it import and run with a
current PyTorch, Pillow and setuptools:

1. ``setup.py``: no C++/CUDA extension (its sources are not in the sdist), no
   ``black==21.4b2`` pin (only ``LazyConfig.save`` formats with it, and it imports it lazily)
   and no direct-URL ``panopticapi`` in the ``all`` extra (current pip refuses those).
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
import html
import importlib
import importlib.util
import os
import pathlib
import re
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request

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

STUB_VERSION = 2
C_STANDIN = '''"""Stand-in for detectron2's compiled ops (installed by deformable_detr's fallback).

This detectron2 was built from the pb1-detectron2 0.6 source distribution, which lacks the
C++/CUDA sources. Deformable DETR needs none of these ops.
"""
# Version of this stand-in: tools/install_detectron2.py replaces older ones (and only those).
__deformable_detr_stub__ = STUB_VERSION


# What detectron2's environment report (collect_env_info, run by default_setup) asks for.
def get_compiler_version():
    return "not built (deformable_detr fallback install, no compiled ops)"


def get_cuda_version():
    return "not built"


def has_cuda():
    return False


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
    # A direct-URL requirement in the "all" extra, which current pip refuses to read.
    text, n = re.subn(r'\n\s*"panopticapi @ [^"]*",', "", setup.read_text())
    if n != 1:
        raise RuntimeError(f"patching {setup}: panopticapi requirement not found")
    setup.write_text(text)
    (root / "detectron2" / "_C.py").write_text(
        C_STANDIN.replace("= STUB_VERSION", f"= {STUB_VERSION}")
    )
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


def outdated_fallback() -> bool:
    """True when the installed detectron2 is an older version of our own fallback."""
    try:
        stub = importlib.import_module("detectron2._C")
    except Exception:
        return False
    version = getattr(stub, "__deformable_detr_stub__", None)
    if version is None:  # a real detectron2 build: never touched
        return False
    return int(version) < STUB_VERSION  # the first stand-in said True, i.e. 1


def _index_urls():
    """The package index pip uses here: PIP_INDEX_URL, pip's config, then pip's default."""
    urls = [os.environ.get("PIP_INDEX_URL", "")]
    res = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    urls.append(res.stdout.strip() if res.returncode == 0 else "")
    from pip._internal.models.index import PyPI

    urls.append(PyPI.simple_url)
    return [u for u in dict.fromkeys(urls) if u]


def download_sdist(dest: pathlib.Path) -> pathlib.Path:
    """Fetch the pinned sdist from the index's simple API and check its sha256.

    Not ``pip download``: current pip prepares the sdist's metadata first and refuses it,
    because its ``all`` extra names a direct URL.
    """
    cafile = os.environ.get("PIP_CERT") or None
    context = ssl.create_default_context(cafile=cafile)
    name, version = SDIST.split("==")
    filename = f"{name}-{version}.tar.gz"
    errors = []
    for index in _index_urls():
        page_url = f"{index.rstrip('/')}/{name}/"
        try:
            with urllib.request.urlopen(page_url, timeout=60, context=context) as r:
                page = r.read().decode()
            links = re.findall(r'href="([^"]*?' + re.escape(filename) + r'[^"]*)"', page)
            if not links:
                raise RuntimeError(f"{filename} not listed")
            url = urllib.parse.urljoin(page_url, html.unescape(links[0]).split("#")[0])
            with urllib.request.urlopen(url, timeout=300, context=context) as r:
                data = r.read()
        except Exception as e:  # try the next index
            errors.append(f"{page_url}: {e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{url}: sha256 {digest} != pinned {SDIST_SHA256}")
        path = dest / filename
        path.write_bytes(data)
        return path
    raise RuntimeError(f"could not download {SDIST}: " + "; ".join(errors))


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="install even if importable")
    args = parser.parse_args()
    if detectron2_importable() and not args.force and not outdated_fallback():
        import detectron2

        print(f"detectron2 {detectron2.__version__} already installed at "
              f"{pathlib.Path(detectron2.__file__).parent}; leaving it as it is")
        return 0
    pip("install", "-q", *REQUIREMENTS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        archive = download_sdist(tmp)
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

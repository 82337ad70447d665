"""Build the compiled backends.

* ``ood_fast._C``    -- torch-free C++ (pybind11 + OpenMP) from ``csrc/cpu``; built on every install.
* ``ood_fast._cuda`` -- torch-free CUDA (pybind11 + nvcc) from ``csrc/cuda``; built when
  ``OOD_FAST_BUILD_CUDA=1``, or automatically when nvcc and a GPU are both present
  (``OOD_FAST_BUILD_CUDA=0`` turns that off). A CUDA build that cannot compile says why and the
  install goes on without it, unless the variable was set to 1, which makes the failure fatal.

No torch is imported here: the extensions take raw pointers, so they never break on a torch
ABI change and the build never pulls torch into pip's isolated build environment.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _cpu_extension():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    return Pybind11Extension(
        "ood_fast._C",
        sources,
        include_dirs=["csrc/cpu"],
        cxx_std=17,
        # No -march=native: kernels pick their instruction set at run time (see csrc/cpu/simd.h).
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"],
        extra_link_args=["-fopenmp"],
    )


def _find_cuda_home():
    """A CUDA toolkit folder holding both bin/nvcc and the static runtime we link against."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: follow links, then look one level up
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "lib64" / "libcudart_static.a").exists():
            return home
    return None


def _find_nvcc():
    home = _find_cuda_home()
    return str(home / "bin" / "nvcc") if home else None


def _gpu_present():
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except Exception:
        return False


def _want_cuda():
    flag = os.environ.get("OOD_FAST_BUILD_CUDA", "")
    if flag == "0":
        return False, False
    if flag == "1":
        return True, True
    return bool(_find_nvcc()) and _gpu_present(), False


class BuildExt(build_ext):
    """build_ext that also compiles ``.cu`` sources with nvcc."""

    def build_extension(self, ext):
        if ext.name != "ood_fast._cuda":
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as exc:  # a CPU-only install must not fail because of CUDA
            if os.environ.get("OOD_FAST_BUILD_CUDA") == "1":
                raise
            print(f"ood_fast: skipping the CUDA extension: {exc}", file=sys.stderr)

    def _build_cuda(self, ext):
        import sysconfig

        import pybind11

        cuda_home = _find_cuda_home()
        if cuda_home is None:
            raise RuntimeError(
                "no CUDA toolkit with bin/nvcc and lib64/libcudart_static.a (set CUDA_HOME)"
            )
        nvcc = str(cuda_home / "bin" / "nvcc")
        archs = os.environ.get("OOD_FAST_CUDA_ARCHS", "80;90")
        gencode = []
        for arch in archs.split(";"):
            gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        includes = [
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{ROOT / 'csrc' / 'cuda'}",
        ]

        def compile_one(src):
            obj = build_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "--threads", "0",
                   *gencode, *includes]  # fmt: skip
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        # One nvcc per source file, in parallel: CUDA compiles dominate the install time.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        # Link with the host compiler against the static CUDA runtime: the module then imports
        # on machines without a driver (it fails only when a kernel is launched).
        cxx = os.environ.get("CXX", "g++")
        cmd = [
            cxx,
            "-shared",
            *objects,
            "-o",
            str(out),
            f"-L{cuda_home / 'lib64'}",
            "-lcudart_static",
            "-ldl",
            "-lrt",
            "-lpthread",
        ]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)


extensions = [_cpu_extension()]
want_cuda, _ = _want_cuda()
if want_cuda:
    from setuptools import Extension

    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    extensions.append(Extension("ood_fast._cuda", cu))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})

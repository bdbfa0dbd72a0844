"""setup.py: packaging metadata lives in pyproject.toml; this file builds the compiled extension ``dgg_fused._C``.

* ``CUDAExtension`` (csrc/*.cpp + csrc/*.cu) when a CUDA toolkit (``CUDA_HOME``/nvcc) and a CUDA build of torch are
  both present, else ``CppExtension`` (csrc/*.cpp only). No GPU is needed to *compile* the CUDA sources.
* ``DGG_FUSED_SKIP_EXT=1`` skips the extension entirely (pure-Python install; the "torch"/"triton" backends remain).
* ``DGG_FUSED_NO_CUDA=1`` builds the CPU extension only, even where CUDA could be compiled.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default here: "9.0", i.e. H100/H200, to keep CI compile time
  modest); ``MAX_JOBS`` bounds ninja's parallelism.

The nvidia cu13 wheels that a CUDA torch pulls in carry headers (cublas, cusparse, ...) that a bare toolkit may
lack; their include directories are added when present. Nothing is downloaded during the build.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs() -> list[str]:
    dirs: list[str] = []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for root in sorted(roots):
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _default_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit when unset: ``nvcc`` on PATH may be a wrapper script (as on our CI box,
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0), from which torch would guess the wrong root (/usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = root
            return


def _extensions():
    if _flag("DGG_FUSED_SKIP_EXT"):
        print("dgg_fused: DGG_FUSED_SKIP_EXT set, not building dgg_fused._C", file=sys.stderr)
        return [], {}
    _default_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pip without --no-build-isolation and no torch: pure-Python install
        print("dgg_fused: torch not importable at build time, not building dgg_fused._C", file=sys.stderr)
        return [], {}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    csrc = os.path.join("csrc")
    cpp_sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")) + glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    with_cuda = (
        not _flag("DGG_FUSED_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off"]
    libs_args = {"extra_link_args": ["-fopenmp"]}
    if with_cuda:
        nvcc = ["-O3", "--fmad=false", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "dgg_fused._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, csrc)] + _nvidia_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **libs_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dgg_fused._C",
            cpp_sources,
            include_dirs=[os.path.join(HERE, csrc)],
            extra_compile_args={"cxx": cxx},
            **libs_args,
        )
    print(f"dgg_fused: building dgg_fused._C ({'CUDA + CPU' if with_cuda else 'CPU'})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

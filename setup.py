"""Build muon_ext: the C++ CPU step always, the CUDA step when torch has CUDA and nvcc is found.

Knobs (environment variables, all optional):
  MUON_EXT_FORCE_CPU=1        build only the CPU implementation, even with a CUDA torch
  MUON_EXT_CUDA_ARCHS="8.0;9.0" arch list (else TORCH_CUDA_ARCH_LIST, else the local GPU, else 8.0;9.0)
  MUON_EXT_DEBUG=1            -O0 -g, for gdb / compute-sanitizer line info
  MAX_JOBS=N                  parallel compile jobs (ninja)
Install with `pip install --no-build-isolation .`: the build must see the installed torch.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - a readable error instead of a traceback
    sys.exit(
        "muon_ext builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .` (an isolated build cannot see torch)."
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_pip_root() -> Path | None:
    """cuBLAS headers/libs shipped as pip wheels next to torch (nvidia/cu13, nvidia/cu12, nvidia/cublas)."""
    try:
        import nvidia  # namespace package installed with the CUDA build of torch
    except ImportError:
        return None
    for base in map(Path, nvidia.__path__):
        for sub in ("cu13", "cu12", "cublas"):
            if (base / sub / "include" / "cublasLt.h").exists():
                return base / sub
    return None


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "include", "cuda_runtime.h").exists():
        return home
    # nvcc on PATH may be a wrapper script; the toolkit root is the `cuda` symlink beside it.
    from shutil import which

    nvcc = which("nvcc")
    if nvcc:
        prefix = Path(nvcc).resolve().parent.parent
        for cand in (prefix, Path(nvcc).parent.parent / "cuda", prefix / "cuda"):
            if (cand / "include" / "cuda_runtime.h").exists():
                return str(cand)
    return cpp_extension.CUDA_HOME


def _arch_list() -> str:
    archs = os.environ.get("MUON_EXT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = f"{major}.{minor}"
        else:
            archs = "8.0;9.0"
    return archs


def build_extension():
    debug = _env_flag("MUON_EXT_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # No -std flag: cpp_extension passes the standard the installed torch needs (C++20 for 2.14).
    cxx_flags = [*opt, "-fvisibility=hidden"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    sources = ["csrc/bindings.cpp", "csrc/muon_step_args.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [str(ROOT / "csrc")]

    cuda_home = _cuda_home()
    with_cuda = (
        torch.version.cuda is not None and cuda_home is not None and not _env_flag("MUON_EXT_FORCE_CPU")
    )
    if not with_cuda:
        define_macros.append(("MUON_EXT_BUILD_INFO_ARCHS", '"none"'))
        return cpp_extension.CppExtension(
            "muon_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        ), False

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    archs = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/kernels/*.cu"))
    define_macros += [("MUON_EXT_WITH_CUDA", "1"), ("MUON_EXT_BUILD_INFO_ARCHS", f'"{archs}"')]
    library_dirs, libraries, link_args = [], ["cublas", "cublasLt"], []
    nv = _nvidia_pip_root()
    if nv is not None and not Path(cuda_home, "include", "cublasLt.h").exists():
        # The toolkit has no cuBLAS: use the pip wheel torch itself loads (versioned .so only).
        include_dirs.append(str(nv / "include"))
        libraries = []
        link_args += [f"-L{nv / 'lib'}", "-l:libcublas.so.13" if (nv / "lib" / "libcublas.so.13").exists()
                      else "-l:libcublas.so.12",
                      "-l:libcublasLt.so.13" if (nv / "lib" / "libcublasLt.so.13").exists()
                      else "-l:libcublasLt.so.12",
                      f"-Wl,-rpath,{nv / 'lib'}"]
    # nvcc has no -g0 (and Python's -g reaches only the host compiler's flags).
    nvcc_opt = ["-O0", "-g"] if debug else ["-O3"]
    nvcc_flags = [
        *nvcc_opt,
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-diag-suppress",
        "3189",
    ]
    return cpp_extension.CUDAExtension(
        "muon_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_args,
    ), True


ext, _with_cuda = build_extension()

setup(
    packages=find_packages(include=["muon_ext", "muon_ext.*"]),
    package_data={"muon_ext": ["py.typed"]},
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

"""Builds vattention._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Environment knobs: VATTENTION_CPU_ONLY=1 skips CUDA; TORCH_CUDA_ARCH_LIST (default "9.0")
and MAX_JOBS are honoured; CUDA_HOME overrides the toolkit found from nvcc.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def toolkit_root():
    """The CUDA toolkit root that `nvcc` really runs from (nvcc may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.MULTILINE)
    if match is None:
        return str(Path(os.path.realpath(nvcc)).parent.parent)
    return os.path.realpath(match.group(1).strip())


def want_cuda():
    if os.environ.get("VATTENTION_CPU_ONLY") == "1":
        return False
    import torch

    return torch.version.cuda is not None and toolkit_root() is not None


def extra_cuda_includes():
    """Headers that ship in the CUDA torch wheel's nvidia-* packages (cuBLAS for ATen, cuRAND)."""
    found = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/curand/include", "nvidia/cublas/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                found.append(str(candidate))
    return found


def extensions():
    # Import lazily so that `setup.py --version` style queries work without torch.
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/vattention/*_cpu.cpp")) + [
        "csrc/torch/registration.cpp",
        "csrc/torch/checks.cpp",
        "csrc/torch/ops_cpu.cpp",
    ]
    cxx = ["-O3"]
    if not want_cuda():
        return [cpp_extension.CppExtension("vattention._C", sources, extra_compile_args={"cxx": cxx},
                                           py_limited_api=False)]

    os.environ["CUDA_HOME"] = toolkit_root()
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    sources += sorted(glob.glob("csrc/vattention/*_cuda.cu")) + ["csrc/torch/ops_cuda.cpp"]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DVATTENTION_WITH_CUDA",
            "--expt-relaxed-constexpr"]
    return [cpp_extension.CUDAExtension(
        "vattention._C", sources,
        include_dirs=extra_cuda_includes(),
        extra_compile_args={"cxx": cxx + ["-DVATTENTION_WITH_CUDA"], "nvcc": nvcc},
        py_limited_api=False,
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja())


def _has_ninja():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)

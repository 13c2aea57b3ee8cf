"""Builds kdfast._C: CPU kernels always, CUDA kernels when torch and a toolkit allow.

Environment switches:
  KDFAST_CUDA=auto|1|0     build the CUDA kernels: auto (default) when torch has CUDA
                           and a CUDA toolkit is found (no GPU needed), 1 to require, 0 to skip.
  KDFAST_CUDA_ARCHS="8.0;9.0"  CUDA architectures (default 8.0 and 9.0; "+PTX" allowed);
                           falls back to TORCH_CUDA_ARCH_LIST, then the default.
  KDFAST_CPU_ISA=auto|none  also build AVX2 / AVX-512 CPU kernels on x86-64 (auto), or not.
  KDFAST_DEBUG=1           -O0 -g builds.
  KDFAST_PTXAS_VERBOSE=1   pass -Xptxas -v to nvcc: registers, stack and spills of every
                           kernel instantiation in the build log (CI reads them).
  MAX_JOBS=N               parallel compile jobs (torch's ninja build).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def read_version() -> str:
    text = (ROOT / "kdfast" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


# Flags of the per-instruction-set kernel files csrc/cpu/*_kernel_<isa>.cpp (x86-64 only);
# every other csrc/*.cpp and csrc/cpu/*.cpp is portable.
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi",
               "-mbmi2"],
}


def isa_sources(isa: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob(f"*_kernel_{isa.lower()}.cpp"))


def portable_sources() -> list[str]:
    isa_files = {f for isa in ISA_FLAGS for f in isa_sources(isa)}
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    return [s for s in (str(p.relative_to(ROOT)) for p in files) if s not in isa_files]


def cuda_archs() -> list[str]:
    raw = os.environ.get("KDFAST_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    return [a for a in re.split(r"[;\s,]+", raw) if a]


def nvcc_supported_archs(nvcc: str) -> set[str] | None:
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", out)}


def want_cuda(torch, cpp_extension) -> bool:
    mode = env_flag("KDFAST_CUDA", "auto")
    if mode in ("0", "false", "off", "no"):
        return False
    has_torch_cuda = torch.version.cuda is not None
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if mode in ("1", "true", "on", "yes"):
        if not (has_torch_cuda and has_toolkit):
            raise RuntimeError(
                "KDFAST_CUDA=1 but "
                + ("this torch has no CUDA" if not has_torch_cuda else "no CUDA toolkit was found (set CUDA_HOME)")
            )
        return True
    return has_torch_cuda and has_toolkit


def make_extension():
    import torch
    from torch.utils import cpp_extension

    debug = env_flag("KDFAST_DEBUG", "0") in ("1", "true", "yes")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    version = read_version()
    define_macros = [("KDFAST_VERSION", f'"{version}"')]
    # -ffp-contract=off: the kernels rely on a*b - c*d rounding like its parts (shifts
    # shared by forward and backward); explicit fmadd calls are unaffected.
    cxx = opt + ["-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
                 "-Wno-maybe-uninitialized"]  # at::vec reductions trip it spuriously

    sources = portable_sources()
    isa_objects = {}
    if platform.machine().lower() in ("x86_64", "amd64") and env_flag("KDFAST_CPU_ISA", "auto") != "none":
        for isa, flags in ISA_FLAGS.items():
            isa_objects[isa] = (isa_sources(isa), flags)
            define_macros.append((f"KDFAST_CPU_{isa}", "1"))

    # at::parallel_for is inline code: without OpenMP in *this* build it runs every CPU
    # kernel on one thread, whatever torch.get_num_threads() says.
    link_args = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link_args.append("-fopenmp")
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if want_cuda(torch, cpp_extension):
        archs = cuda_archs()
        supported = nvcc_supported_archs(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
        if supported is not None:
            dropped = [a for a in archs if a.replace("+PTX", "") not in supported]
            archs = [a for a in archs if a not in dropped]
            if dropped:
                print(f"kdfast: nvcc does not support CUDA archs {dropped}; skipping them")
        if not archs:
            raise RuntimeError("kdfast: no CUDA architecture left to build for (KDFAST_CUDA_ARCHS)")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)  # read by torch's nvcc flags
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
        define_macros += [("KDFAST_WITH_CUDA", "1"), ("KDFAST_CUDA_ARCHS", f'"{";".join(archs)}"')]
        # No --use_fast_math: IEEE division / sqrt, accurate expf / logf and denormals
        # kept (-ftz=false); the kernels are memory-bound, so fast math would buy little.
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-ftz=false", "-prec-div=true",
                      "-prec-sqrt=true", "-fmad=true", "-Xcompiler", "-fvisibility=hidden"]
        if env_flag("KDFAST_PTXAS_VERBOSE", "0") in ("1", "true", "yes"):
            nvcc += ["-Xptxas", "-v"]
        extra["nvcc"] = nvcc
        ext_cls = cpp_extension.CUDAExtension
        print(f"kdfast: building CUDA kernels for {archs}")
    else:
        print("kdfast: building without CUDA kernels")

    ext = ext_cls(
        name="kdfast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
        py_limited_api=False,
    )
    ext.kdfast_isa_objects = isa_objects
    return ext, cpp_extension


def make_build_ext(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus per-file flags for the instruction-set kernels.

        The AVX2 / AVX-512 kernel files are compiled alone with their -m flags and
        linked after every portable object, so the linker keeps the portable copy of
        any inline function they share.
        """

        def build_extension(self, ext):
            for isa, (srcs, flags) in getattr(ext, "kdfast_isa_objects", {}).items():
                cxx = list(ext.extra_compile_args["cxx"]) + flags
                objects = self.compiler.compile(
                    srcs,
                    output_dir=os.path.join(self.build_temp, isa.lower()),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": cxx, "nvcc": []} if self.use_ninja else cxx,
                    depends=ext.depends,
                )
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return BuildExtension.with_options(no_python_abi_suffix=False)


ext, cpp_extension = make_extension()

setup(
    name="kdfast",
    version=read_version(),
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": make_build_ext(cpp_extension)},
)

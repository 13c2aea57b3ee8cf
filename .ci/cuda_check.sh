#!/usr/bin/env bash
# CUDA compile-and-link check; needs the CUDA toolkit (nvcc), not a GPU.
# Builds kdfast with its CUDA kernels against the registry's CUDA build of torch, in a
# scratch copy of the sources (the CPU build in the checkout is left alone), imports it,
# and fails unless every kdfast op has a CUDA kernel registered. The build runs with
# KDFAST_PTXAS_VERBOSE=1 and .ci/ptxas_report.py prints registers, stack and spills of
# every kernel from its log; a kdfast kernel that spills registers fails the check.
#
# Usage: bash .ci/cuda_check.sh [VENV]
#   VENV                 virtual environment with the CUDA torch (default .ci-cuda-venv;
#                        created on first use, about 4.7 GB, reused while its torch has CUDA)
#   KDFAST_CUDA_ARCHS    architectures to build (default "8.0;9.0")
#   KDFAST_CUDA_CHECK_DIR  scratch build directory (default .ci-cuda-venv/kdfast-build,
#                        kept so that a rerun only recompiles changed C++ files; the .cu
#                        files are always recompiled, for their ptxas report)
#   MAX_JOBS             parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$SECONDS

TORCH_VERSION=2.13.0
VENV=${1:-.ci-cuda-venv}
ARCHS=${KDFAST_CUDA_ARCHS:-8.0;9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cuda_check: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME to a CUDA toolkit)" >&2
  exit 1
fi

has_cuda_torch() {
  [[ -x "$1/bin/python" ]] && "$1/bin/python" -c "
import sys, torch
sys.exit(0 if torch.version.cuda and torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null
}

if has_cuda_torch "$VENV"; then
  echo "== reusing $VENV =="
else
  echo "== creating $VENV with the CUDA build of torch==$TORCH_VERSION =="
  ${PYTHON:-python3} -m venv "$VENV"
  # --isolated: ignore any pip config that points at a local CPU-only torch wheel.
  "$VENV/bin/pip" install --isolated --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" numpy setuptools ninja pybind11
  has_cuda_torch "$VENV" || { echo "cuda_check: $VENV has no CUDA build of torch" >&2; exit 1; }
fi
VENV=$(cd "$VENV" && pwd)
PY=$VENV/bin/python
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null

# torch's CUDA headers include cuBLAS / cuSPARSE headers, which the pip wheels ship.
NVIDIA_INCLUDES=$("$PY" - <<'EOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu[0-9]*", "include")))
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
print(":".join(dict.fromkeys(dirs)))
EOF
)
export CPATH=${NVIDIA_INCLUDES}${CPATH:+:$CPATH}
export TORCH_CUDA_ARCH_LIST=$ARCHS KDFAST_CUDA_ARCHS=$ARCHS KDFAST_CUDA=1 KDFAST_PTXAS_VERBOSE=1

# Scratch copy; file times are kept, so ninja recompiles only what changed.
BUILD=${KDFAST_CUDA_CHECK_DIR:-$VENV/kdfast-build}
mkdir -p "$BUILD"
rm -rf "$BUILD/csrc" "$BUILD/kdfast"
tar -C "$ROOT" --exclude='*.so' --exclude='__pycache__' -cf - csrc kdfast setup.py pyproject.toml \
  | tar -C "$BUILD" -xf -
# ninja would skip an unchanged .cu file, and its ptxas report with it.
if [[ -d "$BUILD/build" ]]; then
  find "$BUILD/build" -path '*/csrc/cuda/*.o' -delete
fi

echo "== building kdfast with CUDA kernels for $ARCHS in $BUILD (MAX_JOBS=$MAX_JOBS) =="
build_start=$SECONDS
(cd "$BUILD" && "$PY" setup.py build_ext --inplace > build.log 2>&1) || {
  tail -n 60 "$BUILD/build.log" >&2
  echo "cuda_check: build failed (full log: $BUILD/build.log)" >&2
  exit 1
}
echo "built in $((SECONDS - build_start)) s"

echo "== registers, stack and spills per kernel (ptxas -v) =="
# Run to the end either way; the spill verdict decides the exit status at the end.
ptxas_status=0
"$PY" "$ROOT/.ci/ptxas_report.py" "$BUILD/build.log" || ptxas_status=$?

SO=$(ls "$BUILD"/kdfast/_C*.so)
if [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
  echo "== device code in $(basename "$SO") =="
  ELF=$("$CUDA_HOME/bin/cuobjdump" --list-elf "$SO" | sed -E 's/.*\.(sm_[0-9]+a?)\..*/\1/' | sort | uniq -c)
  echo "$ELF"
  for arch in ${ARCHS//;/ }; do
    sm="sm_${arch//[.+PTX]/}"
    grep -q " $sm\$" <<<"$ELF" || { echo "cuda_check: no $sm device code in $SO" >&2; exit 1; }
  done
else
  echo "(no cuobjdump in $CUDA_HOME/bin: skipping the per-architecture device-code check)"
fi

echo "== CUDA kernels registered for every kdfast op =="
(cd "$BUILD" && "$PY" - <<'EOF'
import sys
import torch
import kdfast
import kdfast._C as C

print(f"kdfast._C.with_cuda = {C.with_cuda}, cuda_archs = {C.cuda_archs!r}")
if not C.with_cuda:
    sys.exit("cuda_check: kdfast._C was built without CUDA kernels")
if hasattr(torch._C, "_dispatch_get_all_op_names"):
    ops = sorted(o for o in torch._C._dispatch_get_all_op_names() if o.startswith("kdfast::"))
else:  # older torch: the ops this build defines
    ops = [f"kdfast::{name}" for name in ("kd_loss_fused", "kd_loss_backward", "kd_loss_scale_grad_",
                                          "dkd_loss_fused", "dkd_loss_backward", "feature_loss_fused",
                                          "feature_loss_backward", "attention_transfer_fused",
                                          "attention_transfer_backward")]
if not ops:
    sys.exit("cuda_check: no kdfast ops are registered")
missing = []
for op in ops:
    dump = torch._C._dispatch_dump(op)
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    print(f"{op}: {cuda[0] if cuda else 'NO CUDA KERNEL'}")
    if not cuda:
        missing.append(op)
if missing:
    sys.exit(f"cuda_check: no CUDA kernel registered for {missing}")
print(f"ok: {len(ops)} ops, each with a CUDA kernel")
EOF
) 2> >(grep -v "No CUDA runtime is found" >&2)

if (( ptxas_status != 0 )); then
  echo "cuda_check: the ptxas report failed (status $ptxas_status, see above)" >&2
  exit "$ptxas_status"
fi
echo "== cuda_check done in $((SECONDS - start)) s =="

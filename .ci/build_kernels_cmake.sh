#!/usr/bin/env bash
# Configure, build and test the torch-free CUDA kernels with CMake in a temporary directory.
#
#   .ci/build_kernels_cmake.sh            # archs "80;90a", warnings are errors
#   CUDA_ARCHS=90a PYTHON=python3 .ci/build_kernels_cmake.sh
#
# Needs nvcc and cmake, and cuBLAS headers/libraries: from the CUDA toolkit, or from the nvidia
# pip wheels next to torch (found through $PYTHON). ctest runs the GPU test (reported as skipped,
# exit code 77, without a usable GPU) and the host-emulation test (runs everywhere).
# KEEP_BUILD=1 keeps the build directory and prints its path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Python whose nvidia pip wheels hold cuBLAS: $PYTHON, else the first of python/python3 on
# PATH that has them (an activated venv comes first), else whatever python there is.
if [[ -z "${PYTHON:-}" ]]; then
  for cand in python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import nvidia" >/dev/null 2>&1; then
      PYTHON="$(command -v "$cand")"
      break
    fi
  done
  PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
fi
CUDA_ARCHS="${CUDA_ARCHS:-80;90a}"
JOBS="${JOBS:-2}"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "build_kernels_cmake: nvcc not found on PATH" >&2
  exit 1
fi
# nvcc on PATH may be a wrapper script; CMake needs the real compiler inside the toolkit.
if [[ -z "${CUDACXX:-}" ]]; then
  for cand in "$(dirname "$(dirname "$(command -v nvcc)")")/cuda/bin/nvcc" \
              "$(dirname "$(readlink -f "$(command -v nvcc)")")/nvcc" \
              /usr/local/cuda/bin/nvcc; do
    if [[ -x "$cand" ]] && "$cand" --version >/dev/null 2>&1; then
      CUDACXX="$(readlink -f "$cand")"
      break
    fi
  done
fi
export CUDACXX="${CUDACXX:-$(command -v nvcc)}"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/muon_ext_cmake.XXXXXX")"
cleanup() {
  if [[ "${KEEP_BUILD:-0}" == "1" ]]; then
    echo "build_kernels_cmake: build kept in $BUILD"
  else
    rm -rf "$BUILD"
  fi
}
trap cleanup EXIT

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

echo "== configure ($CUDACXX, archs $CUDA_ARCHS)"
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" \
  -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared \
  -DMUON_EXT_PYTHON="$PYTHON" \
  -DMUON_EXT_WERROR=ON
echo "== build"
cmake --build "$BUILD" -j "$JOBS"
echo "== test"
ctest --test-dir "$BUILD" --output-on-failure --timeout 1200

#!/usr/bin/env bash
# GPU validation of muon_ext in one command, for a bare GPU machine (torch with CUDA, nvcc,
# ninja, pytest, cmake, compute-sanitizer; nothing is downloaded):
#
#   bash benchmarks/gpu_suite.sh            # results in $OUT, else benchmarks/results/<date>-<gpu>/
#
# Stages (each logs to <stage>.log, records pass/fail/skip and its duration; a failed stage does
# not stop the next one; the script exits non-zero at the end if any stage failed):
#   env                  GPU, driver, torch/CUDA/nvcc/cuBLAS versions, date, commit -> env.json
#   build                python setup.py build_ext --inplace for the local GPU's arch
#   registration         the compiled module loads and has CUDA kernels for both ops
#   pytest_cuda          pytest -m cuda (the CUDA tests only)
#   pytest_all           the whole test suite
#   cmake_ctest          the torch-free kernels with CMake + ctest (GPU test and host emulation)
#   memcheck_kernels     compute-sanitizer memcheck on the C++ kernel test (no torch)
#   racecheck_kernels    compute-sanitizer racecheck on the C++ kernel test
#   synccheck_kernels    compute-sanitizer synccheck on the C++ kernel test
#   memcheck_step        compute-sanitizer memcheck on benchmarks/sanitizer_step.py (no caching
#                        allocator, so every tensor is its own allocation)
#   racecheck_step       compute-sanitizer racecheck on benchmarks/sanitizer_step.py
#   bench_step, bench_newton_schulz   the benchmark scripts, when they exist
#   bench_gram           Gram vs standard Newton-Schulz: the Kimi-K2 expert bucket (216 x
#                        2048x7168) alone, and the GPT-2 small / Llama-3-8B layer steps with
#                        standard, gram and auto (the numbers that set "auto"'s CUDA thresholds)
# Knobs: PYTHON (default python), MAX_JOBS (default: all cores), STAGES (space-separated subset),
# BENCH_ARGS (extra arguments for both benchmark scripts).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
JOBS="${MAX_JOBS:-$(nproc)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/muon_ext_gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- where results go ---------------------------------------------------------------------
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
GPU_NAME="${GPU_NAME:-$("$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)}"
GPU_NAME="${GPU_NAME:-unknown-gpu}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
if [[ -n "${OUT:-}" ]]; then
  OUTDIR="$OUT"
else
  GPU_SLUG="$(echo "$GPU_NAME" | tr -c 'A-Za-z0-9._-' '-' | sed 's/-\+/-/g;s/-$//')"
  OUTDIR="$ROOT/benchmarks/results/${STAMP}-${GPU_SLUG}"
fi
mkdir -p "$OUTDIR"
echo "gpu_suite: results in $OUTDIR"

# nvcc on PATH may be a wrapper script: the toolkit root is the `cuda` folder beside its prefix.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  prefix="$(dirname "$(dirname "$(command -v nvcc)")")"
  real_prefix="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  for cand in "$prefix/cuda" "$prefix" "$real_prefix"; do
    if [[ -f "$cand/include/cuda_runtime.h" ]]; then export CUDA_HOME="$cand"; break; fi
  done
fi
CAP="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
CAP="${CAP:-9.0}"
CMAKE_ARCH="${CAP/./}"

# ---- stage bookkeeping ----------------------------------------------------------------------
STAGE_NAMES=()
STAGE_STATUS=()
STAGE_SECONDS=()
FAILED=0

wanted() {
  [[ -z "${STAGES:-}" ]] && return 0
  [[ " $STAGES " == *" $1 "* ]]
}

# run_stage NAME CMD...: runs CMD with output in NAME.log; status from its exit code.
run_stage() {
  local name="$1"
  shift
  if ! wanted "$name"; then return 0; fi
  local log="$OUTDIR/$name.log" start end rc status
  echo "== $name"
  start=$(date +%s)
  ("$@") >"$log" 2>&1
  rc=$?
  end=$(date +%s)
  if [[ $rc -eq 0 ]]; then status=pass; else status="FAIL(rc=$rc)"; FAILED=1; fi
  STAGE_NAMES+=("$name")
  STAGE_STATUS+=("$status")
  STAGE_SECONDS+=("$((end - start))")
  echo "   $status in $((end - start)) s"
  if [[ $rc -ne 0 ]]; then tail -n 15 "$log" | sed 's/^/   | /'; fi
}

skip_stage() {
  if ! wanted "$1"; then return 0; fi
  echo "== $1: skipped ($2)"
  STAGE_NAMES+=("$1")
  STAGE_STATUS+=("skip: $2")
  STAGE_SECONDS+=(0)
}

# ---- stages ---------------------------------------------------------------------------------
stage_env() {
  nvidia-smi || true
  "$PY" - "$OUTDIR/env.json" "$GPU_NAME" <<'PYEOF'
import datetime, json, platform, shutil, subprocess, sys
import torch

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as exc:  # a tool that is missing is recorded as such
        return f"unavailable ({exc.__class__.__name__})"

smi = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
          "--format=csv,noheader")
try:
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
except Exception as exc:  # no usable GPU: still record everything else
    capability = f"unavailable ({exc.__class__.__name__})"
env = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": run("git", "rev-parse", "HEAD") or "unknown",
    "git_dirty": bool(run("git", "status", "--porcelain")),
    "gpu": sys.argv[2],
    "nvidia_smi": smi,
    "driver": smi.split(",")[1].strip() if smi.count(",") >= 1 else "unknown",
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "device_capability": capability,
    "nvcc": run("nvcc", "--version").splitlines()[-1:] ,
    "compute_sanitizer": run("compute-sanitizer", "--version").splitlines()[-1:],
    "cmake": run("cmake", "--version").splitlines()[:1],
    "python": platform.python_version(),
    "host": platform.node(),
    "cpus": __import__("os").cpu_count(),
}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
sys.exit(0 if torch.cuda.is_available() else 1)  # recorded either way; no GPU is a failure
PYEOF
}

stage_build() {
  echo "CUDA_HOME=${CUDA_HOME:-<unset>} TORCH_CUDA_ARCH_LIST=$CAP MAX_JOBS=$JOBS"
  # A fresh build directory (so the warning count covers every file); the .so lands in place.
  CUDA_HOME="${CUDA_HOME:-}" TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS="$JOBS" \
    "$PY" setup.py build_ext --inplace --build-temp "$WORK/build-temp"
  local rc=$?
  echo "compiler warnings in this build: $(grep -ciE 'warning[: ]' "$OUTDIR/build.log" || true)"
  return $rc
}

stage_registration() {
  "$PY" - <<'PYEOF'
import torch, muon_ext
info = muon_ext.build_info()
print(info)
assert info["available"] and info["with_cuda"], "the extension was built without CUDA"
for op in ("muon_ext::muon_step_", "muon_ext::newton_schulz"):
    ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    print(op, "CUDA kernel:", ok)
    assert ok
x = torch.randn(2, 8, 16, device="cuda")
y = torch.ops.muon_ext.newton_schulz(x, [3.4445, -4.775, 2.0315] * 5, 1e-7)
torch.cuda.synchronize()
assert torch.isfinite(y).all()
print("smoke newton_schulz OK")
PYEOF
}

stage_pytest_cuda() {
  timeout 3600 "$PY" -m pytest tests -m cuda -q -rfEs -p no:cacheprovider \
    --junitxml="$OUTDIR/pytest_cuda.xml"
}

stage_pytest_all() {
  timeout 5400 "$PY" -m pytest tests -q -rfE -p no:cacheprovider \
    --junitxml="$OUTDIR/pytest_all.xml"
}

stage_cmake_ctest() {
  cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$CMAKE_ARCH" -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared \
    -DMUON_EXT_PYTHON="$PY" -DMUON_EXT_WERROR=ON || return 1
  cmake --build "$WORK/cmake" -j "$JOBS" || return 1
  ctest --test-dir "$WORK/cmake" --output-on-failure --timeout 1200 || return 1
  # ctest counts a skip (exit 77) as a pass; on a GPU machine the GPU test must really run.
  echo "== test_muon_kernels again, where a skip is a failure"
  "$WORK/cmake/test_muon_kernels"
}

sanitize_kernels() {  # sanitize_kernels TOOL
  local bin="$WORK/cmake/test_muon_kernels"
  if [[ ! -x "$bin" ]]; then echo "no $bin (cmake_ctest failed or was skipped)"; return 1; fi
  MUON_EXT_TEST_SEED=1 timeout 3600 compute-sanitizer --tool "$1" --error-exitcode 99 "$bin"
}

sanitize_step() {  # sanitize_step TOOL
  MUON_EXT_TEST_SEED=1 timeout 3600 compute-sanitizer --tool "$1" --error-exitcode 99 \
    "$PY" "$ROOT/benchmarks/sanitizer_step.py"
}

stage_memcheck_kernels() { sanitize_kernels memcheck; }
stage_racecheck_kernels() { sanitize_kernels racecheck; }
stage_synccheck_kernels() { sanitize_kernels synccheck; }
stage_memcheck_step() { PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize_step memcheck; }
stage_racecheck_step() { sanitize_step racecheck; }

stage_bench() {  # stage_bench SCRIPT
  # shellcheck disable=SC2086
  timeout 5400 "$PY" "$ROOT/benchmarks/$1" --out-dir "$OUTDIR/bench" --label "gpu_suite $STAMP" \
    ${BENCH_ARGS:-}
}

stage_bench_gram() {
  timeout 3600 "$PY" -m muon_ext.bench ns --shapes 2048x7168 --batch 216 --presets jordan \
    --algorithm standard gram --ns-impl muon_ext torch_bmm --out-dir "$OUTDIR/bench" \
    --label "gpu_suite $STAMP gram ns" &&
    timeout 3600 "$PY" -m muon_ext.bench step --suite gpt2_small llama3_8b_layer --impl muon_ext \
      torch_muon --algorithm standard gram auto --out-dir "$OUTDIR/bench" \
      --label "gpu_suite $STAMP gram step"
}

# ---- run ------------------------------------------------------------------------------------
run_stage env stage_env
run_stage build stage_build
run_stage registration stage_registration
run_stage pytest_cuda stage_pytest_cuda
run_stage pytest_all stage_pytest_all
if command -v cmake >/dev/null 2>&1; then
  run_stage cmake_ctest stage_cmake_ctest
else
  skip_stage cmake_ctest "cmake not found"
fi
if command -v compute-sanitizer >/dev/null 2>&1; then
  run_stage memcheck_kernels stage_memcheck_kernels
  run_stage racecheck_kernels stage_racecheck_kernels
  run_stage synccheck_kernels stage_synccheck_kernels
  run_stage memcheck_step stage_memcheck_step
  run_stage racecheck_step stage_racecheck_step
else
  for s in memcheck_kernels racecheck_kernels synccheck_kernels memcheck_step racecheck_step; do
    skip_stage "$s" "compute-sanitizer not found"
  done
fi
for script in bench_step.py bench_newton_schulz.py; do
  name="${script%.py}"
  if [[ -f "$ROOT/benchmarks/$script" ]]; then
    run_stage "$name" stage_bench "$script"
  else
    skip_stage "$name" "benchmarks/$script does not exist"
  fi
done

run_stage bench_gram stage_bench_gram

# ---- summary --------------------------------------------------------------------------------
{
  for i in "${!STAGE_NAMES[@]}"; do
    printf '%s\t%s\t%s\n' "${STAGE_NAMES[$i]}" "${STAGE_STATUS[$i]}" "${STAGE_SECONDS[$i]}"
  done
} >"$OUTDIR/stages.tsv"
"$PY" - "$OUTDIR" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    stages.append({"stage": name, "status": status, "seconds": int(seconds),
                   "log": f"{name}.log" if not status.startswith("skip") else None})
ok = all(s["status"] == "pass" or s["status"].startswith("skip") for s in stages)
json.dump({"env": env, "stages": stages, "passed": ok}, open(out / "summary.json", "w"), indent=2)
lines = [
    "# muon_ext GPU suite",
    "",
    "| | |",
    "|---|---|",
    f"| GPU | {env.get('gpu', '?')} (sm {env.get('device_capability', '?')}) |",
    f"| driver | {env.get('driver', '?')} |",
    f"| torch / CUDA | {env.get('torch', '?')} / {env.get('torch_cuda', '?')} |",
    f"| nvcc | {' '.join(env.get('nvcc', [])) or '?'} |",
    f"| date (UTC) | {env.get('date_utc', '?')} |",
    f"| commit | {env.get('git_commit', '?')}{' (dirty tree)' if env.get('git_dirty') else ''} |",
    "",
    "| stage | result | seconds | log |",
    "|---|---|---:|---|",
]
for s in stages:
    lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']} | {s['log'] or ''} |")
lines += ["", f"**{'ALL PASSED' if ok else 'FAILURES'}**", ""]
(out / "summary.md").write_text("\n".join(lines))
print("\n".join(lines))
PYEOF

exit "$FAILED"

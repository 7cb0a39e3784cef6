#!/usr/bin/env bash
# CI stage 2: the CPU-only build and the CPU suite (-m "not slow") against a second torch release,
# in a fresh venv, from a copy of the working tree (the main stage's in-tree build stays as it is).
# Usage: .ci/cpu_suite_second_torch.sh [TORCH_VERSION]   (default: MUON_EXT_CI_SECOND_TORCH, else 2.15.0)
# The integrations extra is not installed here: its tests skip (the main stage runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_VERSION=${1:-${MUON_EXT_CI_SECOND_TORCH:-2.15.0}}
PY=${PYTHON:-python3}
WORK="$ROOT/.ci-torch-$TORCH_VERSION"
stage_start=$(date +%s)

rm -rf "$WORK"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked files plus untracked ones git does not ignore: the working tree, without builds.
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  tar -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude='./.ci-torch-*' --exclude=./build \
    --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -xf - -C "$WORK/src"
fi

"$PY" -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade "pip>=24" 2>&1 | tail -n 2 || true
echo "== [torch $TORCH_VERSION] installing torch and build/test dependencies"
start=$(date +%s)
# A machine-wide pip constraint file may cap torch below this release (CI machines cap it at
# 2.14.1, the main stage's version): override the constraint for this venv's install only.
PIP_CONSTRAINT=/dev/null python -m pip install -q --no-cache-dir "torch==$TORCH_VERSION" pybind11 \
  ninja pytest "setuptools>=64" wheel numpy expecttest 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
echo "torch install took $(( $(date +%s) - start )) s"
python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$TORCH_VERSION' else f'torch {torch.__version__} installed, $TORCH_VERSION wanted')"

echo "== [torch $TORCH_VERSION] building muon_ext (CPU only)"
cd "$WORK/src"
start=$(date +%s)
MUON_EXT_FORCE_CPU=1 MAX_JOBS="${MAX_JOBS:-2}" \
  python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
echo "build took $(( $(date +%s) - start )) s"
python -m muon_ext.info
python -c "import sys, muon_ext; b = muon_ext.build_info(); sys.exit(0 if b['torch_version'] == '$TORCH_VERSION' else f'built against {b}')"

echo "== [torch $TORCH_VERSION] CPU suite"
set +e
python -m pytest tests -q -x -m "not slow" -p no:cacheprovider
rc=$?
set -e
echo "torch $TORCH_VERSION stage took $(( $(date +%s) - stage_start )) s"
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"

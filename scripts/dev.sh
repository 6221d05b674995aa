#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (pinned requirements; grad-cam without its
# torchvision dependency), then runs the job asked for.
#   bash scripts/dev.sh space     start the Gradio Space on the bundled model (http://127.0.0.1:7860)
#   bash scripts/dev.sh dataset   build the merged dataset from ../shared into data/cxr-pneumonia
#   bash scripts/dev.sh test      run the whole test suite, as CI does (installs Debian's chromium for the
#                                 browser test when apt-get is usable; without it that test is skipped);
#                                 `.venv/bin/pytest` alone runs the fast subset
#   bash scripts/dev.sh setup     only set up .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

setup() {
  local stamp=.venv/.requirements.sha256
  local want
  want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "setting up .venv (first run installs the pinned requirements; a few minutes)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  # the project itself (console commands cxr-*), editable; its dependencies are the pins above
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
}

# The private page (/private/): ONNX Runtime Web from npm, and the bundled model's ONNX export
# (generated, not committed: 70 MB of graphs per release would bloat the repository; the export is
# deterministic from the committed weights and checked against them on the Space's examples).
setup_private() {
  if command -v npm >/dev/null 2>&1; then
    if [ ! -f space/private/node_modules/.package-lock.json ] ||
       ! cmp -s space/private/package-lock.json space/private/node_modules/.stamp-lock 2>/dev/null; then
      echo "installing the private page's npm packages (onnxruntime-web)"
      (cd space/private && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) &&
        cp space/private/package-lock.json space/private/node_modules/.stamp-lock
    fi
  else
    echo "no npm: the private page (/private/) will say its runtime is missing"
  fi
  local want
  want=$(cat space/model/model.safetensors space/model/config.json space/model/scope_check.npz \
         space/model/input_gate.npz modeling/onnx_export.py 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ ! -f space/model/onnx/.source.sha256 ] || [ "$(cat space/model/onnx/.source.sha256)" != "$want" ]; then
    echo "exporting the bundled model to ONNX for the private page (about a minute)"
    # the variants the release's check on all validation films shipped (benchmarks/results/onnx_agreement.json);
    # the examples alone are too few to decide that
    local variants
    variants=$(.venv/bin/python -c "import json; a = json.load(open('benchmarks/results/onnx_agreement.json'))['agreement']; print(','.join(k for k, v in a.items() if v['within_tolerance']))" 2>/dev/null || echo float32)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 .venv/bin/cxr-export --model space/model --onnx \
      --check-images space/examples --variants "${variants:-float32}" >/dev/null && echo "$want" > space/model/onnx/.source.sha256
  fi
}

ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && $sudo true 2>/dev/null; then
    echo "installing Debian's chromium for the browser test"
    ($sudo apt-get install -y -qq chromium >/dev/null 2>&1 ||
      { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq chromium >/dev/null 2>&1; }) ||
      echo "chromium could not be installed: the browser test will be skipped"
  else
    echo "no chromium and no apt-get/sudo: the browser test will be skipped"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup; setup_private ;;
  space)
    setup
    setup_private
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    exec .venv/bin/python -m space.app "$@" ;;
  dataset)
    setup
    exec .venv/bin/python -m dataset_scripts.build \
      --source kermany:../shared/data/kermany \
      --source folders:../shared/data/skytells-covid19-xray --exclude 'TrainData/*' \
      --output-dir data/cxr-pneumonia "$@" ;;
  test)
    setup
    setup_private
    ensure_chromium
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    exec .venv/bin/python -m pytest -m "" "$@" ;;  # all tests (plain `pytest` is the fast subset)
  *) echo "usage: bash scripts/dev.sh {space|dataset|test|setup} [args...]" >&2; exit 2 ;;
esac

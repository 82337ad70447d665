#!/usr/bin/env bash
# The pytorch-ood comparison tests, in a second virtual environment.
#
# Why a second environment: pytorch-ood 0.4.0 imports torchvision at import time, and no
# torchvision imports beside the CPU torch 2.13.0 wheel of the main CI environment. torch 2.14.1
# + torchvision 0.29.1 (a CUDA build, ~5.5 GB installed, lying on this machine's local disk for
# pip) do import, on CPU too. So this script builds a venv with them, pytorch-ood, the test
# dependencies and ood_fast itself (non-editable, built with that venv's setuptools + pybind11),
# and runs only the tests marked `pytorch_ood`. In the main environment those tests skip, each
# with pytorch-ood's import error as the reason.
#
# Usage: bash .ci/peers_env.sh [VENV_DIR]      (default /tmp/ood_fast_peers_venv)
# An existing venv that already imports the pinned torch/torchvision/pytorch-ood is reused
# (only ood_fast is reinstalled); anything else there is rebuilt from scratch.
# Measured on the 2-core CI machine: ~1-2 min from scratch (the torch wheels come from local
# disk), ~25 s when the venv is reused; see the timings the script prints.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${1:-/tmp/ood_fast_peers_venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$SECONDS

TORCH=torch==2.14.1
VISION=torchvision==0.29.1
POOD=pytorch-ood==0.4.0

ready() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch, torchvision, pytorch_ood.detector, sklearn, pytest, safetensors, pybind11
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
assert pytorch_ood.__version__ == "0.4.0", pytorch_ood.__version__
EOF
}

if [ -x "$VENV/bin/python" ] && ready; then
    echo "peers env: reusing $VENV"
else
    rm -rf "$VENV"
    python -m venv "$VENV"
    # --no-compile: no .pyc for the thousands of torch files up front (tests compile what they use)
    "$VENV/bin/python" -m pip install -q --no-compile "$TORCH" "$VISION"
    # pytorch-ood's own requirements are numpy, scipy, torch, torchvision, typing_extensions.
    "$VENV/bin/python" -m pip install -q --no-compile "$POOD" \
        "setuptools>=77" "pybind11>=2.12" wheel \
        numpy scipy scikit-learn typing_extensions safetensors tqdm pytest
    ready || { echo "peers env: pytorch-ood still does not import in $VENV" >&2; exit 1; }
fi
echo "peers env: dependencies ready after $((SECONDS - start)) s"

# ood_fast itself, the CPU extension only (.ci/run compiles the CUDA one), built from a copy of
# the checkout's files so that no build/ folder (with possibly stale objects) is used or left.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC" 2>/dev/null \
    || { rm -rf "$SRC"; SRC=$(mktemp -d); cp -r "$REPO"/. "$SRC"; rm -rf "$SRC/build" "$SRC/.git"; }
OOD_FAST_BUILD_CUDA=0 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps \
    --force-reinstall "$SRC"
echo "peers env: ood_fast installed after $((SECONDS - start)) s"

# Run from outside the checkout so that the installed ood_fast is the one under test.
cd /tmp
"$VENV/bin/python" -c "import torch, torchvision, pytorch_ood, ood_fast; \
print('peers env: torch', torch.__version__, '| torchvision', torchvision.__version__, \
'| pytorch-ood', pytorch_ood.__version__, '| ood_fast from', ood_fast.__file__)"
"$VENV/bin/python" -m pytest -q -m pytorch_ood \
    -W "ignore::pytest.PytestUnknownMarkWarning" \
    "$REPO/tests/test_integration_pytorch_ood.py" "$REPO/tests/test_peers.py"
echo "peers env: took $((SECONDS - start)) s in all"

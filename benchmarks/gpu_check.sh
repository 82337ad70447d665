#!/usr/bin/env bash
# The one prepared device check for a lent GPU (H100/H200). Device time is 15 minutes in all,
# so everything here fits in GPU_CHECK_BUDGET seconds (default 450 = 7.5 min): each step runs
# under `timeout`, capped by its own limit and by what is left of the budget, so one hang cannot
# eat the rest. A failed step is logged and the next one still runs (except after a failed
# install). Logs and results go to $OUT (the device tool's output folder; a temp dir otherwise):
#
#   gpu_check.log      one line per step: ok / FAILED rc / skipped, with seconds
#   install.log        OOD_FAST_BUILD_CUDA=1 OOD_FAST_CUDA_ARCHS=90 pip install --no-build-isolation -e .
#   info.log           python -m ood_fast info (backends available / why not)
#   gpu_bench.log      python -m ood_fast bench --gpu: triton and cuda vs the best torch
#                      (cuBLAS) expression, fp32 and bf16, C=1000 D=2048 and C=10 D=512, N=10k,
#                      CUDA events; gpu_results.json holds the rows
#   tests.log          pytest -m gpu tests, then the Triton tests natively (no TRITON_INTERPRET);
#                      the quant kernels' quick selections (CUDA + native Triton) first
#   gpu_quant.log      benchmarks/gpu_quant.py --quick: hadamard / rotate_quantize vs a device
#                      copy, int8 GEMM vs torch._int_mm and bf16 cuBLAS; gpu_quant.json
#   bench_quick.log    python -m ood_fast bench --quick on every backend (estimators end to end)
#
# What the machine needs: torch with CUDA, triton, pybind11, setuptools, pytest, tqdm,
# safetensors, scipy, scikit-learn (all in the nvidia-h200 image, see
# /work/.library/device/KINDS.md); nothing to carry. pytorch-ood is not there: its rows skip.
#
# Run from the device tool:  bash benchmarks/gpu_check.sh     (timeout_s ≥ 510)
# Only some steps (install always needed):  GPU_CHECK_STEPS=install,pytest_quant_quick,gpu_quant \
#     bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
START=$SECONDS
SUMMARY="$OUT/gpu_check.log"
FAILED=()
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # Triton runs natively on the GPU here

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }

# step NAME LOGFILE LIMIT_S COMMAND...: run under timeout(min(LIMIT, budget left)), append to LOGFILE
step() {
    local name=$1 logfile=$2 limit=$3
    shift 3
    if [[ -n "${GPU_CHECK_STEPS:-}" && ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        log "skipped $name: not in GPU_CHECK_STEPS"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        log "skipped $name: budget of ${BUDGET}s spent"
        FAILED+=("$name(skipped)")
        return 1
    fi
    ((limit > left)) && limit=$left
    log "start $name (limit ${limit}s): $*"
    local t0=$SECONDS rc=0
    echo "### $name: $*" >>"$OUT/$logfile"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$logfile" 2>&1 || rc=$?
    if ((rc == 0)); then
        log "ok $name ($((SECONDS - t0))s)"
    else
        ((rc == 124 || rc == 137)) && log "TIMEOUT $name after $((SECONDS - t0))s" \
            || log "FAILED $name rc=$rc ($((SECONDS - t0))s)"
        FAILED+=("$name")
        tail -n 30 "$OUT/$logfile" || true
    fi
    return $rc
}

log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
log "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1)"
log "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not on PATH')"

# 1. install: the CPU extension and the CUDA extension for sm_90, against the preinstalled torch
if ! step install install.log 240 env OOD_FAST_BUILD_CUDA=1 OOD_FAST_CUDA_ARCHS=90 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    log "install failed: nothing else can run"
    exit 1
fi

# 2. what the package sees
step info info.log 60 "$PY" -m ood_fast info || true

# 3. the GPU benchmark (the figures this check exists for)
step gpu_bench gpu_bench.log 180 "$PY" -m ood_fast bench --gpu --no-progress \
    --json "$OUT/gpu_results.json" || true

# 4. correctness on the device: CUDA tests, then Triton natively
# quick selections first (the full CUDA grids hold ~1,000 cases), then the remaining gpu tests
step pytest_gpu_quick tests.log 120 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_mahalanobis_cuda.py -k "D33 or D2048-C37 or ties or chunks or determin" || true
step pytest_knn_quick tests.log 90 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_knn_cuda.py -k quick || true
# rotation quantization (issue 4): quick CUDA + native Triton selections (the full grids are
# for a longer run: pytest tests/test_hadamard_cuda.py, tests/test_*_triton.py)
step pytest_quant_quick tests.log 120 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_hadamard_cuda.py tests/test_hadamard_triton.py tests/test_quant_triton.py \
    -k "quick or bad_arguments" || true
step gpu_quant gpu_quant.log 100 "$PY" benchmarks/gpu_quant.py --quick \
    --json "$OUT/gpu_quant.json" || true
step pytest_gpu_rest tests.log 60 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
    --ignore=tests/test_mahalanobis_cuda.py --ignore=tests/test_knn_cuda.py \
    --ignore=tests/test_hadamard_cuda.py || true
step pytest_triton tests.log 120 "$PY" -m pytest -m triton tests -q -p no:cacheprovider \
    --ignore=tests/test_hadamard_triton.py --ignore=tests/test_quant_triton.py || true

# 5. the estimators end to end on every backend, with the CPU peers (seconds)
step bench_quick bench_quick.log 60 "$PY" -m ood_fast bench --quick --no-progress \
    --backends cpu,torch,cuda,triton --json "$OUT/bench_quick.json" || true

log "done in $((SECONDS - START))s; failed: ${FAILED[*]:-none}"
[[ -f "$OUT/gpu_bench.log" ]] && tail -n 40 "$OUT/gpu_bench.log"
((${#FAILED[@]} == 0))

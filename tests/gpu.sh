#!/bin/bash
# The GPU check, for a machine with CUDA and a PyTorch of its own (CI has no GPU): the CUDA tests, then the whole
# suite, from the repository root with the machine's python3 (bnkit is read from src/, nothing is installed).
# Usage: tests/gpu.sh [LOG_DIR]   (default: gpu-logs). Each stage ends at its time limit with SIGINT, so pytest
# still prints the names of the tests that failed before it; every test's outcome is in LOG_DIR/*.log as it runs.
# JAX stays on the CPU (eight workers each preallocating 75% of the GPU ran Flax tests out of memory), and each
# worker gets two threads (eight workers at the machine's full thread count ran the suite several times slower).
cd "$(dirname "$0")/.." || exit 1
logs=${1:-gpu-logs}
mkdir -p "$logs"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MPLBACKEND=Agg KERAS_BACKEND=torch JAX_PLATFORMS=cpu \
    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
    torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || exit 1
status=0
stage() {  # name, seconds, pytest arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout -s INT -k 20 "$limit" python3 -m pytest -p no:cacheprovider -v -rfEs "$@" >"$logs/$name.log" 2>&1
    local rc=$?
    grep -E "^(FAILED|ERROR)|^=+ .* in [0-9.]+s.* =+$" "$logs/$name.log" | cut -c1-400
    [ $rc -eq 0 ] || { echo "$name: pytest exit status $rc (124/130: stopped at its ${limit}s limit)"; status=1; }
}
stage cuda "${GPU_CUDA_SECONDS:-240}" -n 4 tests/torch/test_cuda.py
stage suite "${GPU_SUITE_SECONDS:-300}" -n 8 --continue-on-collection-errors tests
exit $status

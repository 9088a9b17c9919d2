#!/usr/bin/env bash
# The GPU check of issue 12: the `gpu` tests, then the mix benchmark on random-weight models of real shapes.
#
# Self-contained: needs the repository, a CUDA machine with Python, torch, accelerate, peft, pytest and
# numpy, and the wheel folder .whl/ (transformers and the packages it needs newer than the machine may
# have; see docs/benchmarks.md). No network, no model weights, mixsd not installed (PYTHONPATH=src).
#
#     bash benchmarks/gpu_check.sh        # from the repository root; about 3-5 minutes on one H100
#     bash benchmarks/gpu_check.sh --cpu  # dry run of the same steps on the CPU (tiny shapes), about a minute
#
# MIXSD_WHEELS names another wheel folder (a dry run on a Python other than the GPU machine's 3.12).
# Writes to $OUT when set (else a fresh temporary folder): gpu_check.json (every figure), pytest_gpu.log,
# bench_gpu.log, gpu_tests_figures.json. Exits with the worse of the two steps' statuses.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 2

device=cuda
if [ "${1:-}" = "--cpu" ]; then
    device=cpu
fi
wheel_dir="${MIXSD_WHEELS:-.whl}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
started=$SECONDS
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - started))s] $*"; }

log "installing $wheel_dir into /tmp/site"
shopt -s nullglob
wheels=("$wheel_dir"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: no wheels in $wheel_dir (carry .whl along; docs/benchmarks.md says how to build it)" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || exit 2
export PYTHONPATH="/tmp/site:$PWD/src"
python3 -c "import torch, transformers, mixsd, mixsd.method.targets, mixsd.training.train; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), \
'transformers', transformers.__version__, 'mixsd', mixsd.__file__)" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

log "gpu tests"
figures="$out/gpu_tests_figures.json"
rm -f "$figures"
if [ "$device" = cpu ]; then
    export MIXSD_GPU_TESTS_DEVICE=cpu  # run the gpu tests' code on the CPU instead of skipping them
fi
MIXSD_GPU_FIGURES="$figures" timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -rA \
    -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
log "gpu tests: exit status $tests_rc"

log "mix benchmark"
bench=(--device cuda)
if [ "$device" = cpu ]; then
    bench=(--device cpu --tiny --tokens 16 --batches 4 8)
fi
timeout 300 python3 benchmarks/bench_gpu.py "${bench[@]}" --budget-s 200 --out "$out/gpu_check.json" \
    --merge "$figures" --pytest-rc "$tests_rc" 2>&1 | tee "$out/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}
log "mix benchmark: exit status $bench_rc"

log "done: tests $tests_rc, benchmark $bench_rc; files in $out"
exit $((tests_rc > bench_rc ? tests_rc : bench_rc))

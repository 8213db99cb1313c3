#!/usr/bin/env bash
# Run ON the GPU machine (torch 2.11, triton 3.6, transformers 5.17, no network), in one call:
# install the carried wheels, run the GPU tests, then every benchmark; logs and JSON go to $OUT.
# Each part is time-boxed so that the whole call fits the device tool's 10-minute limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
run() {  # run NAME SECONDS CMD...: time-boxed, logged to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? ($name)"; tail -n 25 "$OUT/$name.log"
}
REPO=$PWD
# From /tmp, so that `apollo_fast` is the installed wheel (kernels/ is mapped to apollo_fast.kernels
# only in an installed package), not the source folder in the current directory.
(cd /tmp && run gpu_tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests")
for bench in benches/apollo_table.py benches/bench_gdn.py benches/bench_frozen_context.py; do
  [ -f "$bench" ] && (cd /tmp && run "$(basename "$bench" .py)" 150 python3 "$REPO/$bench")
done

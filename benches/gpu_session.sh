#!/usr/bin/env bash
# Run ON the GPU machine (torch 2.11, triton 3.6, transformers 5.17, no network) with the carried
# wheels (.whl, made by benches/prepare_gpu_carry.sh). One device call has 10 minutes, a session 30:
# run the parts in separate calls, each under 9 minutes (in this order if time is short):
#   bash benches/gpu_session.sh tests     # pytest -m gpu, every feature
#   bash benches/gpu_session.sh gdn       # benches/bench_gdn.py, then benches/bench_frozen_attention.py
#   bash benches/gpu_session.sh frozen    # benches/bench_frozen_context.py (issue 6's anchors in the same run)
#   bash benches/gpu_session.sh apollo    # benches/apollo_table.py (with the anchors: AdamW, apollo-torch)
# Logs and JSON go to $OUT; each part prints its table last.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
pipt() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pipt /tmp/site .whl/*.whl || exit 1
pipt /tmp/site_fla .whl/fla/*.whl || exit 1  # only for bench_gdn's fla baseline (see prepare_gpu_carry.sh)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

run() {  # run NAME SECONDS CMD...: from /tmp (so `apollo_fast` is the installed wheel, whose kernels/
  # is mapped to apollo_fast.kernels, not the source folder), time-boxed, logged to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  echo "== $name"
  (cd /tmp && timeout "$secs" "$@") > "$OUT/$name.log" 2>&1
  echo "rc=$? ($name)"; tail -n 40 "$OUT/$name.log"
}

case "${1:-tests}" in
  tests)  run gpu_tests 500 python3 -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests" ;;
  apollo) run apollo_table 500 python3 "$REPO/benches/apollo_table.py" ;;
  # bench_gdn at the issue's full grid (4 batches x 4 lengths x 2 head counts, fla autotuning on first use)
  # may not fit with the frozen-context benchmark in one call: batches 1 and 8 first; the rest later.
  gdn)    PYTHONPATH=/tmp/site:/tmp/site_fla run bench_gdn 330 python3 "$REPO/benches/bench_gdn.py" --batches 1 8
          run bench_frozen_attention 180 python3 "$REPO/benches/bench_frozen_attention.py" ;;
  frozen) run bench_frozen_context 500 python3 "$REPO/benches/bench_frozen_context.py" ;;
  *) echo "usage: $0 tests|gdn|frozen|apollo" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session: fills .whl/ (git-ignored) with what the GPU
# image lacks: our own wheel, the official apollo-torch (the baseline), and fla (a baseline).
# Then call the device tool with carry=[".whl"] and command "bash benches/gpu_session.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl/fla
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
get .whl apollo-torch==1.0.3
# fla apart: with fla importable, transformers sends Qwen3.5/Qwen3-Next GDN layers to it, and its
# backward refuses Hopper with Triton 3.6, so only bench_gdn (the fla baseline) sees it.
get .whl/fla fla-core==0.6.0 flash-linear-attention==0.6.0
python3 -m pip wheel -q --no-deps -w .whl .
ls -laR .whl

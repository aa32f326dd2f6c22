#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for bench/onestep_gpu.py and bench/bench_gpu.py (its image has torch,
# accelerate, safetensors, tokenizers and huggingface-hub, not diffusers or peft): downloaded here into .whl/
# (git-ignored through .git/info/exclude) at the versions of constraints.txt, for the device call's `carry: [".whl"]`.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin diffusers)" "$(pin peft)" "$(pin transformers)" "$(pin webdataset)" braceexpand==0.1.7
ls .whl

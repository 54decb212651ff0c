#!/usr/bin/env bash
# The one-GPU check in one command: the released model's size on this machine's GPU, nothing
# downloaded; writes bench/results/gpu-<device>.md. Arguments go to bench/gpu_check.py
# (--size tiny --device cpu runs the same steps on a tiny model, as the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m bench.gpu_check "$@"

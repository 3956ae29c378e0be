#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one JSON + one markdown table, under 10 minutes on one GPU.
#   bench/gpu_check.sh [--out DIR] [--diffusers_scripts DIR]
#   bench/gpu_check.sh --dry-run            # the same code path on the CPU with tiny pipelines
# Python: $PYTHON, else .venv/bin/python, else python3. A machine without diffusers / open_clip
# (the lent GPU image; bitsandbytes for --quantize_base) installs the wheels carried in .whl/ first (docs/benchmarks.md says how).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$PY" -c "import diffusers, open_clip, bitsandbytes" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"

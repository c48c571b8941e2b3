#!/usr/bin/env bash
# The one command a lent GPU machine runs (see BENCHMARKS.md): install what that machine lacks from
# wheels carried in .whl/ (it reaches no registry; make them here with bench/gpu_wheels.sh), then
# the whole GPU session. Results go to $OUT (or ./gpu-session).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-session}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps .whl/*.whl
fi
python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"
python -m bench.gpu_all --out "$out" --budget "${BUDGET:-480}"

#!/usr/bin/env bash
# Training throughput on one lent GPU, in under 10 minutes: the real train step of both phases at
# the official widths (random weights), batch 4 (the paper's) and 8, matmuls/convs in bfloat16
# (the flow stays float32 at HIGHEST precision), then the batch-4 float32 baseline. Prints the
# same table as bench/bench_train.py (first step = compilation + one step; steps/s and images/s
# over the timed steps).
#
# The GPU image has jax, flax, optax, orbax and chex but not grain (+ array-record, portpicker) or
# ml_collections. Prepare their wheels once, here, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record portpicker \
#     ml-collections==1.1.0
# and carry `.whl` with the run: this script installs whatever is in .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

# Each run gets a hard limit so the whole script ends inside 10 minutes.
timeout 300 "$PY" bench/bench_train.py --widths real --batch 4 --steps 10 --precision bfloat16 || echo "bf16 batch 4: stopped ($?)"
timeout 150 "$PY" bench/bench_train.py --widths real --batch 8 --steps 5 --precision bfloat16 || echo "bf16 batch 8: stopped ($?)"
timeout 120 "$PY" bench/bench_train.py --widths real --batch 4 --steps 5 --precision float32 --phases 1 || echo "fp32 batch 4: stopped ($?)"

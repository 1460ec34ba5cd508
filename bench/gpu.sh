#!/usr/bin/env bash
# Every benchmark on one lent GPU in one short run (under about 8 minutes on an H100), printing
# all numbers: the networks and the pipeline in float32 (JAX_DEFAULT_MATMUL_PRECISION=float32, so
# the GPU computes what the CPU parity tests check, not TF32) and in bfloat16 where the bench has
# the mode, then training throughput. Every throughput line carries the fraction of the peak
# measured in the same process (bench/common.py: a float32 4096^3 matmul).
#
# The GPU image has jax, flax, optax, orbax and chex but not grain (+ array-record, portpicker) or
# ml_collections, which the training bench needs. Prepare their wheels once, here, from the
# repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record portpicker \
#     ml-collections==1.1.0
# and carry `.whl` with the run: this script installs whatever is in .whl.
set -uo pipefail
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

# run SECONDS NAME COMMAND...: one bench under a hard limit, so the script ends in time whatever
# one of them does; a failure is printed and the script goes on.
run() {
  local limit=$1 name=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" || echo "== $name: stopped or failed ($?)"
}
F32="env JAX_DEFAULT_MATMUL_PRECISION=float32"

run 60 "G synthesis float32" $F32 "$PY" bench/bench_generator.py --widths real --batches 1,4,8
run 40 "G synthesis bfloat16" "$PY" bench/bench_generator.py --widths real --batches 1,4,8 --precision bfloat16
run 70 "pipeline float32" $F32 "$PY" bench/bench_pipeline.py --widths real --batches 1,4
run 50 "pipeline bfloat16" "$PY" bench/bench_pipeline.py --widths real --batches 1,4 --precision bfloat16
run 40 "encoders float32" $F32 "$PY" bench/bench_encoders.py --only official
run 40 "parser float32" $F32 "$PY" bench/bench_bisenet.py --widths real
# The command line's folder run, batches split over a mesh of every local device. A lent machine
# has one GPU, so this measures the end-to-end path on it; the 2-device equivalence is a CPU test.
run 70 "command line, folder over all devices" "$PY" bench/bench_cli.py --widths real --aligned 16 --photos 4
run 75 "training bfloat16 batch 4" "$PY" bench/bench_train.py --widths real --batch 4 --steps 5 --precision bfloat16
run 45 "training float32 batch 4, phase 1" "$PY" bench/bench_train.py --widths real --batch 4 --steps 3 --precision float32 --phases 1

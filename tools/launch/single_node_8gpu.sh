#!/usr/bin/env bash
# One host with 8 GPUs: one process drives all eight; no coordinator is needed.
#
#   CONFIG=experiments/configs/rm_bt.py:model=llama3.1-8b WORKDIR=runs/rm_8b \
#       bash tools/launch/single_node_8gpu.sh [more run.py flags]
#
# The default mesh (1, -1, 1) puts the 8 GPUs on the fsdp axis, which is what the 8B rows of
# docs/scaling.md assume; pass --config.mesh='(1,4,2)' and the like to change it. Killed and
# started again with the same command, the run resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${CONFIG:?set CONFIG, e.g. experiments/configs/rm_bt.py:model=llama3.1-8b}"
: "${WORKDIR:?set WORKDIR, e.g. runs/rm_8b}"
PYTHON="${PYTHON:-.venv/bin/python}"

# XLA's latency-hiding scheduler overlaps the FSDP all-gathers with compute; the allocator may
# take 95% of each GPU (the plan's totals are sized against that).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

exec "$PYTHON" experiments/run.py \
    --config "$CONFIG" \
    --workdir "$WORKDIR" \
    --config.mesh='(1,-1,1)' \
    "$@"

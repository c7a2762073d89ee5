#!/usr/bin/env bash
# Start the pipeline with one rank per module: K is read from the config.
#
#   launch/torchrun.sh CONFIG.yaml [section.key=value ...]
#
# Several nodes: set NNODES and MASTER_ADDR (a host every node reaches) on every node, and run
# this on each; torchrun's c10d rendezvous numbers the ranks. K must equal NNODES * ranks per node. Extra torchrun flags go in TORCHRUN_ARGS, e.g.
# TORCHRUN_ARGS="--max-restarts=3" together with resume=auto to restart a failed rank by itself.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: launch/torchrun.sh CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
K=$(python -c 'import sys; from trgl_pipe.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).model.num_modules)' "$@")
NNODES=${NNODES:-1}
if [ $((K % NNODES)) -ne 0 ]; then
  echo "error: model.num_modules=$K is not a multiple of NNODES=$NNODES" >&2
  exit 2
fi
PER_NODE=$((K / NNODES))
if [ "$NNODES" -eq 1 ]; then
  exec torchrun --standalone --nproc_per_node="$PER_NODE" ${TORCHRUN_ARGS:-} -m trgl_pipe.run "$@"
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-trgl_pipe}" ${TORCHRUN_ARGS:-} -m trgl_pipe.run "$@"

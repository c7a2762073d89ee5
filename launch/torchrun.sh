#!/usr/bin/env bash
# Start the pipeline with as many ranks as the config's layout needs:
#   (model.num_modules / pipeline.modules_per_rank) x pipeline.replicas
#
#   launch/torchrun.sh CONFIG.yaml [section.key=value ...]
#
# Several nodes: set NNODES and MASTER_ADDR (a host every node reaches) on every node, and run
# this on each; torchrun's c10d rendezvous numbers the ranks, a stage's replicas on neighbouring
# ranks (the same node where possible). The world size must be a multiple of NNODES.
# Extra torchrun flags go in TORCHRUN_ARGS, e.g. TORCHRUN_ARGS="--max-restarts=3" together with
# resume=auto to restart a failed rank by itself.
# Network: across nodes, name the interface the nodes share if a host has several:
#   export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0
# Rendezvous (several nodes): a node waits at most RDZV_JOIN_TIMEOUT_S (default 300) for the others
# to join, and RDZV_READ_TIMEOUT_S (default 60) for an answer from MASTER_ADDR:MASTER_PORT; a wrong
# endpoint (nothing there, or something else listening) ends the launch instead of waiting on.
#
# torchrun runs through python -m trgl_pipe.launch: a failed run ends with one line naming its
# cause (the rank, its modules, the reason) and exits with that cause's code: 2 bad input,
# 3 non-finite loss, 1 any other failure, 143 stopped by SIGTERM, 128+N a rank killed by signal N.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: launch/torchrun.sh CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
WORLD=$(python -c 'import sys
from trgl_pipe.config import load_config
from trgl_pipe.errors import UserError
try:
    c = load_config(sys.argv[1], sys.argv[2:])
except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
print(c.model.num_modules // c.pipeline.modules_per_rank * c.pipeline.replicas)' "$@")
NNODES=${NNODES:-1}
if [ $((WORLD % NNODES)) -ne 0 ]; then
  echo "error: the layout needs $WORLD ranks, not a multiple of NNODES=$NNODES" >&2
  exit 2
fi
PER_NODE=$((WORLD / NNODES))
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}  # SIGTERM → checkpoint time
if [ "$NNODES" -eq 1 ]; then
  exec python -m trgl_pipe.launch --standalone --nproc_per_node="$PER_NODE" ${TORCHRUN_ARGS:-} \
    -m trgl_pipe.run "$@"
fi
exec python -m trgl_pipe.launch --nnodes="$NNODES" --nproc_per_node="$PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-trgl_pipe}" \
  --rdzv-conf="join_timeout=${RDZV_JOIN_TIMEOUT_S:-300},read_timeout=${RDZV_READ_TIMEOUT_S:-60}" \
  ${TORCHRUN_ARGS:-} -m trgl_pipe.run "$@"

#!/bin/bash
# Multi-node pretraining without Slurm: run this on every node, with the same RDZV endpoint (node 0's address).
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash recipes/slurm/torchrun-multinode.sh recipes/llama-1b.yaml /shared/runs/a
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash recipes/slurm/torchrun-multinode.sh recipes/llama-1b.yaml /shared/runs/a
#
# The same with llmkit's own flags (it relaunches through `accelerate launch`):
#   llmkit pretrain --config RECIPE --out RUN --num-processes 8 --num-machines 2 --machine-rank $NODE_RANK \
#                   --main-process-ip $MASTER_ADDR --resume auto
set -euo pipefail
RECIPE=${1:?recipe YAML}
RUN=${2:?run directory on shared storage}
NNODES=${NNODES:-2}
NPROC=${NPROC:-8}
torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
  -m llmkit pretrain --config "$RECIPE" --out "$RUN" --resume auto

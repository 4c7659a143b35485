#!/usr/bin/env bash
# One node of a multi-node job, without ssh: run it on every node of the hostfile, each with its
# NODE_RANK (0 = the first host, which runs rank 0). The DeepSpeed launcher on each node starts that
# node's ranks; they meet at MASTER_ADDR:MASTER_PORT (default: the first host, port 29500).
#
#   NODE_RANK=0 HOSTFILE=hostfile launch/node.sh -- --config configs/distilbiobert.yaml   # on node-a
#   NODE_RANK=1 HOSTFILE=hostfile launch/node.sh -- --config configs/distilbiobert.yaml   # on node-b
#
# DeepSpeed launcher flags go before "--" (e.g. --exclude node-b:7), training flags after it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# DeepSpeed's runner ignores TERM here: when every process of the job is signalled (Slurm), it must
# outlive its ranks while they save, or the job step ends, and Slurm kills them, when it exits.
trap '' TERM
: "${NODE_RANK:?set NODE_RANK to the index of this node in the hostfile, counting from 0}"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${launcher_args[@]}" \
    "$repo/launch/train.py" "${train_args[@]}"

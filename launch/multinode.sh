#!/usr/bin/env bash
# A multi-node job from one command on the first node: DeepSpeed reaches every host of the hostfile
# through pdsh over ssh (the default; needs passwordless ssh), or through MPI (LAUNCHER=openmpi or
# mpich: mpirun starts every rank; biodistill reads its rank through mpi4py).
#
#   HOSTFILE=hostfile launch/multinode.sh -- --config configs/distilbiobert.yaml
#   LAUNCHER=openmpi HOSTFILE=hostfile launch/multinode.sh -- --config configs/distilbiobert.yaml
#   HOSTFILE=hostfile launch/multinode.sh --exclude node-b:6,7 -- --config configs/distilbiobert.yaml
#
# DeepSpeed launcher flags go before "--" (--include/--exclude, --launcher_args "..."), training flags
# after it. Variables every rank needs (HF_HOME, NCCL_SOCKET_IFNAME, ...) go in .deepspeed_env.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LAUNCHER="${LAUNCHER:-pdsh}"
case "$LAUNCHER" in
    pdsh | openmpi | mpich) ;;
    *) echo "biodistill: error: LAUNCHER: '$LAUNCHER' is not one of pdsh, openmpi, mpich" >&2; exit 2 ;;
esac
exec deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${launcher_args[@]}" \
    "$repo/launch/train.py" "${train_args[@]}"

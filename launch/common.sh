# Shared by the launch wrappers (sourced, not run). Splits "$@" at "--" into the DeepSpeed launcher's
# own flags (before) and the training flags (after), finds the hostfile and the master address, and
# exports .deepspeed_env so that every mode sees the same variables (DeepSpeed itself exports that file
# only for its pdsh and MPI runners, not for --no_ssh or Slurm).
#
# SIGUSR1 is the ranks' "save and stop" signal (exit 75, resume me; engine/runtime/preempt.py): the
# launcher chain ignores it (an ignored signal stays ignored across exec; the ranks take it themselves),
# so signalling every process of a job reaches only the ranks, and the launcher, never signalled itself,
# passes their exit code 75 on. SIGTERM stays the launcher's: it forwards it to its ranks and waits.
trap '' USR1

launcher_args=()
train_args=()
if [[ " $* " == *" -- "* ]]; then
    while (($#)) && [[ "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
    shift
fi
train_args=("$@")

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${HOSTFILE:-hostfile}"
if [[ ! -r "$HOSTFILE" ]]; then
    echo "biodistill: error: HOSTFILE: cannot read '$HOSTFILE' (lines like 'node-a slots=8'; see launch/hostfile.example)" >&2
    exit 2
fi
first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")"
if [[ -z "$first_host" ]]; then
    echo "biodistill: error: HOSTFILE: '$HOSTFILE' lists no host" >&2
    exit 2
fi
export MASTER_ADDR="${MASTER_ADDR:-$first_host}"   # rank 0 runs on the first host
export MASTER_PORT="${MASTER_PORT:-29500}"

# DeepSpeed's search order: ~/.deepspeed_env, then ./.deepspeed_env (later wins); DS_ENV_FILE renames it.
for env_file in "$HOME/${DS_ENV_FILE:-.deepspeed_env}" "./${DS_ENV_FILE:-.deepspeed_env}"; do
    [[ -f "$env_file" ]] || continue
    while IFS='=' read -r key value; do
        [[ -n "$key" ]] && export "$key=$value"
    done < "$env_file"
done

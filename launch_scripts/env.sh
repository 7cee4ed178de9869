# Sourced by pretrain.sh and pretrain_multinode.sh: the environment knobs every launch passes through.
#
# Communication knobs (set them in your shell or sbatch file; they reach every rank):
#   NCCL_SOCKET_IFNAME=eth0        network interface NCCL bootstraps on (multi-homed nodes: pick the fast one)
#   GLOO_SOCKET_IFNAME=eth0        the same for gloo (CPU runs, and DeepSpeed's/torch's CPU-side groups)
#   NCCL_IB_HCA=mlx5               InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP
#   NCCL_DEBUG=INFO                NCCL prints its topology and transport choices (first thing to try on a hang)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1   a failed/timed-out collective aborts the process instead of hanging
#   TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=600   watchdog: kill a rank stuck in a collective for this long
#   TORCH_DISTRIBUTED_DEBUG=DETAIL extra checks on mismatched collectives (slow; debugging only)
#   MASTER_PORT=29500              rendezvous port on the master node
#
# How long a collective may wait is a config key, not an environment variable (every process group gets it,
# DeepSpeed's too): train.dist_timeout_s (start-up and the first step, default 1800 s), then
# train.step_timeout_s (from step 2 on; null = the same). Pass them as overrides: train.step_timeout_s=600.
#
# Signals: SIGUSR1 is ignored by the launcher processes started from here (the setting is inherited across
# exec), while the training processes install their own handler (pretrain.preemption). So SIGUSR1 sent to the
# whole process group or slurm job step (`kill -USR1 -PGID`, `scancel --signal=USR1 JOBID`) reaches only the
# trainers: they checkpoint at the next step boundary and exit 0, and so does the launcher. SIGTERM also makes
# the trainers checkpoint, but the launchers react to it themselves: torchrun forwards it, kills after 30 s and
# exits 1; the single-node `deepspeed` command just dies and leaves its children running (signal the group).
trap '' USR1

PASSTHROUGH_VARS="NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG
TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC TORCH_DISTRIBUTED_DEBUG
OMP_NUM_THREADS PYTHONPATH"

# The GPUs this job may use (CUDA_VISIBLE_DEVICES if set, else all on the node), else 2 processes on a CPU.
default_nproc() {
    local n=0
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
    if [ "${n:-0}" -gt 0 ]; then echo "$n"; else echo 2; fi
}

# deepspeed's ssh/pdsh launch forwards only NCCL_*/PYTHON* variables to the other nodes; the rest of the knobs
# above go through a DS_ENV_FILE (DeepSpeed's .deepspeed_env mechanism).
write_deepspeed_env() {
    local file
    file=$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")
    for v in $PASSTHROUGH_VARS; do
        if [ -n "${!v:-}" ]; then echo "$v=${!v}" >>"$file"; fi
    done
    export DS_ENV_FILE=$file
}

run() {
    echo "+ $*" >&2
    exec "$@"
}

# preflight WORLD_SIZE CONFIG [section.key=value ...]: pretrain.preflight checks the config, the layout and the data
# once, in this one process, before any rank starts: a bad run is one line ("error: ...", exit 2) instead of a
# launcher traceback per rank. PREFLIGHT=0 skips it (pretrain.sbatch runs it before srun and skips it per node).
preflight() {
    if [ "${PREFLIGHT:-1}" = 0 ]; then return 0; fi
    local world=$1 config=$2
    shift 2
    "${PYTHON:-python3}" -m pretrain.preflight --world-size "$world" --config "$config" "$@" || exit 2
}

# Processes a DeepSpeed hostfile starts: the sum of its slots= counts.
hostfile_slots() {
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, kv, "="); n += kv[2] } } END { print n + 0 }' "$1"
}

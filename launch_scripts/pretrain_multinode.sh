#!/usr/bin/env bash
# Pretrain on several nodes. Two ways:
#
# 1. From one node, over ssh (DeepSpeed's default, pdsh): every host in HOSTFILE starts its share.
#      HOSTFILE=launch_scripts/hostfile.example CONFIG=deepseek-v2-lite launch_scripts/pretrain_multinode.sh
#    MASTER_ADDR defaults to the first host's address (asked over ssh).
#
# 2. On every node, this node's share (what slurm's srun or any scheduler calls; no ssh needed):
#      NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch_scripts/pretrain_multinode.sh
#    LAUNCHER=torchrun (default here) or deepspeed (runs `deepspeed --no_ssh --node_rank`, with HOSTFILE if
#    given, else a generated one of NNODES x NPROC_PER_NODE slots).
#
#   NPROC_PER_NODE  processes per node (default: the GPUs present, else 2 on a CPU)
#   CONFIG          preset name or YAML path (default: tiny)
#   MODULE          the trainer (default pretrain.train; posttrain.sft, posttrain.rm, posttrain.dpo)
#   arguments       config overrides, section.key=value
# Communication knobs and signal handling: see env.sh. The run directory (train.output_dir) must be on a
# filesystem every node sees: checkpoints are written by all ranks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
CONFIG=${CONFIG:-tiny}
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-pretrain.train}
[ "$MODULE" = pretrain.train ] || PREFLIGHT=0  # posttrain.* check their jsonl data on every rank
TRAIN=(--module "$MODULE" --config "$CONFIG" "$@")

if [ -z "${NODE_RANK:-}" ]; then
    # Way 1: one command for the whole cluster, over ssh.
    : "${HOSTFILE:?set HOSTFILE (way 1), or NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (way 2)}"
    preflight "$(hostfile_slots "$HOSTFILE")" "$CONFIG" "$@"
    write_deepspeed_env
    run deepspeed --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
        --master_port "$MASTER_PORT" --no_local_rank "${TRAIN[@]}"
fi

# Way 2: this node's share.
: "${NNODES:?set NNODES (the number of nodes)}" "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0)}"
preflight "$((NNODES * NPROC_PER_NODE))" "$CONFIG" "$@"
case "${LAUNCHER:-torchrun}" in
    torchrun)
        run torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m "$MODULE" --config "$CONFIG" "$@" ;;
    deepspeed)
        if [ -z "${HOSTFILE:-}" ]; then
            # --no_ssh only needs the slot counts in node order; the names are labels.
            HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/hostfile.XXXXXX")
            for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC_PER_NODE" >>"$HOSTFILE"; done
        fi
        run deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
            --master_port "$MASTER_PORT" --no_local_rank "${TRAIN[@]}" ;;
    *)
        echo "LAUNCHER=$LAUNCHER: use torchrun or deepspeed" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Pretrain on one node.
#
#   CONFIG=small-moe launch_scripts/pretrain.sh train.steps=100 data.paths=[data/shards]
#
#   LAUNCHER        deepspeed (default) or torchrun
#   NPROC_PER_NODE  processes on this node (default: the GPUs present, else 2 on a CPU); with the deepspeed
#                   launcher and CUDA_VISIBLE_DEVICES set, one process per visible GPU instead
#   CONFIG          preset name or YAML path (default: tiny)
#   MASTER_PORT     rendezvous port (default 29500)
#   MODULE          the trainer (default pretrain.train; posttrain.sft, posttrain.rm, posttrain.dpo)
#   arguments       config overrides, section.key=value
# Communication knobs and signal handling: see env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

LAUNCHER=${LAUNCHER:-deepspeed}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(default_nproc)}
CONFIG=${CONFIG:-tiny}
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-pretrain.train}
# posttrain.* read jsonl, not shards: they run their own checks on every rank, before any process group.
[ "$MODULE" = pretrain.train ] || PREFLIGHT=0

case "$LAUNCHER" in deepspeed | torchrun) ;; *)
    echo "LAUNCHER=$LAUNCHER: use deepspeed or torchrun" >&2; exit 2 ;;
esac
preflight "$NPROC_PER_NODE" "$CONFIG" "$@"

case "$LAUNCHER" in
    deepspeed)
        # --num_gpus also sets the process count on a CPU (DeepSpeed's CPU accelerator). With --num_gpus DeepSpeed
        # would drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1, so a restricted set is passed as --include.
        if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
            DEVICES=(--include "localhost:$CUDA_VISIBLE_DEVICES")
        else
            DEVICES=(--num_gpus "$NPROC_PER_NODE")
        fi
        # LOCAL_RANK is in the environment: no --local_rank argument.
        run deepspeed "${DEVICES[@]}" --master_port "$MASTER_PORT" --no_local_rank \
            --module "$MODULE" --config "$CONFIG" "$@" ;;
    torchrun)
        run torchrun --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" --master_addr 127.0.0.1 \
            --master_port "$MASTER_PORT" -m "$MODULE" --config "$CONFIG" "$@" ;;
    *)
        echo "LAUNCHER=$LAUNCHER: use deepspeed or torchrun" >&2; exit 2 ;;
esac

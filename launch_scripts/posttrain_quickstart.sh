#!/usr/bin/env bash
# Post-training end to end on the CPU, TOY SCALE (a ~1M-parameter MoE model; minutes on 2 cores, not a recipe):
#   verifiable tasks made here (posttrain.arithmetic --task copy: "repeat 482130" -> "482130", 3000 training items,
#   500 held-out ones never trained on; TASK=add, "347+5=", is out of this budget's reach)
#   -> tokenizer + shards of the training items as text -> pretraining of a small tiny-preset model (base)
#   -> posttrain.sft (chat template, loss on the answers; 2 epochs: good but imperfect, its mistakes are mostly the
#   near misses the preference pairs reject) -> posttrain.rm (reward model on correct vs near-miss answers)
#   -> posttrain.dpo (from the SFT model) -> held-out numbers (posttrain.evaluate): exact match of greedy answers
#   (base, SFT, DPO), reward-model accuracy, preference accuracy, DPO's win rate over SFT under the reward model.
#
#   bash launch_scripts/posttrain_quickstart.sh
#
# Environment: WORK (output folder, default runs/posttrain_quickstart; started afresh), BASE_STEPS (pretraining steps,
# default 150), SFT_EPOCHS (default 2; 4 reaches 100% exact match and leaves DPO nothing to fix), TASK (copy or add),
# EXTRA (overrides for every stage). Numbers of the default run (held-out, stage times): bench/results.md,
# "post-training toy example".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-runs/posttrain_quickstart}
BASE_STEPS=${BASE_STEPS:-150}
SFT_EPOCHS=${SFT_EPOCHS:-2}
TASK=${TASK:-copy}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
rm -rf "$WORK" && mkdir -p "$WORK"
SECONDS=0
# Each stamp: wall seconds so far, CPU seconds of the finished stages (user + sys; on 2 quiet cores the wall time is
# about half of it), and the machine's 1-minute load average (a shared machine stretches the wall time, not the CPU).
stamp() {
    times > "$WORK/.times"  # in this shell (a $(...) subshell would see none of the stages)
    local cpu  # the children's line: "XmY.YYYs XmY.YYYs" (user, sys)
    cpu=$(tail -1 "$WORK/.times" | awk '{ split($1, u, "m"); split($2, s, "m")
                                            printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
    echo "=== [$(printf '%3d' $SECONDS)s wall, ${cpu}s CPU, load $(cut -d' ' -f1 /proc/loadavg)] $*"
}
# A small MoE model (MLA, 8 routed experts) of the tiny preset, wider; fp32 on the CPU.
MODEL="model.vocab_size=null model.hidden_size=128 model.intermediate_size=256 model.moe_intermediate_size=64
       model.num_hidden_layers=3 model.num_nextn_predict_layers=0 train.precision=fp32 train.log_interval=20"
run() {  # stage log: one line per log interval
    local log=$1; shift
    # shellcheck disable=SC2086
    "$PY" "$@" $MODEL ${EXTRA:-} 2>&1 | tee "$log" | grep --line-buffered -E "^step|error" || true
}

stamp "data: posttrain.arithmetic --task $TASK (3000 training items, 500 held-out)"
"$PY" -m posttrain.arithmetic --output "$WORK/data" --task "$TASK" --train 3000 --heldout 500 >/dev/null

stamp "tokenizer (the training items plus the stdlib's json package: enough text for 400 pieces) and shards"
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
"$PY" -m data_pipeline.tokenizer --input "$WORK/data/text.txt" "$STDLIB"/json/*.py --vocab-size 400 \
    --output "$WORK/tokenizer.model" --num-threads 1 >/dev/null
"$PY" -m data_pipeline.build --input "$WORK/data/text.txt" --tokenizer "$WORK/tokenizer.model" \
    --output "$WORK/shards" --workers 1 --no-progress >/dev/null 2>&1

stamp "base: pretraining for $BASE_STEPS steps"
run "$WORK/base.log" -m pretrain.train --config tiny "data.paths=[$WORK/shards]" "train.output_dir=$WORK/base" \
    data.seq_length=64 train.micro_batch_size=16 train.global_batch_size=16 "train.steps=$BASE_STEPS" \
    optim.lr=3e-3 schedule.name=cosine schedule.warmup_steps=10 train.save_interval=100000
test -f "$WORK/base/latest" || { echo "pretraining failed: see $WORK/base.log" >&2; exit 1; }

stamp "posttrain.sft from the base ($SFT_EPOCHS epochs, loss on the answers)"
run "$WORK/sft.log" -m posttrain.sft --config tiny "train.init_from=$WORK/base" "data.paths=[$WORK/data/sft.jsonl]" \
    "train.output_dir=$WORK/sft" data.seq_length=64 train.micro_batch_size=16 train.global_batch_size=16 \
    train.steps=null "train.epochs=$SFT_EPOCHS" optim.lr=2e-3 schedule.name=cosine schedule.warmup_steps=10 \
    train.save_interval=100000
test -f "$WORK/sft/latest" || { echo "SFT failed: see $WORK/sft.log" >&2; exit 1; }

stamp "posttrain.rm from the SFT model (a quarter epoch of correct-vs-near-miss pairs)"
run "$WORK/rm.log" -m posttrain.rm --config tiny "train.init_from=$WORK/sft" "data.paths=[$WORK/data/prefs.jsonl]" \
    "train.output_dir=$WORK/rm" data.seq_length=32 train.micro_batch_size=32 train.global_batch_size=32 \
    train.steps=null train.epochs=0.25 optim.lr=2e-3 schedule.name=cosine schedule.warmup_steps=5 \
    train.save_interval=100000
test -f "$WORK/rm/latest" || { echo "RM failed: see $WORK/rm.log" >&2; exit 1; }

stamp "posttrain.dpo from the SFT model (beta 0.1, a quarter epoch, the frozen reference held alongside)"
run "$WORK/dpo.log" -m posttrain.dpo --config tiny "train.init_from=$WORK/sft" "data.paths=[$WORK/data/prefs.jsonl]" \
    "train.output_dir=$WORK/dpo" data.seq_length=32 train.micro_batch_size=32 train.global_batch_size=32 \
    train.steps=null train.epochs=0.25 optim.lr=2e-4 schedule.name=cosine schedule.warmup_steps=5 dpo.beta=0.1 \
    train.save_interval=100000
test -f "$WORK/dpo/latest" || { echo "DPO failed: see $WORK/dpo.log" >&2; exit 1; }

stamp "held-out evaluation (500 items)"
"$PY" -m posttrain.evaluate --heldout "$WORK/data/heldout.jsonl" --base "$WORK/base" --sft "$WORK/sft" \
    --rm "$WORK/rm" --dpo "$WORK/dpo" --json "$WORK/results.json"
stamp "done: $WORK/results.json"

#!/usr/bin/env bash
# Post-training end to end on the CPU, TOY SCALE (a ~1M-parameter MoE model; minutes on 2 cores, not a recipe):
#   verifiable tasks made here (posttrain.arithmetic --task copy: "repeat 482130" -> "482130", 3000 training items,
#   500 held-out ones never trained on; TASK=add, "347+5=", is out of this budget's reach)
#   -> tokenizer + shards of the training items as text -> pretraining of a small tiny-preset model (base)
#   -> posttrain.sft (chat template, loss on the answers; 2 epochs: good but imperfect, its mistakes are mostly the
#   near misses the preference pairs reject) -> on-policy pairs (posttrain.rejection_sample --keep pairs: the SFT
#   model's best vs worst sample) -> posttrain.rm (reward model on correct vs near-miss answers and the on-policy pairs)
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
# shellcheck source=launch_scripts/posttrain_lib.sh
. launch_scripts/posttrain_lib.sh

stamp "data: posttrain.arithmetic --task $TASK (3000 training items, 500 held-out)"
"$PY" -m posttrain.arithmetic --output "$WORK/data" --task "$TASK" --train 3000 --heldout 500 >/dev/null

base_model

stamp "posttrain.sft from the base ($SFT_EPOCHS epochs, loss on the answers)"
run "$WORK/sft.log" -m posttrain.sft --config tiny "train.init_from=$WORK/base" "data.paths=[$WORK/data/sft.jsonl]" \
    "train.output_dir=$WORK/sft" data.seq_length=64 train.micro_batch_size=16 train.global_batch_size=16 \
    train.steps=null "train.epochs=$SFT_EPOCHS" optim.lr=2e-3 schedule.name=cosine schedule.warmup_steps=10
need sft "SFT"

stamp "on-policy pairs: posttrain.rejection_sample --keep pairs from the SFT model (4 samples per prompt at T 1.0)"
# The SFT model's own mistakes keep the length and change a digit; the made-up near misses mostly drop or double one.
# A reward model that saw only the latter ranks the former at chance, so it also learns from the policy's samples:
# per prompt its best vs its worst sample under the rule (posttrain.arithmetic:reward), when they differ.
"$PY" -m posttrain.rejection_sample --checkpoint "$WORK/sft" --prompts "$WORK/data/rl.jsonl" --keep pairs \
    --output "$WORK/data/onpolicy.jsonl" --samples 4 --temperature 1.0 --max-new-tokens 12 --seed 0 \
    --rewards posttrain.arithmetic:reward | tee "$WORK/onpolicy.log"

stamp "posttrain.rm from the SFT model (a quarter epoch of the near-miss and the on-policy pairs)"
run "$WORK/rm.log" -m posttrain.rm --config tiny "train.init_from=$WORK/sft" \
    "data.paths=[$WORK/data/prefs.jsonl,$WORK/data/onpolicy.jsonl]" \
    "train.output_dir=$WORK/rm" data.seq_length=32 train.micro_batch_size=32 train.global_batch_size=32 \
    train.steps=null train.epochs=0.25 optim.lr=2e-3 schedule.name=cosine schedule.warmup_steps=5
need rm "RM"

stamp "posttrain.dpo from the SFT model (beta 0.1, a quarter epoch, the frozen reference held alongside)"
run "$WORK/dpo.log" -m posttrain.dpo --config tiny "train.init_from=$WORK/sft" "data.paths=[$WORK/data/prefs.jsonl]" \
    "train.output_dir=$WORK/dpo" data.seq_length=32 train.micro_batch_size=32 train.global_batch_size=32 \
    train.steps=null train.epochs=0.25 optim.lr=2e-4 schedule.name=cosine schedule.warmup_steps=5 dpo.beta=0.1
need dpo "DPO"

stamp "held-out evaluation (500 items)"
"$PY" -m posttrain.evaluate --heldout "$WORK/data/heldout.jsonl" --base "$WORK/base" --sft "$WORK/sft" \
    --rm "$WORK/rm" --dpo "$WORK/dpo" --json "$WORK/results.json"
stamp "done: $WORK/results.json"

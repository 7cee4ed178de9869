# Shared by the toy post-training examples (posttrain_quickstart.sh, r1_quickstart.sh); sourced from the repository
# root after PY, WORK and BASE_STEPS are set. Defines stamp, run, need, MODEL and base_model.

# Each stamp: wall seconds so far, CPU seconds of the finished stages (user + sys; on 2 quiet cores the wall time is
# about half of it), and the machine's 1-minute load average (a shared machine stretches the wall time, not the CPU).
stamp() {
    times > "$WORK/.times"  # in this shell (a $(...) subshell would see none of the stages)
    local cpu  # the children's line: "XmY.YYYs XmY.YYYs" (user, sys)
    cpu=$(tail -1 "$WORK/.times" | awk '{ split($1, u, "m"); split($2, s, "m")
                                            printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
    echo "=== [$(printf '%3d' $SECONDS)s wall, ${cpu}s CPU, load $(cut -d' ' -f1 /proc/loadavg)] $*"
}
# A small MoE model (MLA, 8 routed experts) of the tiny preset, wider; fp32 on the CPU; no MTP (post-training drops it).
MODEL="model.vocab_size=null model.hidden_size=128 model.intermediate_size=256 model.moe_intermediate_size=64
       model.num_hidden_layers=3 model.num_nextn_predict_layers=0 train.precision=fp32
       train.log_interval=${LOG_INTERVAL:-20} train.save_interval=100000"
run() {  # run LOG ARGS...: one stage, its log in LOG, one line per log interval on the terminal
    local log=$1; shift
    # shellcheck disable=SC2086
    "$PY" "$@" $MODEL ${EXTRA:-} 2>&1 | tee "$log" | grep --line-buffered -E "^step|error" || true
}
need() {  # need RUN WHAT: stop with the stage's log when RUN has no checkpoint
    test -f "$WORK/$1/latest" || { echo "$2 failed: see $WORK/$1.log" >&2; exit 1; }
}
base_model() {  # the tokenizer, the shards of $WORK/data/text.txt and the pretrained base model ($WORK/base)
    stamp "tokenizer (the training items plus the stdlib's json package: enough text for 400 pieces) and shards"
    local stdlib
    stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    "$PY" -m data_pipeline.tokenizer --input "$WORK/data/text.txt" "$stdlib"/json/*.py --vocab-size 400 \
        --output "$WORK/tokenizer.model" --num-threads 1 >/dev/null
    "$PY" -m data_pipeline.build --input "$WORK/data/text.txt" --tokenizer "$WORK/tokenizer.model" \
        --output "$WORK/shards" --workers 1 --no-progress >/dev/null 2>&1
    stamp "base: pretraining for $BASE_STEPS steps"
    run "$WORK/base.log" -m pretrain.train --config tiny "data.paths=[$WORK/shards]" "train.output_dir=$WORK/base" \
        data.seq_length=64 train.micro_batch_size=16 train.global_batch_size=16 "train.steps=$BASE_STEPS" \
        optim.lr=3e-3 schedule.name=cosine schedule.warmup_steps=10
    need base "pretraining"
}

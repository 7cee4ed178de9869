#!/usr/bin/env bash
# GPU check, prepared for a session that is lent one NVIDIA H200 (the `device` tool): < 10 minutes in all.
#
#     bash bench/gpu_check.sh            # appends a "GPU" section to bench/results.md, full log in $OUT
#
# NOT RUN YET: the session that wrote it (issue 7) had no GPU; every step is bounded by `timeout` and a failing
# step is reported and skipped, so one run gives whatever figures it can.
#   1. device, driver, torch's CUDA build
#   2. MoE layer on CUDA in bf16: torch._grouped_mm path vs the per-expert loop (same numbers), and no host-device
#      sync in forward + backward of the model (torch.cuda.set_sync_debug_mode("warn") lists every syncing op)
#   3. bench/bench_model.py --device cuda: ours vs transformers, fp32 and bf16, reference arch and small-moe
#   4. pretrain.train on 1 GPU (bf16, DeepSpeed, NCCL world of 1), 30 steps of small-moe: tokens/s and MFU
#   5. the multi-process tests on NCCL: need >= 2 GPUs (NCCL refuses two ranks on one device) and a harness that
#      takes the backend from the environment (tests/helpers.py hard-codes gloo + CPU tensors; see the
#      message printed below): skipped with the reason otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_check}
RESULTS=${RESULTS:-bench/results.md}
mkdir -p "$OUT"
SECTION="$OUT/section.md"
: > "$SECTION"
note() { echo "$*" | tee -a "$SECTION"; }
step() {  # step SECONDS TITLE CMD...: run, keep the output, put it in the section as a code block
    local limit=$1 title=$2; shift 2
    note ""; note "### $title"; note ""; note "\`$*\`"; note ""
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/step.log" 2>&1
    local rc=$?
    grep -v -E "Warning|warn\(|^\s*$|Loading weights" "$OUT/step.log" | tail -40 > "$OUT/step.tail"
    { echo '```'; cat "$OUT/step.tail"; echo '```'; echo "(exit $rc, $((SECONDS - start)) s)"; } | tee -a "$SECTION"
    cat "$OUT/step.log" >> "$OUT/gpu_check.log"
}

note "## GPU ($(date -u '+%Y-%m-%d %H:%M') UTC, bench/gpu_check.sh)"
step 60 "Device" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'"

step 120 "MoE grouped_mm vs loop on CUDA bf16; host syncs in the model's forward + backward" $PY - <<'EOF'
import warnings, torch
import pretrain.model.moe as moe
from pretrain.config import load_config
from pretrain.model import build_model
torch.manual_seed(0)
dev = "cuda"
E, K, H, I, N = 16, 4, 256, 256, 4096
experts = moe.GroupedExperts(E, H, I).to(dev, torch.bfloat16)
for p in experts.parameters():
    torch.nn.init.normal_(p, std=0.02)
x = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
idx = torch.rand(N, E, device=dev).topk(K, dim=-1).indices
w = torch.rand(N, K, device=dev)
print("grouped_mm path taken:", moe._grouped_mm_ok(x))
grouped = experts(x, idx, w)
moe._HAS_GROUPED_MM = False
loop = experts(x, idx, w)
moe._HAS_GROUPED_MM = True
print("max |grouped - loop| (bf16):", (grouped.float() - loop.float()).abs().max().item(),
      " max |loop|:", loop.float().abs().max().item())
cfg = load_config("small-moe").model
model = build_model(cfg).to(dev, torch.bfloat16).train()
ids = torch.randint(0, cfg.vocab_size, (8, 129), device=dev)
model(ids[:, :-1], labels=ids[:, 1:])  # warm-up (lazy init may sync)
torch.cuda.synchronize()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.lm_loss + 0.3 * torch.stack(out.mtp_losses).mean() + 1e-4 * out.seq_aux_loss).backward()
    torch.cuda.set_sync_debug_mode(0)
syncs = [str(c.message).splitlines()[0] for c in caught if "synchroniz" in str(c.message)]
print(f"host-device syncs in one forward+backward: {len(syncs)}")
for s in sorted(set(syncs)):
    print("  ", s)
EOF

for preset in reference small-moe; do
    step 200 "Training step on one GPU: $preset" $PY bench/bench_model.py --device cuda --preset "$preset" \
        --rounds 10 --variants ours transformers "ours bf16" "transformers bf16"
done

step 240 "pretrain.train on 1 GPU, bf16, small-moe, 30 steps" bash -c "
  $PY -c 'import sys; sys.path.insert(0, \"bench\"); import bench_layouts; print(bench_layouts.shards())' > $OUT/shards.txt &&
  rm -rf $OUT/run && $PY -m pretrain.train --config small-moe \"data.paths=[\$(tail -1 $OUT/shards.txt)]\" \
    train.output_dir=$OUT/run train.steps=30 train.log_interval=5 train.precision=bf16 train.save_interval=1000"

NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$NGPU" -ge 2 ] && grep -q PARALLEL_TEST_BACKEND tests/helpers.py; then
    step 300 "Multi-process tests on NCCL ($NGPU GPUs)" env PARALLEL_TEST_BACKEND=nccl $PY -m pytest -x -q \
        tests/test_tensor_parallel.py tests/test_expert_parallel.py tests/test_parallel_deepspeed.py
else
    note ""
    note "### Multi-process tests on NCCL: skipped"
    note ""
    note "$NGPU GPU(s) visible; NCCL refuses two ranks on one device, so the 2-4 process tests need >= 2 GPUs."
    note "The harness must also take the backend from the environment: tests/helpers.py _worker hard-codes"
    note "init_process_group(\"gloo\") and the tests build CPU tensors. Needed: backend = PARALLEL_TEST_BACKEND"
    note "(default gloo); with nccl torch.cuda.set_device(rank) and the tests' models/inputs on cuda:rank."
fi

{ echo; cat "$SECTION"; } >> "$RESULTS"
echo "appended to $RESULTS; full log: $OUT/gpu_check.log"

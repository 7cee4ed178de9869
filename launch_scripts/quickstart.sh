#!/usr/bin/env bash
# The README's main job, on the CPU of a fresh machine, from the repository root:
#   tokenizer (vocab 8192) on the Python standard library sources -> shards -> 2-process pretraining of
#   `small-moe` (loss vs the corpus's unigram entropy) -> HuggingFace export -> a few generated tokens.
#
#   bash launch_scripts/quickstart.sh
#
# Environment: WORK (output folder, default runs/quickstart; its run/ is started afresh), CORPUS (folder of
# .py files, default the stdlib), NPROC (processes, default 2), STEPS (optimizer steps, default the preset's 200;
# ~5 minutes on 2 cores), EXTRA (more section.key=value overrides for pretrain.train).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-runs/quickstart}
CORPUS=${CORPUS:-$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
NPROC=${NPROC:-2}
STEPS=${STEPS:-200}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

$PY -c 'import pretrain, data_pipeline, deepspeed' >/dev/null 2>&1 || $PY -m pip install -q -e ".[test]"
mkdir -p "$WORK"
SECONDS=0
stamp() { echo "=== [$(printf '%3d' $SECONDS)s] $*"; }

stamp "tokenizer: sentencepiece BPE, vocab 8192, on $CORPUS/*.py"
$PY -m data_pipeline.tokenizer --input "$CORPUS"/*.py --vocab-size 8192 --output "$WORK/tokenizer.model"

stamp "shards"
$PY -m data_pipeline.build --input "$CORPUS"/*.py --tokenizer "$WORK/tokenizer.model" --output "$WORK/shards" \
    --workers "$NPROC" --overwrite --no-progress

stamp "unigram entropy of the shards (the loss of a model that ignores context)"
$PY - "$WORK/shards" "$WORK/unigram_entropy.txt" <<'EOF' 2>/dev/null
import sys, glob, numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
counts = np.zeros(1, dtype=np.int64)
for idx in sorted(glob.glob(f"{sys.argv[1]}/*.idx")):
    ds = IndexedDataset(idx[:-len(".idx")])
    for i in range(len(ds)):
        c = np.bincount(np.asarray(ds[i], dtype=np.int64))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts)))); counts[:len(c)] += c
p = counts[counts > 0] / counts.sum()
entropy = -(p * np.log(p)).sum()
print(f"unigram entropy: {entropy:.3f} nats/token over {counts.sum():,} tokens")
open(sys.argv[2], "w").write(f"{entropy}\n")
EOF

stamp "pretraining small-moe on $NPROC processes (expert parallel) for $STEPS steps (lm_loss should fall below the entropy above)"
rm -rf "$WORK/run"
# shellcheck disable=SC2086
# Experts sharded over the 2 processes (expert parallelism): each rank holds and updates half of them.
EP=$(( NPROC % 2 == 0 ? 2 : 1 ))
$PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pretrain.train --config small-moe \
    "data.paths=[$WORK/shards]" "train.output_dir=$WORK/run" "train.steps=$STEPS" "parallel.ep=$EP" ${EXTRA:-} 2>&1 \
    | tee "$WORK/train.log" | grep --line-buffered -E "^step|^\[train\]|error" || true
test -f "$WORK/run/latest" || { echo "training failed: see $WORK/train.log" >&2; exit 1; }
$PY - "$WORK/run/metrics.jsonl" "$WORK/unigram_entropy.txt" <<'EOF'
import json, sys
rows = [json.loads(line)["lm_loss"] for line in open(sys.argv[1])]
entropy, w = float(open(sys.argv[2]).read()), max(1, len(rows) // 10)
windows = [(i + 1, min(i + w, len(rows)), sum(rows[i:i + w]) / len(rows[i:i + w])) for i in range(0, len(rows), w)]
print("lm_loss (main model, nats/token), mean per window:", ", ".join(f"{a}-{b}: {v:.2f}" for a, b, v in windows))
print(f"last window {windows[-1][2]:.2f} vs unigram entropy {entropy:.2f}: "
      + ("below, the model uses context" if windows[-1][2] < entropy else "NOT below: train longer (STEPS=...)"))
EOF

stamp "export to HuggingFace"
$PY -m pretrain.export --checkpoint "$WORK/run" --output "$WORK/hf" 2>&1 | grep -v -i "warn\|loading\|processing\|parsing\|detected\|reconstructed"

stamp "generate with transformers"
$PY - "$WORK/hf" <<'EOF' 2>/dev/null
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
for prompt in ("import os\nimport sys\n\n\ndef ", "class Path:\n    def __init__(self, "):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)
    print(f"--- prompt {prompt!r} ->\n{prompt}{tok.decode(out[0, ids.shape[1]:])}")
EOF
stamp "done: run in $WORK/run (tensorboard --logdir $WORK/run/tensorboard), HuggingFace model in $WORK/hf"

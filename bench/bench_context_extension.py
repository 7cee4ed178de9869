"""Context extension on the CPU: YaRN against plain RoPE, zero-shot and after an extension phase.

    python bench/bench_context_extension.py [--steps 400] [--ext-steps 100] [--out DIR] [--json FILE] [--no-write]

A small dense MLA model (``qk_rope_head_dim`` 16: 8 rope frequency pairs; ``tiny`` has only 4) is pretrained at
sequence 128 on the Python standard library's source (a real corpus with long-range structure) through
``pretrain.train``. Then:

1. zero-shot: the same weights evaluated on held-out windows of 512 and of 128 tokens with plain RoPE and with
   YaRN (factor 4 = 512 / 128, alpha 1, beta 32, sqrt(t) = 0.0707 ln s + 1: DeepSeek-V2's recipe, i.e.
   mscale = mscale_all_dim = 0.707, on the decoupled rope key/query only, as the model does);
2. extension: ``pretrain.train train.init_from=<phase 1>`` at sequence 512 for ``--ext-steps`` steps, once with
   YaRN and once with plain RoPE (same data, same steps), then the same held-out evaluation.

Prints a table of held-out loss (nats/token) and writes it to bench/results.md ("Context extension"). Toy scale:
a few minutes on 2 cores; the figures show the mechanism, not DeepSeek's numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SHORT, LONG = 128, 512
YARN = {"type": "yarn", "factor": LONG / SHORT, "original_max_position_embeddings": SHORT, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
MODEL = ["model.vocab_size=null", "model.hidden_size=128", "model.num_hidden_layers=4", "model.num_attention_heads=4",
         "model.intermediate_size=384", f"model.max_position_embeddings={LONG}", "model.attention=mla",
         "model.q_lora_rank=null", "model.kv_lora_rank=64", "model.qk_rope_head_dim=16", "model.qk_nope_head_dim=32",
         "model.v_head_dim=32", "model.n_routed_experts=0", "model.num_nextn_predict_layers=0",
         "model.initializer_range=0.02"]


def build_corpus(out: Path) -> tuple[Path, Path]:
    """Tokenizer + train shards (stdlib top-level modules) + held-out shards (the email and json packages)."""
    root = sysconfig.get_paths()["stdlib"]
    train_files = sorted(glob.glob(os.path.join(root, "*.py")))[:120]
    eval_files = sorted(glob.glob(os.path.join(root, "email", "*.py")) + glob.glob(os.path.join(root, "json", "*.py")))
    tok = out / "tok.model"
    if not tok.is_file():
        run([sys.executable, "-m", "data_pipeline.tokenizer", "--input", *train_files, "--vocab-size", "2000",
             "--output", str(tok)])
    for name, files in (("train", train_files), ("eval", eval_files)):
        if not (out / name / "manifest.json").is_file():
            run([sys.executable, "-m", "data_pipeline.build", "--input", *files, "--tokenizer", str(tok),
                 "--output", str(out / name), "--workers", "1", "--no-progress"])
    return out / "train", out / "eval"


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def train(run_dir: Path, data: Path, seq: int, steps: int, *extra: str) -> None:
    """``pretrain.train`` for ``steps`` steps of 2048 tokens (16 sequences of 128, 4 of 512); skipped when done."""
    if (run_dir / "latest").is_file():
        return
    batch = 16 * SHORT // seq
    run([sys.executable, "-m", "pretrain.train", "--config", "tiny", *MODEL, f"data.paths=[{data}]",
         f"data.seq_length={seq}", f"train.output_dir={run_dir}", f"train.steps={steps}",
         f"train.micro_batch_size={min(8, batch)}", f"train.global_batch_size={batch}", "train.save_interval=100000",
         "train.log_interval=50", "optim.lr=2e-3", "schedule.name=cosine", "schedule.warmup_steps=20",
         "train.precision=fp32", *extra])


@torch.no_grad()
def held_out_loss(run_dir: Path, data: Path, seq: int, rope_scaling: dict | None, windows: int = 24) -> float:
    """Mean next-token loss over the first ``windows`` held-out windows of ``seq`` tokens, with ``rope_scaling``."""
    from data_pipeline.dataset import build_dataset
    from pretrain.checkpoint import load_model_from_checkpoint
    from pretrain.model import build_model

    trained, cfg, _ = load_model_from_checkpoint(run_dir)
    cfg.model.rope_scaling = rope_scaling
    model = build_model(cfg.model)
    model.load_state_dict(trained.state_dict())
    model.eval()
    ds = build_dataset([str(data)], None, seq, seed=0, num_samples=windows)
    tokens = torch.stack([torch.from_numpy(ds[i]) for i in range(windows)])
    losses = [model(t[None, :-1], labels=t[None, 1:]).lm_loss.item() for t in tokens]
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="pretraining steps at sequence 128")
    p.add_argument("--ext-steps", type=int, default=100, help="extension steps at sequence 512 (0 = zero-shot only)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "deepseek_pretrain_bench", "ctx_ext"))
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--no-write", action="store_true", help="do not update bench/results.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_data, eval_data = build_corpus(out)
    base = out / f"base_{args.steps}"
    train(base, train_data, SHORT, args.steps)
    rows = {}
    for name, scaling in (("plain RoPE", None), ("YaRN s=4", YARN)):
        rows[f"zero-shot, {name}"] = {seq: held_out_loss(base, eval_data, seq, scaling) for seq in (SHORT, LONG)}
    if args.ext_steps:
        for name, scaling in (("plain RoPE", None), ("YaRN s=4", YARN)):
            ext = out / f"ext_{args.steps}_{args.ext_steps}_{'yarn' if scaling else 'rope'}"
            train(ext, train_data, LONG, args.ext_steps, f"train.init_from={base}",
                  f"model.rope_scaling={json.dumps(scaling) if scaling else 'null'}", "schedule.warmup_steps=5",
                  "optim.lr=5e-4")
            rows[f"extended {args.ext_steps} steps at {LONG}, {name}"] = {
                seq: held_out_loss(ext, eval_data, seq, scaling) for seq in (SHORT, LONG)}
    lines = [f"Pretrained {args.steps} steps at seq {SHORT} (dense MLA, 8 rope pairs, stdlib corpus); held-out "
             f"loss in nats/token over 24 windows (email + json packages, never trained on):", "",
             f"| model | loss @ {SHORT} | loss @ {LONG} | ppl ratio @ {LONG} vs @ {SHORT} |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r[SHORT]:.3f} | {r[LONG]:.3f} | {math.exp(r[LONG] - r[SHORT]):.2f}x |")
    table = "\n".join(lines)
    print(table)
    result = {name: {str(k): v for k, v in r.items()} for name, r in rows.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.no_write:
        from bench_model import write_section
        write_section("Context extension (YaRN vs plain RoPE)",
                      "`python bench/bench_context_extension.py` (toy scale, CPU).\n\n" + table)
    return result


if __name__ == "__main__":
    main()

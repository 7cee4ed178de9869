"""Test-only helpers shared by the test modules (which import them from here; the fixtures are in conftest.py).

- real text and a small trained tokenizer for the data_pipeline tests; synthetic shards without a tokenizer;
- ``CONFIGS``/``make_model``: small models of every architecture (export parity, generation);
- ``run_distributed``: a function on N gloo CPU processes (house rule 9), and ``free_port`` for launchers;
- the launchers of ``python -m pretrain.train`` the end-to-end tests compare runs with: ``train`` (the layout
  tests: metrics of a 3-step run), ``run_loop`` (the loop tests' settings, ``COMMON``), ``run_train`` (the
  reliability tests: ``run_loop`` on given shards, a checkpoint every step, an injected fault);
- the launchers of the post-training stages (``posttrain``: sft/rm/dpo, ``grpo``: grpo/ppo) and
  ``assert_same_losses``, shared by the post-training loop, GRPO and four-process layout tests.

No test module imports another: whatever two modules share lives here or in conftest.py.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from pretrain.config import ModelConfig, validate_model
# One definition of "a free local port": the one the single-process launcher (pretrain.engine) uses.
from pretrain.engine import _free_port as free_port  # noqa: F401 (re-exported)
from pretrain.model import build_model

STDLIB = sysconfig.get_paths()["stdlib"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------ data


def stdlib_files(count: int, start: int = 0) -> list[str]:
    """``count`` top-level stdlib .py files in a fixed order."""
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))
    return files[start:start + count]


def stdlib_texts(count: int, start: int = 0) -> list[str]:
    return [open(f, encoding="utf-8", newline="").read() for f in stdlib_files(count, start)]


@functools.lru_cache(maxsize=None)
def trained_tokenizer(vocab_size: int = 1000) -> str:
    """Path of a BPE model trained once per test process on 40 stdlib files (~1 s)."""
    from data_pipeline.tokenizer import train_tokenizer
    out = os.path.join(tempfile.mkdtemp(prefix="dp_tok_"), f"tok{vocab_size}.model")
    train_tokenizer(stdlib_files(40), vocab_size, out, num_threads=1)
    return out


def write_jsonl(path: str, lines: list) -> str:
    """Write raw lines: dicts are JSON-encoded, bytes are written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode("utf-8"))
            f.write(b"\n")
    return path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root; the caller checks the return code."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def write_token_dir(directory: str, docs: list[np.ndarray], shard_size_tokens: int = 1 << 30,
                    vocab_size: int = 60000, eos_id: int | None = None, sha256: str = "synthetic") -> str:
    """A build directory of synthetic documents (no tokenizer needed), as data_pipeline.build writes it."""
    from data_pipeline.shards import ShardWriter, token_dtype, write_manifest
    os.makedirs(directory, exist_ok=True)
    writer = ShardWriter(directory, token_dtype(vocab_size), shard_size_tokens)
    for doc in docs:
        writer.add_documents(np.asarray(doc), np.array([len(doc)]))
    shards = writer.finish()
    write_manifest(directory, {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)), "shards": shards,
                               "tokenizer": {"path": "synthetic", "sha256": sha256, "eos_id": eos_id}})
    return directory


def build_small_data(out: Path) -> Path:
    """A sentencepiece tokenizer and shards from the stdlib's json package (~50k tokens); returns the shard dir."""
    inputs = [str(p) for p in sorted((Path(STDLIB) / "json").glob("*.py"))]
    tok = out / "tok.model"
    shards = out / "shards"
    for cmd in ([sys.executable, "-m", "data_pipeline.tokenizer", "--input", *inputs, "--vocab-size", "512",
                 "--output", str(tok)],
                [sys.executable, "-m", "data_pipeline.build", "--input", *inputs, "--tokenizer", str(tok),
                 "--output", str(shards), "--workers", "1", "--no-progress"]):
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    return shards


# ------------------------------------------------------------------ small models of every architecture

# Used by the export parity tests (against transformers) and the generation tests.
MLA = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
           max_position_embeddings=128, attention="mla", kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=12, moe_intermediate_size=32, initializer_range=0.08)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}

CONFIGS = {
    # V3: group-limited routing (topk_group < n_group), query compression, MTP (must not be exported)
    "v3_groups_mtp": dict(MLA, q_lora_rank=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                          first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                          norm_topk_prob=True, scoring_func="sigmoid", num_nextn_predict_layers=1),
    # V3: no query compression, YaRN (mscale != mscale_all_dim: both cos/sin and softmax scale change), 2 dense
    "v3_yarn_dense2": dict(MLA, q_lora_rank=None, rope_scaling=YARN, n_routed_experts=8, n_shared_experts=2,
                           num_experts_per_tok=2, first_k_dense_replace=2, n_group=2, topk_group=1,
                           routed_scaling_factor=1.5, norm_topk_prob=False, scoring_func="sigmoid"),
    # V2: softmax router with group_limited_greedy, no query compression, YaRN
    "v2_softmax_groups": dict(MLA, q_lora_rank=None, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
                              n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                              n_group=4, topk_group=2, routed_scaling_factor=2.0, scoring_func="softmax"),
    "v2_lite_greedy": dict(MLA, q_lora_rank=None, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                           first_k_dense_replace=1, scoring_func="softmax"),
    # dense MLA (no experts) goes out as DeepseekV3 with every layer dense
    "v3_dense_mla": dict(MLA, q_lora_rank=16, num_hidden_layers=2),
    "llama_gqa": dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, attention="gqa", rope_theta=500.0),
    "llama_mha_yarn": dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, attention="mha", max_position_embeddings=128,
                           rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
}


def make_model(name: str, seed: int = 0):
    """The small model ``CONFIGS[name]`` in eval mode, with non-trivial norms and expert correction bias."""
    cfg = ModelConfig(**CONFIGS[name])
    validate_model(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # make norms and the correction bias non-trivial so they are really checked
        for pname, p in model.named_parameters():
            if pname.endswith("layernorm.weight") or pname.endswith("norm.weight"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
        for mname, buf in model.named_buffers():
            if mname.endswith("e_score_correction_bias") and cfg.scoring_func == "sigmoid":
                buf.copy_(0.3 * torch.randn_like(buf))
    return model, cfg


# ---------------------------------------------------------------------------- gloo processes in-test


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # N processes share a few cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; a failure in any re-raises here.

    Forked (not spawned) so the children reuse the parent's imports: seconds instead of tens of seconds.
    ``fn`` must be a module-level function.
    """
    import torch.multiprocessing as mp

    # Import the heavy libraries once here: the forked children inherit them instead of each importing them.
    import deepspeed  # noqa: F401
    from megatron.core import parallel_state  # noqa: F401
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="fork")


# -------------------------------------------------------------------------- python -m pretrain.train


LOOP_STEPS = 4
# Batch-size ramp-up: global batch 4 for steps 1-2 (256 tokens), then 8 (= train.global_batch_size), so
# DeepSpeed's gradient accumulation changes mid-run, and across the resume point of the resume tests.
COMMON = ["--config", "tiny", f"train.steps={LOOP_STEPS}", "train.save_interval=100", "train.log_interval=1",
          "train.heatmap_interval=2", "train.batch_size_rampup=[[0, 4], [256, 8]]"]
STEPS = 3  # the layout tests' run length (``train``)


def launch_env() -> dict:
    """The environment of a launched run: none of this process's rank variables, one BLAS thread per process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(nproc: int) -> list[str]:
    """The launcher prefix of an ``nproc``-process run on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())]


def run_checked(args: list, launcher=(), check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``launcher + args`` and capture its output; ``check``: a non-zero exit raises with the output's tail.

    On a timeout (or Ctrl-C) the command gets SIGTERM, which torchrun passes to its workers (SIGKILL 30 s later):
    ``subprocess.run(timeout=)`` would SIGKILL torchrun alone and leave its workers, each in a session of its own,
    running (a hung collective stays hung)."""
    with subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=launch_env()) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except BaseException:
            popen.terminate()
            try:
                popen.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                popen.kill()
            raise
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(out_dir) -> list[dict]:
    """The per-step records of ``metrics.jsonl`` (loss, lm_loss, mtp_loss, grad_norm, lr, tokens, ...)."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def module_states(step_dir) -> dict:
    return torch.load(Path(step_dir) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def run_loop(out_dir, *overrides, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """``pretrain.train`` with the loop tests' settings (``COMMON``: tiny, 4 steps, batch ramp-up)."""
    args = ["-m", "pretrain.train", *COMMON, f"train.output_dir={out_dir}", *overrides]
    if nproc == 1:
        return run_checked([sys.executable, *args], check=check)
    return run_checked(args, launcher=torchrun(nproc), check=check)


def run_train(out, data, *overrides, nproc=1, check=True, fault=None, monkeypatch=None) -> subprocess.CompletedProcess:
    """``run_loop`` on the shards ``data`` with a checkpoint after every step, optionally with PRETRAIN_FAULT
    (pretrain.faults) set for the child processes."""
    if fault is not None:
        monkeypatch.setenv("PRETRAIN_FAULT", fault)
    try:
        return run_loop(out, f"data.paths=[{data}]", "train.save_interval=1", *overrides, nproc=nproc, check=check)
    finally:
        if fault is not None:
            monkeypatch.delenv("PRETRAIN_FAULT")


def train(out_dir, data_dir, nproc: int, *overrides) -> list[dict]:
    """The layout tests' run: tiny preset on ``data_dir`` for ``STEPS`` steps on ``nproc`` processes; its metrics."""
    args = ["-m", "pretrain.train", "--config", "tiny", f"data.paths=[{data_dir}]", f"train.output_dir={out_dir}",
            f"train.steps={STEPS}", "train.log_interval=1", *overrides]
    run_checked([sys.executable, *args] if nproc == 1 else args, launcher=() if nproc == 1 else torchrun(nproc))
    return losses(out_dir)


# ------------------------------------------------------------------------ python -m posttrain.<stage>

POSTTRAIN_STEPS = 3  # the sft / rm / dpo runs (``posttrain``)
POSTTRAIN_METRICS = {"sft": ("loss", "lm_loss", "mtp_loss"), "rm": ("loss", "rm/accuracy", "rm/margin"),
                     "dpo": ("loss", "rewards/margins", "logps/chosen", "logps/rejected")}
RL_STEPS = 4  # the grpo / ppo runs (``grpo``): 2 rollouts of 2 mini-batches
RL_KEYS = ("loss", "rl/kl", "rl/ratio", "rl/entropy", "rl/reward_mean", "grad_norm")
PPO_KEYS = RL_KEYS + ("rl/value_loss", "rl/value_mean", "rl/value_clip_fraction")
PPO_ARGS = ("rl.group_size=1", "rl.prompts_per_step=16")  # PPO: one output per prompt, the same 16 per rollout


def posttrain(stage: str, out, chat_data: dict, *overrides, nproc: int = 1, check: bool = True):
    """``posttrain.<stage>`` (sft, rm or dpo) for ``POSTTRAIN_STEPS`` steps on the ``chat_data`` fixture's files."""
    data = chat_data["sft" if stage == "sft" else "prefs"]
    args = ["-m", f"posttrain.{stage}", "--config", "tiny", f"data.paths=[{data}]", f"train.output_dir={out}",
            f"data.tokenizer={chat_data['tokenizer']}", f"train.steps={POSTTRAIN_STEPS}", "train.log_interval=1",
            "train.global_batch_size=4", *overrides]
    return run_checked([sys.executable, *args] if nproc == 1 else args, launcher=() if nproc == 1 else torchrun(nproc),
                       check=check)


def grpo(out, rl_data: Path, monkeypatch, *overrides, nproc: int = 1, fixed: bool = False, check: bool = True,
         stage: str = "grpo"):
    """``posttrain.<stage>`` (grpo or ppo) for ``RL_STEPS`` steps on the ``rl_data`` fixture's prompts, rewarded by
    ``grpo_fixed:digit_share``; ``fixed``: on tests/grpo_fixed.py's fixed rollouts (the same in every layout)."""
    tests = Path(REPO) / "tests"
    monkeypatch.setenv("PYTHONPATH", str(tests))  # the reward grpo_fixed:digit_share
    entry = [str(tests / "grpo_fixed.py"), stage] if fixed else ["-m", f"posttrain.{stage}"]
    args = [*entry, "--config", "tiny", f"data.paths=[{rl_data / 'rl.jsonl'}]",
            f"data.tokenizer={rl_data / 'tok.model'}", f"train.output_dir={out}",
            'rl.rewards=[{fn: "grpo_fixed:digit_share"}]', "rl.group_size=4", "rl.prompts_per_step=4",
            "rl.max_new_tokens=8", "data.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2",
            f"train.steps={RL_STEPS}", "train.log_interval=1", *overrides]
    return run_checked([sys.executable, *args] if nproc == 1 else args, launcher=() if nproc == 1 else torchrun(nproc),
                       check=check)


def assert_same_losses(got: list, want: list, names, steps: int = POSTTRAIN_STEPS, rel: float = 2e-4,
                       atol: float = 1e-5) -> None:
    """Two runs' metrics records agree on ``names`` at every one of their ``steps`` steps."""
    assert len(got) == len(want) == steps, (len(got), len(want))
    for a, b in zip(got, want):
        for n in names:
            assert a[n] == pytest.approx(b[n], rel=rel, abs=atol), (n, a, b)

"""Reliability of inputs (docs/RELIABILITY.md items 9, 10, 11).

- every invalid layout and hyperparameter is one line, exit 2, before any process group exists (one table);
- data: a missing shard, a .bin/.idx length mismatch, a manifest naming a file outside its directory: one line
  before any process group; a shard changed since the checkpoint: refused on resume before step 1;
- the same seed twice gives bit-identical first 20 steps;
- safety: every ``torch.load`` outside the tests uses ``weights_only=True``; export refuses a checkpoint whose
  checksums do not verify (DeepSpeed's ZeRO merge unpickles).
The data pipeline's own bad-input cases are in tests/test_data_dataset.py and tests/test_data_build.py.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from helpers import COMMON, losses, run_train, write_token_dir
from pretrain.checkpoint import CheckpointError, load_model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# (world size, overrides, fragment of the one-line message). Model-only checks of load_config are in
# tests/test_config.py; the loop-level ones (data paths, batch ramp, tokenizer vocabulary) in tests/test_train.py.
INVALID = [
    (1, ["parallel.tp=2"], "tp x pp = 2 does not divide it"),
    (4, ["parallel.ep=3"], "ep=3 does not divide dp=4"),
    (4, ["parallel.tp=2", "parallel.ep=4"], "ep=4 does not divide dp=2"),
    (3, ["parallel.tp=3"], "model.num_attention_heads=4 is not divisible by tp=3"),
    (4, ["parallel.tp=4", "model.vocab_size=510"], "model.vocab_size=510 is not divisible by tp=4"),
    (2, ["parallel.tp=2", "model.moe_intermediate_size=33"], "is not divisible by tp=2"),
    (2, ["parallel.ep=2", "model.n_routed_experts=0"], "ep=2 on a dense model"),
    (2, ["parallel.pp=4"], "tp x pp = 4 does not divide it"),
    (4, ["parallel.pp=4"], "model.num_hidden_layers=2 < pp=4"),
    (2, ["parallel.pp=2", "parallel.pipeline_layout=[2, 1]"], "parallel.pipeline_layout=[2, 1]"),
    (4, ["train.global_batch_size=4", "train.micro_batch_size=2"],
     "is not a multiple of train.micro_batch_size=2 x dp=4"),
    (1, ["parallel.zero_stage=3"], "parallel.zero_stage=3: use 0, 1 or 2"),
    (1, ["parallel.tp=0"], "parallel.tp=0: must be >= 1"),
    (1, ["train.precision=fp16"], "train.precision='fp16'"),
    (1, ["train.micro_batch_size=0"], "train.micro_batch_size=0"),
    (1, ["train.global_batch_size=7"], "train.global_batch_size=7"),
    (1, ["train.steps=null"], "train.total_tokens and train.steps are both null"),
    (1, ["train.save_interval=0"], "train.save_interval=0"),
    (1, ["train.keep_last=0"], "train.keep_last=0"),
    (1, ["optim.lr=0"], "optim.lr=0"),
    (1, ["optim.betas=[0.9, 1.0]"], "optim.betas"),
    (1, ["optim.grad_clip=-1"], "optim.grad_clip=-1"),
    (1, ["schedule.name=linear"], "schedule.name='linear'"),
    (1, ["schedule.warmup_steps=-1"], "schedule.warmup_steps=-1"),
    (1, ["schedule.decay_factors=[0.5]"], "schedule.decay_points has 2 entries"),
    (1, ["model.n_group=3"], "model.n_group=3"),
    (1, ["model.num_experts_per_tok=9"], "model.num_experts_per_tok=9"),
    (1, ["model.attention=xla"], "model.attention='xla'"),
    (1, ["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim=7: must be even"),
    (1, ["train.dist_timeout_s=0"], "train.dist_timeout_s=0"),
    (1, ["train.step_timeout_s=-5"], "train.step_timeout_s=-5"),
    (1, ["train.max_skipped_steps=0"], "train.max_skipped_steps=0"),
    (1, ["train.loss_spike_sigma=-1"], "train.loss_spike_sigma=-1"),
    (1, ["train.loss_spike_window=1"], "train.loss_spike_window=1"),
    (2, ["parallel.pp=2", "train.loss_spike_sigma=3"], "train.loss_spike_sigma needs the loss on every rank"),
    (1, ["train.bogus=1"], "train.bogus: unknown key"),
]


def _main_in_process(args, world, monkeypatch, capsys):
    from pretrain.train import main
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", "0")
    code = main(args)
    assert not dist.is_initialized()  # rejected before any process group
    return code, capsys.readouterr().err


@pytest.mark.parametrize("world, overrides, message", INVALID, ids=[" ".join(o) for _, o, _ in INVALID])
def test_invalid_config_is_one_line_before_any_process_group(data_dir, tmp_path, monkeypatch, capsys,
                                                             world, overrides, message):
    args = [*COMMON, f"train.output_dir={tmp_path / 'run'}", f"data.paths=[{data_dir}]", *overrides]
    code, err = _main_in_process(args, world, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err


def _damaged_copy(data_dir, tmp_path, damage):
    bad = tmp_path / "shards"
    shutil.copytree(data_dir, bad)
    prefix = json.loads((bad / "manifest.json").read_text())["shards"][0]["prefix"]
    if damage == "missing":
        (bad / f"{prefix}.bin").unlink()
        return bad, f"missing shard file {bad / prefix}.bin"
    if damage == "mismatch":
        with open(bad / f"{prefix}.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2)
        return bad, "the .bin/.idx pair is mismatched or truncated"
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["prefix"] = "../../etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad, "points outside"


@pytest.mark.parametrize("damage", ["missing", "mismatch", "escape"])
def test_bad_shards_are_one_line_before_any_process_group(data_dir, tmp_path, monkeypatch, capsys,
                                                          damage):
    bad, message = _damaged_copy(data_dir, tmp_path, damage)
    args = [*COMMON, f"train.output_dir={tmp_path / 'run'}", f"data.paths=[{bad}]"]
    code, err = _main_in_process(args, 1, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_shard_changed_since_the_checkpoint_is_refused_before_step_1(checkpoint_reference, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_reference, run)
    (run / "latest").write_text("step_0000002")
    rng = np.random.default_rng(1)  # same layout and file names, different documents
    changed = write_token_dir(str(tmp_path / "changed"), [rng.integers(0, 512, 400) for _ in range(60)],
                              vocab_size=512)
    proc = run_train(run, changed, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "differs from the one the checkpoint at step 2 was trained on" in proc.stderr
    assert [r["step"] for r in losses(run)] == [1, 2, 3, 4]  # nothing trained: metrics untouched

@pytest.mark.slow

def test_same_seed_twice_is_bit_identical_for_20_steps(data_dir, tmp_path):
    fast = ["train.steps=20", "train.batch_size_rampup=null", "train.global_batch_size=1", "train.micro_batch_size=1",
            "data.seq_length=16", "train.save_interval=20"]
    for name in ("a", "b"):
        run_train(tmp_path / name, data_dir, *fast)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 20 and a == b  # loss, grad norm, every logged number: bit-identical
    sha = [json.loads((tmp_path / n / "step_0000020" / "checksums.json").read_text())["sha256"] for n in "ab"]
    weights = [s["mp_rank_00_model_states.pt"] for s in sha]
    assert weights[0] == weights[1]  # the saved weights, byte for byte


def test_every_torch_load_outside_tests_is_weights_only():
    sources = [p for d in ("pretrain", "parallel", "data_pipeline", "bench", "launch_scripts")
               for p in (ROOT / d).rglob("*.py")]
    calls = [(p, m) for p in sources for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", p.read_text())]
    assert calls  # the scan finds the loads (checkpoint RNG, ZeRO-0 weights, pipeline layer files)
    unsafe = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p, m in calls if "weights_only=True" not in m.group(0)]
    assert not unsafe, unsafe


def test_export_refuses_an_unverified_checkpoint(checkpoint_reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_reference, run)
    victim = next((run / "step_0000004").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes() + b"tampered")
    with pytest.raises(CheckpointError, match=re.escape(str(victim)) + ".*refusing to unpickle"):
        load_model_from_checkpoint(run)
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(run), "--output",
                           str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "refusing to unpickle" in proc.stderr and "Traceback" not in proc.stderr
    # The user vouches for the file (trailing bytes after the zip archive still load): the export goes through.
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(run), "--output",
                           str(tmp_path / "hf"), "--trust-unverified"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "hf" / "config.json").is_file(), proc.stderr[-2000:]
    model, _, _ = load_model_from_checkpoint(run / "step_0000003")  # an intact checkpoint loads
    assert sum(p.numel() for p in model.parameters()) > 0

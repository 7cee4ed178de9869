"""Reliability of the numbers (docs/RELIABILITY.md items 4 and 7), faults injected with ``PRETRAIN_FAULT``.

- a non-finite loss or one expert's NaN gradient on one rank: every rank skips the optimizer step (weights and
  the expert bias unchanged, ``train/skipped_steps`` in TensorBoard), and N in a row abort naming step and rank;
- a loss spike (loss > mean + k sigma of the window) is skipped, also right after a resume (window checkpointed);
- MoE edge cases: an expert with no tokens, an EP rank whose experts receive none, a fully masked batch on one
  rank: finite loss and gradients, no hang.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import losses, run_distributed, run_train
from parallel import Topology, initialize_parallel
from parallel.expert import apply_expert_parallel
from pretrain.config import load_config
from pretrain.model import build_model


def all_model_states(step_dir):
    """Every tensor of every DeepSpeed model-states file of a step directory (dense and expert files)."""
    out = {}
    for path in sorted(Path(step_dir).glob("*model_states.pt")):
        states = torch.load(path, map_location="cpu", weights_only=False)
        for name, tensor in states.get("module", states).items():
            if isinstance(tensor, torch.Tensor):
                out[f"{path.name}:{name}"] = tensor
    return out


def assert_same_weights(step_a, step_b):
    a, b = all_model_states(step_a), all_model_states(step_b)
    assert a and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def tensorboard_scalar(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.parametrize("zero_stage", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_inf_loss_skips_the_step(data_dir, tmp_path, monkeypatch, zero_stage):
    """ZeRO 0 (wrapped optimizer step) and ZeRO 1 (DeepSpeed's overflow path): step 2 changes no weight."""
    out = tmp_path / "run"
    proc = run_train(out, data_dir, "train.steps=3", f"parallel.zero_stage={zero_stage}", fault="inf_loss:2:0",
                     monkeypatch=monkeypatch)
    assert "step 2: optimizer step skipped on every rank: non-finite loss on rank(s) [0]" in proc.stderr
    assert [r["skipped"] for r in losses(out)] == [False, True, False]
    assert_same_weights(out / "step_0000001", out / "step_0000002")  # incl. the router bias buffers
    with pytest.raises(AssertionError):
        assert_same_weights(out / "step_0000002", out / "step_0000003")  # the run goes on training
    assert tensorboard_scalar(out, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    assert math.isfinite(losses(out)[2]["loss"])


@pytest.mark.slow
def test_nan_in_one_experts_gradient_on_one_rank_then_abort(data_dir, tmp_path, monkeypatch):
    """dp2 ep2: expert 0 of rank 1 gets NaN gradients at step 2 (only rank 1 holds them), then rank 1's loss is
    NaN from step 3 on: both ranks skip both steps, and the run aborts at step 3 (max 2 in a row)."""
    out = tmp_path / "run"
    proc = run_train(out, data_dir, "parallel.ep=2", "train.max_skipped_steps=2", nproc=2, check=False,
                     fault="nan_expert_grad:2:1,nan_loss:3-9:1", monkeypatch=monkeypatch)
    assert proc.returncode != 0
    assert "step 2: optimizer step skipped on every rank: non-finite gradients on rank(s) [1]" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: step 3: 2 consecutive")]
    assert errors and "train.max_skipped_steps=2" in errors[0] and "non-finite loss on rank(s) [1]" in errors[0]
    assert (out / "latest").read_text().strip() == "step_0000002"  # step 3 was not saved
    assert_same_weights(out / "step_0000001", out / "step_0000002")  # both EP ranks' experts unchanged
    assert [r["skipped"] for r in losses(out)] == [False, True]

@pytest.mark.slow

def test_loss_spike_is_skipped_right_after_a_resume(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    spike = ["train.loss_spike_sigma=3", "train.loss_spike_window=2"]
    run_train(out, data_dir, *spike, "train.exit_at_step=2")
    saved = json.loads((out / "step_0000002" / "trainer_state.json").read_text())
    assert saved["loss_window"] == [r["loss"] for r in losses(out)]  # the window travels with the checkpoint
    proc = run_train(out, data_dir, *spike, fault="spike_loss:3:0", monkeypatch=monkeypatch)
    assert "step 3: optimizer step skipped on every rank: loss spike" in proc.stderr
    assert [r["skipped"] for r in losses(out)] == [False, False, True, False]
    assert_same_weights(out / "step_0000002", out / "step_0000003")


# ------------------------------------------------------------------------------------------ MoE edge cases

def _tiny():
    cfg = load_config("tiny")
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def _routers(model):
    return [m for m in model.modules() if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor)]


def test_expert_without_tokens_and_fully_masked_batch_single_process():
    cfg, model = _tiny()
    for router in _routers(model):
        router.e_score_correction_bias[0] = -1e4  # expert 0 is never selected
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert all(int(load[0]) == 0 for load in out.expert_load) and out.expert_load.sum() > 0
    loss = out.lm_loss + out.mtp_losses[0] + out.seq_aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        if name.endswith("experts.gate_proj"):
            assert p.grad[0].abs().sum() == 0 and p.grad[1:].abs().sum() > 0  # no tokens: no gradient
    model.zero_grad()
    masked = torch.full_like(ids, -100)  # every label ignored
    out = model(ids, labels=masked)
    assert out.lm_loss.item() == 0.0 and all(m.item() == 0.0 for m in out.mtp_losses)
    (out.lm_loss + out.mtp_losses[0]).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def _ep_rank_without_tokens(rank, world):
    """ep2: no token of either rank picks experts 4-7 (rank 1's), and rank 1's batch is fully masked."""
    topo = Topology(world_size=world, ep=world, rank=rank)
    initialize_parallel(topo)
    cfg, ref = _tiny()
    for router in _routers(ref):
        router.e_score_correction_bias[4:] = -1e4
    model = apply_expert_parallel(copy.deepcopy(ref), topo)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    labels = ids if rank == 0 else torch.full_like(ids, -100)
    out = model(ids, labels=labels)
    loss = out.lm_loss + out.mtp_losses[0] + out.seq_aux_loss
    loss.backward()
    assert torch.isfinite(loss) and (rank == 0 or out.lm_loss.item() == 0.0)
    assert out.expert_load[:, 4:].sum() == 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    flag = torch.tensor([1.0])
    dist.all_reduce(flag)  # both ranks got here: no hang
    assert flag.item() == world


def test_ep_rank_receiving_no_tokens_and_masked_batch_do_not_hang():
    run_distributed(_ep_rank_without_tokens, 2)

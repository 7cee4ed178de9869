"""posttrain.grpo (and posttrain.ppo) end to end on the tiny preset: the ratio is exactly 1 on each rollout's first mini-batch (and not on
the later ones), the rl.* config errors, exact resume mid-rollout and at a rollout boundary (the rollout regenerated
from its seed), and the layouts (dp2 ZeRO-1, tp2, dp2-ep2; pp2 resumed mid-rollout) giving the single process's
losses on fixed rollouts
(tests/grpo_fixed.py). A rollout is 4 prompts x G 4 = 16 outputs, 2 mini-batches of 8 (steps 1-2: rollout 0, 3-4:
rollout 1). The data (``rl_data``), the single-process fixed-rollout runs (``fixed_single``, ``ppo_single``) and the
launcher (``helpers.grpo``) are shared with tests/test_posttrain_layouts4.py (the four-process layouts)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import PPO_ARGS, PPO_KEYS, RL_KEYS as KEYS, RL_STEPS as STEPS, assert_same_losses, grpo, losses, \
    module_states


def test_ratio_is_one_on_each_rollouts_first_minibatch_only(fixed_single):
    """pi_old is the policy's own forward before the rollout's first update: rho == 1 exactly on mini-batch 1 of
    each rollout (nothing clipped, no route flipped); mini-batch 2 is trained by the once-updated policy."""
    assert [r["rl/ratio"] for r in fixed_single][0::2] == [1.0, 1.0]
    assert all(r["rl/clip_fraction"] == 0.0 and r["rl/route_flip_rate"] == 0.0 for r in fixed_single[0::2])
    assert all(abs(r["rl/ratio"] - 1.0) > 1e-5 for r in fixed_single[1::2])
    assert fixed_single[0]["rl/kl"] == 0.0  # policy = reference before the first update
    assert fixed_single[1]["rl/kl"] > 0 and fixed_single[1]["rl/route_flip_rate"] > 0
    assert fixed_single[0]["rl/reward_mean"] == fixed_single[1]["rl/reward_mean"] != fixed_single[2]["rl/reward_mean"]


def test_update_seconds_are_each_steps_own(fixed_single):
    """rl/update_seconds is the step's own update (measured after it), not the previous step's: step 1 has one
    too (it logged 0 when the value lagged a step)."""
    assert all(r["rl/update_seconds"] > 0 for r in fixed_single)


def test_throughput_counts_trained_tokens_not_padding(fixed_single, tmp_path_factory):
    """train/tokens (and so tokens/s and MFU) adds each mini-batch's prompt + response tokens, not its rows padded
    to data.seq_length (8 x 32 = 256 per step): 8 rows of a chat-rendered prompt (about 10 tokens) + 1..8 new ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(tmp_path_factory.getbasetemp().glob("fixed*/run"))
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    total = [e.value for e in acc.Scalars("train/tokens")]
    per_step = [b - a for a, b in zip([0.0] + total, total)]
    assert len(per_step) == STEPS and all(8 * 6 <= n <= 8 * 20 for n in per_step), per_step  # measured 100-114


@pytest.mark.slow
def test_one_minibatch_per_rollout_is_on_policy_everywhere(rl_data, tmp_path, monkeypatch):
    grpo(tmp_path / "run", rl_data, monkeypatch, "train.global_batch_size=16", "train.steps=2", fixed=True)
    assert [r["rl/ratio"] for r in losses(tmp_path / "run")] == [1.0, 1.0]


@pytest.mark.parametrize("override,message", [
    ("rl.temperature=0", r"^rl.temperature=0.0: must be > 0"),
    ("rl.loss_agg=sum", r"^rl.loss_agg='sum': use seq-mean-token-mean, token-mean or seq-mean-token-sum-norm$"),
    ("rl.kl_estimator=k4", r"^rl.kl_estimator='k4': use k1, k2 or k3$"),
    ("rl.overlong_cache_length=9", r"^rl.overlong_cache_length=9: must be in \[0, rl.max_new_tokens=8\]$"),
])
def test_rl_config_errors_are_one_line(override, message):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["rl.max_new_tokens=8", override])


@pytest.mark.parametrize("override,message", [
    ("rl.rewards=[]", r"^error: rl.rewards must be a non-empty list"),
    pytest.param("rl.prompts_per_step=3", r"^error: rl.prompts_per_step x rl.group_size = 12 outputs must split into "
                 r"mini-batches of train.global_batch_size=8", marks=pytest.mark.slow),
    pytest.param("rl.group_size=1", r"^error: rl.group_size=1: GRPO's baseline is the group mean; use >= 2",
                 marks=pytest.mark.slow),
    pytest.param('rl.rewards=[{fn: "grpo_fixed:broken"}]', r"^error: reward 'grpo_fixed:broken' raised "
                 r"ZeroDivisionError: division by zero on sample 0 \{'prompt': ", marks=pytest.mark.slow),
])
def test_run_errors_are_one_line(override, message, rl_data, tmp_path, monkeypatch):
    proc = grpo(tmp_path / "run", rl_data, monkeypatch, override, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and re.match(message, proc.stderr), proc.stderr


def _untimed(records: list) -> list:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = module_states(a), module_states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 2], ids=["mid-rollout", "rollout-boundary"])
def test_resume_is_exact(stop, rl_data, tmp_path, monkeypatch):
    """Sampled rollouts (the policy's own generation): N steps == stop + resume; mid-rollout the rollout file is
    reloaded, at the boundary the next rollout is regenerated from its seed."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    grpo(whole, rl_data, monkeypatch)
    grpo(parts, rl_data, monkeypatch, f"train.exit_at_step={stop}")
    grpo(parts, rl_data, monkeypatch)
    assert _untimed(losses(parts)) == _untimed(losses(whole))
    _same_weights(whole / "step_0000004", parts / "step_0000004")


@pytest.mark.slow
def test_resume_is_exact_on_two_ranks(rl_data, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    grpo(whole, rl_data, monkeypatch, "parallel.zero_stage=1", nproc=2)
    grpo(parts, rl_data, monkeypatch, "parallel.zero_stage=1", "train.exit_at_step=3", nproc=2)
    grpo(parts, rl_data, monkeypatch, "parallel.zero_stage=1", nproc=2)
    assert _untimed(losses(parts)) == _untimed(losses(whole))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=1"], ["parallel.tp=2"], ["parallel.ep=2"]],
                         ids=["dp2-zero1", "tp2", "dp2-ep2"])
def test_layouts_give_the_single_process_losses(layout, fixed_single, rl_data, tmp_path, monkeypatch):
    grpo(tmp_path / "run", rl_data, monkeypatch, *layout, nproc=2, fixed=True)
    assert_same_losses(losses(tmp_path / "run"), fixed_single, KEYS, steps=STEPS, atol=1e-6)


@pytest.mark.slow
def test_pipeline_resumed_mid_rollout_gives_the_single_process_losses(rl_data, tmp_path, monkeypatch):
    """GRPO in pp2 with its own rollouts, stopped in the middle of rollout 1 and resumed: the outputs are sampled
    through the pipeline (the same tokens as one process), pi_old / pi_ref run through it outside the schedule, each
    stage records and compares its own routers' routes (its own rollout files), the last stage computes the loss
    from DeepSpeed's labels tuple: the single process's metrics, reward and route flip rate included."""
    single, out = tmp_path / "single", tmp_path / "pp2"
    grpo(single, rl_data, monkeypatch)
    grpo(out, rl_data, monkeypatch, "parallel.pp=2", "train.exit_at_step=3", nproc=2)
    grpo(out, rl_data, monkeypatch, "parallel.pp=2", nproc=2)
    assert sorted(p.name for p in (out / "rollouts").glob("rollout_000001_dp*.pt")) == [
        "rollout_000001_dp000_pp00.pt", "rollout_000001_dp000_pp01.pt"]
    want = losses(single)
    assert want[1]["rl/route_flip_rate"] > 0 and want[0]["rl/reward_mean"] != want[2]["rl/reward_mean"]
    assert_same_losses(losses(out), want, KEYS + ("rl/route_flip_rate", "rl/response_length"), steps=STEPS,
                       atol=1e-6)


@pytest.mark.slow
def test_ppo_in_pipeline_resumed_from_another_layout(ppo_single, rl_data, tmp_path, monkeypatch):
    """PPO saved by dp2 ZeRO-1 at a rollout boundary and resumed in pp2: the critic comes back from its layout-free
    state (resharded like the policy), its values feed the next rollout's GAE and it takes its own 1F1B step after
    the policy's: the single process's metrics, the critic's included."""
    out = tmp_path / "run"
    grpo(out, rl_data, monkeypatch, *PPO_ARGS, "parallel.zero_stage=1", "train.exit_at_step=2", nproc=2, fixed=True,
         stage="ppo")
    assert (out / "critic" / "step_0000002" / "state" / "index.json").is_file()
    grpo(out, rl_data, monkeypatch, *PPO_ARGS, "parallel.pp=2", nproc=2, fixed=True, stage="ppo")
    assert_same_losses(losses(out), losses(ppo_single), PPO_KEYS + ("rl/route_flip_rate",), steps=STEPS, atol=1e-6)


def test_generate_logprobs_are_the_forwards_tempered_logprobs():
    """The rollout log-probs (``generate(logprobs=)``) equal log softmax(logits / T) of a full forward over prompt +
    output at each sampled token: the basis of rl/logprob_mismatch."""
    from helpers import make_model
    from pretrain.generate import generate

    model, _ = make_model("v3_groups_mtp")
    prompts, logprobs = [[5, 6, 7], [9, 10]], []
    outputs = generate(model, prompts, 6, temperature=0.7, seed=3, logprobs=logprobs)
    for p, out, lps in zip(prompts, outputs, logprobs):
        assert len(lps) == len(out) == 6
        with torch.no_grad():
            logits = model(torch.tensor([p + out]))[0, len(p) - 1:-1].float() / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(out)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), expected, atol=1e-4), (lps, expected)


@pytest.mark.slow
def test_options_on_fixed_rollouts(fixed_single, rl_data, tmp_path, monkeypatch):
    """mu = 2 passes (pi_old kept: rho == 1 on the rollout's first step only); the reference reset to the policy at
    rollout 1 (rl/kl == 0 on its first mini-batch) surviving a resume in the middle of that rollout."""
    grpo(tmp_path / "mu", rl_data, monkeypatch, "rl.updates_per_rollout=2", fixed=True)
    mu = losses(tmp_path / "mu")
    assert [r["rl/ratio"] == 1.0 for r in mu] == [True, False, False, False]
    assert len({r["rl/reward_mean"] for r in mu}) == 1  # one rollout, four steps
    reset = tmp_path / "reset"
    grpo(reset, rl_data, monkeypatch, "rl.ref_reset_interval=1", "train.exit_at_step=3", fixed=True)
    grpo(reset, rl_data, monkeypatch, "rl.ref_reset_interval=1", fixed=True)
    records = losses(reset)
    assert records[2]["rl/kl"] == 0.0 < records[3]["rl/kl"] < fixed_single[3]["rl/kl"]
    assert _untimed(records[:2]) == _untimed(fixed_single[:2])


@pytest.mark.slow
def test_routing_replay_dynamic_sampling_and_kl_in_reward(fixed_single, rl_data, tmp_path, monkeypatch):
    grpo(tmp_path / "replay", rl_data, monkeypatch, "rl.routing_replay=true", fixed=True)
    replay = losses(tmp_path / "replay")
    assert replay[0]["loss"] == fixed_single[0]["loss"]  # nothing flipped yet: the same routes
    assert fixed_single[1]["rl/route_flip_rate"] > 0 and replay[1]["loss"] != fixed_single[1]["loss"]
    odd = 'rl.rewards=[{fn: "grpo_fixed:digits_if_odd"}]'
    grpo(tmp_path / "plain", rl_data, monkeypatch, odd, fixed=True)
    grpo(tmp_path / "ds", rl_data, monkeypatch, odd, "rl.dynamic_sampling=true", fixed=True)
    assert min(r["rl/informative_groups"] for r in losses(tmp_path / "plain")) < 1.0
    assert [r["rl/informative_groups"] for r in losses(tmp_path / "ds")] == [1.0] * STEPS
    grpo(tmp_path / "klr", rl_data, monkeypatch, "rl.kl_in_reward=true", "rl.kl_coef=0.5", fixed=True)
    klr = losses(tmp_path / "klr")
    assert klr[0]["loss"] == pytest.approx(fixed_single[0]["loss"], abs=1e-7)  # KL 0 before the first update
    assert klr[1]["rl/kl"] > 0 and klr[2]["loss"] != fixed_single[2]["loss"]
    grpo(tmp_path / "drop", rl_data, monkeypatch, "moe.capacity_factor=1.0", "train.steps=1", fixed=True)
    drop = losses(tmp_path / "drop")[0]  # token dropping: pi_old, pi_ref and the update all drop alike
    assert drop["rl/kl"] == 0.0 and drop["rl/ratio"] == 1.0


def test_ppo_trains_policy_and_critic(ppo_single):
    """PPO on fixed rollouts: rho == 1 on each rollout's first mini-batch; the critic's engine steps (its values
    move after the first mini-batch) and is checkpointed beside the policy."""
    records = losses(ppo_single)
    assert [r["rl/ratio"] == 1.0 for r in records] == [True, False, True, False]
    assert records[0]["rl/value_clip_fraction"] == 0.0  # the critic has not moved from its rollout values yet
    assert records[0]["rl/value_mean"] != records[1]["rl/value_mean"]
    assert (ppo_single / "critic" / "step_0000004").is_dir()


@pytest.mark.slow
def test_ppo_resume_is_exact(ppo_single, rl_data, tmp_path, monkeypatch):
    """Stopped mid-rollout (step 3) and resumed == the whole run, the critic included (its checkpoint reloaded)."""
    parts = tmp_path / "parts"
    grpo(parts, rl_data, monkeypatch, *PPO_ARGS, "train.exit_at_step=3", fixed=True, stage="ppo")
    grpo(parts, rl_data, monkeypatch, *PPO_ARGS, fixed=True, stage="ppo")
    assert _untimed(losses(parts)) == _untimed(losses(ppo_single))
    _same_weights(ppo_single / "step_0000004", parts / "step_0000004")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.zero_stage=1"], ["parallel.tp=2"], ["parallel.ep=2"]],
                         ids=["dp2-zero1", "tp2", "dp2-ep2"])
def test_ppo_layouts_give_the_single_process_losses(layout, ppo_single, rl_data, tmp_path, monkeypatch):
    grpo(tmp_path / "run", rl_data, monkeypatch, *PPO_ARGS, *layout, nproc=2, fixed=True, stage="ppo")
    assert_same_losses(losses(tmp_path / "run"), losses(ppo_single), PPO_KEYS, steps=STEPS, atol=1e-6)

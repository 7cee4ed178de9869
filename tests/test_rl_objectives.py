"""posttrain.rl.objectives and posttrain.rl.advantages against hand-computed values: the KL estimators, the GRPO/PPO
clipped policy loss in each aggregation on ragged lengths, the PPO value loss, the KL-penalised reward, the group
advantage, GAE, DAPO's filters; ratio ≡ 1 on-policy and ≠ 1 in R1's later mini-batches on a tiny linear policy."""
import math

import pytest
import torch

from posttrain.rl.advantages import (broadcast_to_tokens, dynamic_sampling_keep, gae, grpo_advantages,
                                     masked_whiten, overlong_filter_mask, overlong_penalty)
from posttrain.rl.objectives import (aggregate, kl_estimate, kl_penalized_rewards, policy_loss, token_log_probs,
                                     value_loss)

LOG = math.log


def k3_of(pi: float, ref: float) -> float:
    """DeepSeekMath eq. 4 written on probabilities: π_ref/π − log(π_ref/π) − 1."""
    return ref / pi - LOG(ref / pi) - 1


# ------------------------------------------------------------------------------------------ KL estimators

def test_kl_estimators_hand_computed():
    pi = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    ref = torch.tensor([[0.25, 0.6, 0.3]], dtype=torch.float64)
    logp, logp_ref = pi.log(), ref.log()
    k1, k2, k3 = (kl_estimate(logp, logp_ref, k) for k in ("k1", "k2", "k3"))
    # k1 = log(π/π_ref): log 2, log(1/3), 0
    assert k1.tolist()[0] == pytest.approx([0.6931472, -1.0986123, 0.0], abs=1e-6)
    # k2 = ½ (log(π_ref/π))²
    assert k2.tolist()[0] == pytest.approx([0.2402265, 0.6034744, 0.0], abs=1e-6)
    # k3 = π_ref/π − log(π_ref/π) − 1: 0.5 + log 2 − 1, 3 − log 3 − 1
    assert k3.tolist()[0] == pytest.approx([0.1931472, 0.9013877, 0.0], abs=1e-6)
    assert k3.tolist()[0] == pytest.approx([k3_of(0.5, 0.25), k3_of(0.2, 0.6), 0.0], abs=1e-12)


def test_k3_and_k2_are_nonnegative_everywhere_and_clamped():
    grid = torch.linspace(-60.0, 0.0, 61)
    logp, logp_ref = torch.meshgrid(grid, grid, indexing="ij")                    # every pair, |Δ| up to 60
    for estimator in ("k2", "k3"):
        for clamp in (10.0, None):
            kl = kl_estimate(logp, logp_ref, estimator, kl_clamp=clamp)
            assert torch.isfinite(kl).all() and (kl >= 0).all(), (estimator, clamp)
    # the log-ratio is clamped to ±20 before exp, the value to ±10 (OpenRLHF, verl)
    x = torch.tensor([[50.0, -50.0, 3.0]])
    zero = torch.zeros_like(x)
    assert kl_estimate(x, zero, "k1").tolist()[0] == [10.0, -10.0, 3.0]
    assert kl_estimate(x, zero, "k1", kl_clamp=None).tolist()[0] == [20.0, -20.0, 3.0]
    unclamped = kl_estimate(x, zero, "k3", kl_clamp=None)[0]
    assert unclamped[1].item() == pytest.approx(math.exp(20) - 21, rel=1e-6)      # exp(−x)+x−1 at x = −20
    assert kl_estimate(x, zero, "k3")[0, 1].item() == 10.0
    with pytest.raises(ValueError, match="kl estimator 'k4' is not one of k1, k2, k3"):
        kl_estimate(x, zero, "k4")


# ------------------------------------------------------------------------------------------ aggregation

RAGGED_LOSS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, float("nan"), float("inf")], [7.0, -float("inf"), 0.0, 0.0]]
RAGGED_MASK = [[True] * 4, [True, True, False, False], [True, False, False, False]]


@pytest.mark.parametrize("mode, budget, expected", [
    ("seq-mean-token-mean", None, (2.5 + 5.5 + 7.0) / 3),                          # (1/G) Σ_i mean_t
    ("token-mean", None, 28.0 / 7),                                                # Σ / Σ|o_i|
    ("seq-mean-token-sum-norm", 4, 28.0 / (3 * 4)),                                # Σ / (G · budget)
])
def test_aggregations_on_ragged_lengths(mode, budget, expected):
    loss = torch.tensor(RAGGED_LOSS, requires_grad=True)
    mask = torch.tensor(RAGGED_MASK)
    value = aggregate(loss, mask, mode, generation_budget=budget)
    assert value.item() == pytest.approx(expected)
    value.backward()                                                               # NaN/inf padding never leaks
    assert torch.isfinite(loss.grad).all() and (loss.grad[~mask] == 0).all()
    # micro-batches given the mini-batch's denominator sum to the mini-batch's loss
    count = {"token-mean": 7, "seq-mean-token-mean": 3, "seq-mean-token-sum-norm": 3}[mode]
    parts = [aggregate(loss[rows], mask[rows], mode, budget, denominator=count) for rows in (slice(0, 2), slice(2, 3))]
    assert sum(p.item() for p in parts) == pytest.approx(expected)


def test_aggregation_edge_cases():
    loss, empty = torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        assert aggregate(loss, empty, mode, generation_budget=3).item() == 0.0
    # a row with no response token is left out of seq-mean-token-mean's G
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert aggregate(torch.tensor([[2.0, 4.0, 9.0], [5.0, 5.0, 5.0]]), mask).item() == 3.0
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm needs generation_budget > 0"):
        aggregate(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="loss aggregation 'sum' is not one of"):
        aggregate(loss, mask, "sum")


# ------------------------------------------------------------------------------------------ policy loss

def _fixed_rollout():
    """Two outputs, π_old = 0.4 on every token. Row 0 (Â = +1): ρ = 1.5, 0.5, 1.1; row 1 (Â = −1, 2 tokens):
    ρ = 0.5, 1.5. With ε = 0.2: row 0 s = min(1.5, 1.2) = 1.2 (clipped high), min(0.5, 0.8) = 0.5, 1.1;
    row 1 s = min(−0.5, −0.8) = −0.8 (clipped low), min(−1.5, −1.2) = −1.5."""
    pi = torch.tensor([[0.6, 0.2, 0.44], [0.2, 0.6, 0.3]], dtype=torch.float64)
    logp = pi.log().requires_grad_()
    logp_old = torch.full_like(pi, LOG(0.4))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp, logp_old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask


@pytest.mark.parametrize("mode, expected", [
    ("seq-mean-token-mean", -((1.2 + 0.5 + 1.1) / 3 + (-0.8 - 1.5) / 2) / 2),
    ("token-mean", -(1.2 + 0.5 + 1.1 - 0.8 - 1.5) / 5),
    ("seq-mean-token-sum-norm", -(1.2 + 0.5 + 1.1 - 0.8 - 1.5) / (2 * 4)),
])
def test_clipped_policy_loss_hand_computed(mode, expected):
    logp, logp_old, adv, mask = _fixed_rollout()
    loss, metrics = policy_loss(logp, logp_old, adv, mask, eps_low=0.2, aggregation=mode, generation_budget=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 5)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5)
    assert "kl" not in metrics and "entropy" not in metrics


def test_clipped_policy_loss_gradient_and_clip_higher():
    logp, logp_old, adv, mask = _fixed_rollout()
    loss, _ = policy_loss(logp, logp_old, adv, mask, aggregation="token-mean")
    loss.backward()
    # d(−s/5)/dlogp = −ρÂ/5 where unclipped, 0 on the two clipped tokens and the padding
    expected = torch.tensor([[0.0, -0.5 / 5, -1.1 / 5], [0.0, 1.5 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)
    # DAPO clip-higher ε_high = 0.28: the high clip moves from 1.2 to 1.28 (ρ = 1.5, Â > 0)
    loss, metrics = policy_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token-mean")
    assert loss.item() == pytest.approx(-(1.28 + 0.5 + 1.1 - 0.8 - 1.5) / 5)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5)


def test_grpo_loss_with_k3_in_the_loss_and_importance_correction():
    logp, logp_old, adv, mask = _fixed_rollout()
    logp_ref = logp_old.clone()                                                   # π_ref = 0.4 everywhere
    kls = [k3_of(0.6, 0.4), k3_of(0.2, 0.4), k3_of(0.44, 0.4), k3_of(0.2, 0.4), k3_of(0.6, 0.4)]
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    loss, metrics = policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, beta=0.1, kl_estimator="k3",
                                aggregation="token-mean", entropy=entropy)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1 - 0.8 - 1.5 - 0.1 * sum(kls)) / 5, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(sum(kls) / 5)
    assert metrics["entropy"].item() == pytest.approx(3.0)                         # padding's 100 left out
    # ×ρ: E_π_old[ρ k] = E_π_θ[k] (DeepSeek-V3.2's unbiased KL)
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5]
    _, metrics = policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, beta=0.1, kl_importance_correction=True,
                             aggregation="token-mean")
    assert metrics["kl"].item() == pytest.approx(sum(r * k for r, k in zip(ratios, kls)) / 5)


# ------------------------------------------------------------------------------------------ on- and off-policy

def _linear_policy_rollout(num_rows: int, seed: int = 0):
    """A tiny linear policy logits = x W over 5 tokens; rollout of num_rows outputs of ragged length (≤ 6)
    sampled from it, G = 4, uniform(0, 1) rewards (no group is all-equal, so every mini-batch moves W)
    -> (W, features, tokens, mask, advantages per token)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(8, 5, generator=gen, dtype=torch.float64))
    x = torch.randn(num_rows, 6, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        probs = torch.softmax(x @ W, dim=-1).view(-1, 5)
        tokens = torch.multinomial(probs, 1, generator=gen).view(num_rows, 6)
    lengths = torch.randint(1, 7, (num_rows,), generator=gen)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    rewards = torch.rand(num_rows, generator=gen, dtype=torch.float64)
    advantages = broadcast_to_tokens(grpo_advantages(rewards, 4), mask).double()
    return W, x, tokens, mask, advantages


def _logp(W, x, tokens):
    return token_log_probs(x @ W, tokens)[0]


def test_one_optimizer_step_per_rollout_is_on_policy_everywhere():
    """μ = 1 and one mini-batch: ρ ≡ 1 on every token, nothing clipped, and the gradient is the plain policy
    gradient −(1/G) Σ_i (1/|o_i|) Σ_t Â_it ∇log π(o_it)."""
    W, x, tokens, mask, adv = _linear_policy_rollout(16)
    with torch.no_grad():
        logp_old = _logp(W, x, tokens)                                            # the rollout's forward
    loss, metrics = policy_loss(_logp(W, x, tokens), logp_old, adv, mask)
    assert metrics["ratio"].item() == 1.0 and metrics["clip_fraction"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, W)
    logp = _logp(W, x, tokens)
    reinforce = -((adv * logp * mask).sum(-1) / mask.sum(-1)).mean()
    (expected,) = torch.autograd.grad(reinforce, W)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_r1_sixteen_mini_batches_later_ones_are_off_policy():
    """R1: a rollout split into 16 mini-batches, one inner epoch, an update after each. π_old is the rollout
    policy, computed by the same forward on each mini-batch before any update: ρ ≡ 1 on the first mini-batch, and
    ≠ 1 on every later one (the parameters moved), where clipping starts to act."""
    W, x, tokens, mask, adv = _linear_policy_rollout(64, seed=1)
    batches = [slice(4 * k, 4 * k + 4) for k in range(16)]
    with torch.no_grad():
        logp_old = [_logp(W, x[b], tokens[b]) for b in batches]
    deviations, clipped = [], 0.0
    for k, b in enumerate(batches):
        logp = _logp(W, x[b], tokens[b])
        ratio = torch.exp(logp - logp_old[k])[mask[b]]
        deviations.append((ratio - 1).abs().max().item())
        loss, metrics = policy_loss(logp, logp_old[k], adv[b], mask[b])
        if k == 0:
            assert (ratio == 1.0).all() and metrics["ratio"].item() == 1.0
        clipped += metrics["clip_fraction"].item()
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():                                                     # an SGD step, lr 1
            W -= grad
    assert deviations[0] == 0.0
    assert all(d > 1e-3 for d in deviations[1:]), deviations
    assert clipped > 0.0


# ------------------------------------------------------------------------------------------ PPO

def test_ppo_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 0.5, 7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[1.5, 1.5, 0.5, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 3.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = value_loss(values, old, returns, mask, eps_value=0.2)
    # t0: max((1−2)², (1.3−2)²) = 1; t1: max((2−3)², (1.7−3)²) = 1.69 (clipped); t2: max(0.25, 0.25)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.69 + 0.25) / 3)
    assert metrics["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # ½·2(V − R)/3 on the unclipped tokens; 0 where the clipped term wins (V moved past ε_v)
    assert values.grad.tolist()[0] == pytest.approx([-1 / 3, 0.0, -0.5 / 3, 0.0])


def test_ppo_kl_penalty_in_the_reward():
    logp = torch.tensor([[LOG(0.5), LOG(0.3), LOG(0.1)], [LOG(0.2), 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp_ref = torch.tensor([[LOG(0.25), LOG(0.3), LOG(0.2)], [LOG(0.4), 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, -0.5, 3.0]), logp, logp_ref, mask, beta=0.1)
    # −β log(π/π_ref) per token, the score added on the last response token; a row with no token gets nothing
    expected = [[-0.1 * LOG(2), 0.0, -0.1 * LOG(0.5) + 1.0], [-0.1 * LOG(0.5) - 0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]
    for row, want in zip(rewards.tolist(), expected):
        assert row == pytest.approx(want, abs=1e-6)
    # GRPO with the KL in the reward: the row sum is score − β Σ_t k1
    assert rewards.sum(-1)[0].item() == pytest.approx(1.0 - 0.1 * (LOG(2) + LOG(0.5)), abs=1e-6)


def test_gae_hand_computed_with_ragged_lengths_and_holes():
    pad = 9.0
    rewards = torch.tensor([[0.0, 0.0, 1.0, pad], [0.0, 2.0, pad, pad], [pad, 0.0, pad, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, pad], [1.0, 0.5, pad, pad], [pad, 0.5, pad, 0.7]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False, True, False, True]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 − 0.7 = 0.3; δ1 = 0.7 − 0.6 = 0.1, Â1 = 0.1 + 0.5·0.3 = 0.25; δ0 = 0.1, Â0 = 0.1 + 0.5·0.25
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0, 0.0])
    # row 1 (right padded): δ1 = 2 − 0.5 = 1.5; δ0 = 0.5 − 1 = −0.5, Â0 = −0.5 + 0.5·1.5
    assert adv[1].tolist() == pytest.approx([0.25, 1.5, 0.0, 0.0])
    # row 2 (a masked hole between two tokens): the hole is skipped, V_{t+1} is the next response token's
    assert adv[2].tolist() == pytest.approx([0.0, 0.2 + 0.5 * 0.3, 0.0, 0.3])
    # γ = 0.9, λ = 0.95: δ1 = 1 − 0.4, δ0 = 0.9·0.4 − 0.2, Â0 = δ0 + 0.855·δ1
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2, dtype=torch.bool), 0.9, 0.95)
    assert adv[0].tolist() == pytest.approx([0.16 + 0.855 * 0.6, 0.6])


def test_gae_with_lambda_one_is_the_monte_carlo_return():
    rewards, values = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.3, 0.1, -0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([1.5, 1.0, 2.0])                      # Σ_{s≥t} r_s
    assert adv[0].tolist() == pytest.approx([1.2, 0.9, 2.4])


# ------------------------------------------------------------------------------------------ GRPO advantages

def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    adv = grpo_advantages(rewards, 4)
    # group 0: mean 0.5, sample std sqrt(4·0.25/3) = 0.57735
    assert adv[:4].tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], abs=1e-5)
    # group 1: mean 2, deviations ±1, 0, 0, sample var 2/3
    assert adv[4:8].tolist() == pytest.approx([1.2247449, -1.2247449, 0.0, 0.0], abs=1e-5)
    # zero-std groups, including 0.1 (whose float mean is not exactly 0.1): Â = 0 exactly
    assert adv[8:].tolist() == [0.0] * 8
    # Dr. GRPO: no std division
    assert grpo_advantages(rewards, 4, normalize_std=False)[:8].tolist() == [0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0]
    with pytest.raises(ValueError, match="do not split into groups of rl.group_size=4"):
        grpo_advantages(rewards[:5], 4)
    with pytest.raises(ValueError, match="rl.group_size must be >= 2"):
        grpo_advantages(rewards, 1)


def test_broadcast_dynamic_sampling_and_whitening():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask).tolist() == [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    keep = dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [False, False, True, True, False, False]
    whitened = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 50.0]]), torch.tensor([[True, True, True, False]]))
    assert whitened[0].tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449, 0.0], abs=1e-5)


def test_dapo_overlong_shaping_and_filtering():
    # L_max 20, L_cache 4: 0 up to 16, then −1/4 per token, −1 at 20 and beyond
    penalty = overlong_penalty(torch.tensor([10, 16, 17, 18, 20, 21]), max_length=20, cache_length=4)
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match=r"cache_length must be in \(0, max_length=20\]"):
        overlong_penalty(torch.tensor([1]), 20, 21)
    mask = torch.ones(3, 2, dtype=torch.bool)
    assert overlong_filter_mask(mask, torch.tensor([False, True, False])).tolist() == [[True] * 2, [False] * 2,
                                                                                      [True] * 2]


def test_token_log_probs_and_entropy_at_a_temperature():
    logits = torch.tensor([[[0.0, LOG(3.0)]]])                                    # p = 0.25, 0.75
    logp, entropy = token_log_probs(logits, torch.tensor([[1]]))
    assert logp.item() == pytest.approx(LOG(0.75))
    assert entropy.item() == pytest.approx(-(0.25 * LOG(0.25) + 0.75 * LOG(0.75)))
    logp, _ = token_log_probs(logits, torch.tensor([[1]]), temperature=2.0)        # p ∝ 1, √3
    assert logp.item() == pytest.approx(LOG(math.sqrt(3) / (1 + math.sqrt(3))))

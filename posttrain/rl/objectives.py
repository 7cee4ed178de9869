"""RL objectives on per-token log-probabilities: GRPO / PPO clipped policy loss, KL estimators, PPO value loss and
the KL-penalised per-token reward. Plain PyTorch (no torch.distributed): the rollout loop calls these on each
micro-batch and passes the global denominators (`denominator=`) so that a mini-batch split over micro-batches and
data-parallel ranks gives the loss of the whole mini-batch.

Conventions (every function):
    logp, logp_old, logp_ref   (B, T) float: log π(o_t | q, o_<t) of the sampled response token t under the policy
                               being trained, the policy that sampled the rollout (π_old) and the frozen reference
    mask                       (B, T) bool: True on response tokens (prompt and padding False)
    advantages                 (B, T), or (B,) for one value per output broadcast to its tokens

Padding never reaches an exp: masked positions are set to 0 before any arithmetic (`torch.where`, not a product,
so a -inf or NaN log-prob in the padding cannot turn the sum or the gradient into NaN).

Clamping, as the mature implementations do it, and why:
    * the log-ratio log(π/π_base) is clamped to [-20, 20] before every exp (the ratio ρ and the k3 estimator):
      verl clamps exactly there (`compute_policy_loss` and its `low_var_kl` penalty). exp(20) = 4.9e8 stays far from
      the fp32/bf16 overflow at exp(88.7), so one token whose probability collapsed (or a rollout engine's outlier
      log-prob) gives a large but finite ratio instead of inf -> NaN. Inside the clamp values and gradients are exact.
    * the KL estimate itself is clamped to [-10, 10] (`kl_clamp`; None disables): OpenRLHF clamps every estimator's
      value there, verl its k3 (`low_var_kl`). k3 grows like exp(|log-ratio|) and a single token past 10 nats would
      dominate the β-weighted sum; the clamp caps its value and zeroes its gradient.
    * TRL's GRPOTrainer clamps neither; with `kl_clamp=None` and log-ratios inside ±20 the functions here equal it.
"""
import torch

LOG_RATIO_CLAMP = 20.0
"""|log(π/π_base)| is clamped to this before exp (verl's value)."""
KL_CLAMP = 10.0
"""Default clamp of a per-token KL estimate (OpenRLHF's and verl's value)."""
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask else 0: selects, never multiplies, so inf/NaN padding neither leaks nor poisons gradients."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, T) over mask (B, T) bool; 0 when the mask is empty (never NaN)."""
    return _masked(x, mask).sum() / mask.sum().clamp(min=1)


def clamped_log_ratio(logp: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """log(π/π_base) = logp − logp_base, clamped to ±LOG_RATIO_CLAMP (see the module docstring). (B, T) -> (B, T)."""
    return (logp - logp_base).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k3",
                kl_clamp: float | None = KL_CLAMP) -> torch.Tensor:
    """Per-token estimate of D_KL(π_θ || π_ref) from a token sampled from π_θ (Schulman, "Approximating KL
    divergence", 2020). With x = log(π_θ/π_ref) = logp − logp_ref (clamped to ±20):

        k1 = x                         = log(π/π_ref)                      unbiased, can be negative
        k2 = x² / 2                    = ½ (log(π_ref/π))²                  biased, ≥ 0, low variance
        k3 = exp(−x) + x − 1           = π_ref/π − log(π_ref/π) − 1          unbiased, ≥ 0 (DeepSeekMath eq. 4)

    k3 ≥ 0 everywhere since e^y ≥ 1 + y. The value is clamped to ±kl_clamp (OpenRLHF, verl) unless None.
    logp, logp_ref (B, T) -> (B, T); positions outside the response are the caller's to mask.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
    x = clamped_log_ratio(logp, logp_ref)
    if estimator == "k1":
        kl = x
    elif estimator == "k2":
        kl = 0.5 * x * x
    else:
        kl = torch.exp(-x) + x - 1.0
    return kl if kl_clamp is None else kl.clamp(-kl_clamp, kl_clamp)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "seq-mean-token-mean",
              generation_budget: int | None = None, denominator: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss (B, T) over the response tokens `mask` (B, T) bool to a scalar.

        seq-mean-token-mean       (1/G) Σ_i (1/|o_i|) Σ_t ℓ_it        DeepSeekMath eq. 3 (GRPO as published); a row
                                                                     with no response token is left out of G
        token-mean                Σ_i Σ_t ℓ_it / Σ_i |o_i|             DAPO eq. 12 (token-level), PPO's usual mean
        seq-mean-token-sum-norm   Σ_i Σ_t ℓ_it / (G · L)               Dr. GRPO §3.2: L = `generation_budget`, a
                                                                     constant (the max new tokens), G = every row

    `denominator` replaces the count in the divisor (rows for the two seq- modes, tokens for token-mean): the
    loop passes the whole mini-batch's count when a micro-batch or a data-parallel rank holds only part of it, so
    the per-micro-batch losses sum to the mini-batch loss. A fully masked input gives 0, never NaN.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of {', '.join(AGGREGATIONS)}")
    token_sum = _masked(loss, mask).sum(dim=-1)                                      # (B,)
    if mode == "token-mean":
        count = mask.sum() if denominator is None else denominator
    elif mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1)                                                   # (B,)
        token_sum = token_sum / lengths.clamp(min=1)
        count = (lengths > 0).sum() if denominator is None else denominator
    else:
        if generation_budget is None or generation_budget <= 0:
            raise ValueError("loss aggregation seq-mean-token-sum-norm needs generation_budget > 0 "
                             "(Dr. GRPO divides by the constant max new tokens, e.g. rl.max_new_tokens)")
        rows = mask.shape[0] if denominator is None else denominator
        count = rows * generation_budget
    if isinstance(count, torch.Tensor):
        count = count.clamp(min=1)
    elif count <= 0:
        raise ValueError(f"loss denominator must be > 0, got {count}")
    return token_sum.sum() / count


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: float | None = None, logp_ref: torch.Tensor | None = None,
                beta: float = 0.0, kl_estimator: str = "k3", kl_clamp: float | None = KL_CLAMP,
                kl_importance_correction: bool = False, aggregation: str = "seq-mean-token-mean",
                generation_budget: int | None = None, denominator: float | None = None,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss of GRPO (DeepSeekMath §4.1, eq. 3) and PPO (Schulman et al. 2017, eq. 7), negated:

        ρ_t  = π_θ/π_old = exp(logp − logp_old)                      (log-ratio clamped to ±20)
        s_t  = min(ρ_t Â_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_t) − β D_KL,t
        loss = −aggregate(s)                                          (see `aggregate`)

    ε_high defaults to ε_low (the symmetric clip of the papers); ε_high > ε_low is DAPO's clip-higher (§3.1).
    D_KL,t = kl_estimate(logp, logp_ref, kl_estimator) inside the per-token sum (GRPO: k3, β 0.04 in
    DeepSeekMath, 0.001 in R1); β = 0 or logp_ref None leaves it out (PPO puts the KL in the reward instead:
    `kl_penalized_rewards`). kl_importance_correction multiplies it by ρ_t (not detached): the tokens were sampled
    from π_old, and E_π_old[ρ k] = E_π_θ[k] (DeepSeek-V3.2 §3.1's unbiased KL estimate), needed once π_θ ≠ π_old.
    With logp == logp_old (the first mini-batch of a rollout) ρ ≡ 1, nothing is clipped and the gradient is the
    plain policy gradient −Â ∇logp.

    Shapes: logp, logp_old, logp_ref, mask (B, T); advantages (B, T) or (B,); entropy (B, T) per-token entropy of
    π_θ (metric only). Returns (loss scalar, metrics): token means over the mask, detached —
    clip_fraction_low (ρ < 1 − ε_low with Â < 0: clipping zeroes the token's gradient), clip_fraction_high
    (ρ > 1 + ε_high with Â > 0), clip_fraction (their sum), ratio (mean ρ), kl (mean D_KL, when logp_ref is
    given), entropy (when given).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    logp, logp_old, advantages = _masked(logp, mask), _masked(logp_old, mask), _masked(advantages, mask)
    ratio = torch.exp(clamped_log_ratio(logp, logp_old))                             # (B, T)
    surrogate = torch.minimum(ratio * advantages,
                              torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages)
    metrics = {}
    if logp_ref is not None:
        kl = kl_estimate(logp, _masked(logp_ref, mask), kl_estimator, kl_clamp)
        if kl_importance_correction:
            kl = ratio * kl
        if beta:
            surrogate = surrogate - beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = -aggregate(surrogate, mask, aggregation, generation_budget, denominator)
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (advantages < 0) & mask
        high = (ratio > 1.0 + eps_high) & (advantages > 0) & mask
        count = mask.sum().clamp(min=1)
        metrics.update(clip_fraction_low=low.sum() / count, clip_fraction_high=high.sum() / count,
                       clip_fraction=(low | high).sum() / count, ratio=masked_mean(ratio, mask))
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               eps_value: float = 0.2, aggregation: str = "token-mean", generation_budget: int | None = None,
               denominator: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss (the OpenAI baselines ppo2 form, also TRL/verl/OpenRLHF):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        ℓ_t    = ½ · max((V_t − R_t)², (V_clip,t − R_t)²)
        loss   = aggregate(ℓ)                                          (token-mean by default)

    values (B, T) from the critic being trained, old_values (B, T) the critic's values at rollout time, returns
    (B, T) the GAE returns (`advantages.gae`), mask (B, T) bool. Returns (loss, {"value_clip_fraction": share of
    tokens where the clipped term is the larger one, i.e. where clipping zeroes the gradient}).
    """
    values, old_values, returns = _masked(values, mask), _masked(old_values, mask), _masked(returns, mask)
    clipped = old_values + torch.clamp(values - old_values, -eps_value, eps_value)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped - returns) ** 2
    loss = aggregate(0.5 * torch.maximum(unclipped_error, clipped_error), mask, aggregation,
                     generation_budget, denominator)
    with torch.no_grad():  # only where V was clipped: elsewhere V_clip = V up to rounding, and > would be noise
        was_clipped = ((values - old_values).abs() > eps_value) & (clipped_error > unclipped_error)
        fraction = masked_mean(was_clipped.to(values.dtype), mask)
    return loss, {"value_clip_fraction": fraction}


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                         beta: float, estimator: str = "k1", kl_clamp: float | None = KL_CLAMP) -> torch.Tensor:
    """Per-token rewards with the KL penalty in the reward (InstructGPT / Ziegler et al. 2019, eq. 2; PPO's
    `kl_in: reward`):

        r_t = −β · k_t                    on every response token (k1 = log(π_old/π_ref) by default)
        r_T = −β · k_T + score            on the last response token (the reward model's or rule score)

    scores (B,), logp (rollout policy) and logp_ref (B, T), mask (B, T) bool -> rewards (B, T), 0 outside the
    mask, no gradient (rewards are data). For GRPO with the KL in the reward, `.sum(-1)` of this is the sequence
    reward score_i − β Σ_t k_it that enters the group advantage. A row without a response token gets 0 everywhere.
    """
    with torch.no_grad():
        rewards = _masked(-beta * kl_estimate(logp, _masked(logp_ref, mask), estimator, kl_clamp), mask)
        T = mask.shape[-1]
        last = T - 1 - mask.flip(-1).to(torch.int64).argmax(dim=-1)                # (B,) index of the last True
        has_tokens = mask.any(dim=-1)
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, last] += torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token) and the entropy of π at each position from logits (B, T, V) and tokens (B, T) ->
    (logp (B, T), entropy (B, T)), in fp32. logits[:, t] must be the prediction of tokens[:, t] (the caller shifts).
    The logits are divided by the sampling temperature first: the ratio and the KL must be taken under the
    distribution the rollout sampled from (TRL and verl do the same)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)                # (B, T, V)
    logp = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy

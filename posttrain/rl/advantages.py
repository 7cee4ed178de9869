"""Advantages and reward shaping for GRPO and PPO: the group-relative outcome advantage, GAE, DAPO's dynamic sampling
filter and overlong shaping/masking. Pure functions of tensors; no gradient flows through any of them.

Layout: a rollout's N = num_prompts × G outputs are prompt-major, the G samples of prompt p in rows p·G … p·G+G−1
(the order `generate` returns when each prompt is repeated G times). Token tensors are (N, T) over the response
tokens, with a bool mask (N, T) True on response tokens.
"""
import torch


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G), with a one-line error when the rows do not split into groups of G."""
    if group_size < 2:
        raise ValueError(f"rl.group_size must be >= 2 for a group-relative advantage, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"rl.group_size={group_size}: expected (num_prompts * group_size,)")
    return rewards.view(-1, group_size)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) rewards -> (N / G,) bool: True for a group whose G rewards are all exactly equal (std 0)."""
    grouped = _groups(rewards, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                    eps_std: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome-supervision advantage (DeepSeekMath §4.1.2), one value per output:

        Â_i = (r_i − mean(r)) / (std(r) + ε_std)      over the G rewards r of output i's group

    std is the sample standard deviation (Bessel's N − 1, torch.std's default, as TRL, verl and OpenRLHF use),
    ε_std = 1e-6 (verl's; TRL uses 1e-4). normalize_std=False gives Â_i = r_i − mean(r) (Dr. GRPO §3.2: the std
    division over-weights groups that are nearly all right or all wrong). A group whose rewards are all equal gets
    Â = 0 exactly (not (r − mean)/ε_std of a rounding error): it carries no learning signal.

    rewards (N,) prompt-major -> advantages (N,) in fp32; `broadcast_to_tokens` gives every token of output i its Â_i.
    """
    grouped = _groups(rewards, group_size).float()                                   # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps_std)
    uniform = uniform_groups(rewards, group_size)
    return torch.where(uniform[:, None], torch.zeros_like(centred), centred).reshape(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome advantage (N,) -> (N, T): Â_it = Â_i on each response token of output i (mask (N, T) bool), 0 off it."""
    return torch.where(mask, advantages[:, None].to(torch.float32), torch.zeros((), device=mask.device))


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling filter (§3.2): keep only groups whose rewards are not all equal (0 < accuracy < 1 for
    a 0/1 reward): an all-equal group has Â = 0 and only dilutes the batch. rewards (N,) -> (N,) bool per row, so
    `rollout[keep]` keeps whole groups; the loop samples more prompts until the batch is full again."""
    return (~uniform_groups(rewards, group_size)).repeat_interleave(group_size)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the response tokens:

        δ_t = r_t + γ V_{t+1} − V_t,   Â_t = δ_t + γλ Â_{t+1},   R_t = Â_t + V_t (the value target)

    with V and Â after a sequence's last response token = 0 (the episode ends there). Tokens outside the mask are
    skipped, not treated as steps: t+1 is the next response token of the same row, so right padding (outputs of
    different lengths), left padding and masked holes all give the recursion over that row's own tokens.

    rewards, values (N, T) float, mask (N, T) bool -> (advantages (N, T), returns (N, T)), fp32, 0 off the mask.
    """
    rewards, values = rewards.float(), values.float()
    next_value = torch.zeros(rewards.shape[0], device=rewards.device)               # V of the next response token
    next_advantage = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(live, advantage, torch.zeros_like(advantage))
        next_value = torch.where(live, values[:, t], next_value)
        next_advantage = torch.where(live, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked tokens, 0 off the mask: the advantage normalisation of PPO in
    RLHF (Ziegler et al. 2019; TRL, OpenRLHF); var is the population variance of the masked tokens. (N, T) -> (N, T).
    ``reduce``, if given, sums a tensor over the ranks holding the other rows (the rollout loop's data-parallel
    sum), so mean and var are those of every rank's tokens: the single-process result."""
    reduce = reduce or (lambda t: t)
    total, count = reduce(torch.stack([torch.where(mask, x, torch.zeros_like(x)).sum(), mask.sum().to(x.dtype)]))
    mean = total / count.clamp(min=1)
    var = reduce(torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum()) / count.clamp(min=1)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (§3.4, eq. 13), added to the task reward:

        R_length(y) = 0                                   |y| ≤ L_max − L_cache
                    = ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
                    = −1                                  |y| > L_max

    L_max = max_length (the generation budget, rl.max_new_tokens), L_cache = cache_length (DAPO: 4,096 of 20,480).
    The penalty falls linearly from 0 to −1 over the last L_cache tokens of the budget. lengths (N,) -> (N,) fp32.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong cache_length must be in (0, max_length={max_length}], got {cache_length}")
    lengths = lengths.float()
    start = max_length - cache_length
    ramp = (start - lengths) / cache_length
    return torch.where(lengths <= start, torch.zeros_like(lengths),
                       torch.where(lengths <= max_length, ramp, torch.full_like(lengths, -1.0)))


def overlong_filter_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering (§3.4): the loss mask (N, T) bool with every token of a truncated output
    (truncated (N,) bool: hit the budget without an end token) masked out, so a cut-off reasoning that might have
    been right is not punished. Use with the token-mean aggregation (a fully masked row then weighs nothing)."""
    return mask & ~truncated[:, None]

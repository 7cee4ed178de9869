"""DeepSeekMoE: router (softmax / sigmoid, group-limited top-k, aux-loss-free bias), grouped experts, balance terms.

An MoE layer is four steps: route (``gate``), dispatch (sort token copies by expert), compute (``experts``),
combine (weighted scatter-add back to tokens). ``mlp.experts(x, topk_idx, topk_weight, keep)`` is the whole
dispatch-compute-combine; ``parallel.expert`` replaces it with an all-to-all version that calls
``GroupedExperts.compute`` on the tokens for its local experts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.layers import MLP


class Router(nn.Module):
    """Top-k router. ``weight (E, H)``; buffer ``e_score_correction_bias (E,)`` steers selection only."""

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))
        self.routes = None
        """An object whose ``route(router, topk_idx) -> topk_idx`` sees (and may replace) each forward's choice: RL
        records the routes of the rollout's forward and replays them in the training forward."""

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the bias: gamma-sized updates (1e-3) vanish in bf16 (as transformers'
        # _keep_in_fp32_modules_strict does for DeepSeek-V3).
        super()._apply(fn, recurse)
        self._buffers["e_score_correction_bias"] = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, H) -> topk_idx (N, K) long, topk_weight (N, K) fp32, scores (N, E) fp32 (unbiased)."""
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32, as DeepSeek does
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():
            topk_idx = self._select(scores.detach() + self.e_score_correction_bias)
        if self.routes is not None:  # RL routing record / replay (posttrain.rl.trainer)
            topk_idx = self.routes.route(self, topk_idx)
        topk_weight = scores.gather(1, topk_idx)  # gating weights from the unbiased scores
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, scores

    def _select(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on biased scores ``choice (N, E)``.

        Group score: sum of the top-2 scores in the group for sigmoid (V3), the max for softmax (V2's
        group_limited_greedy). Experts outside the best ``topk_group`` groups are masked out.
        """
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.scoring_func == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (N, topk_group)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: gate_proj (E, I, H), up_proj (E, I, H), down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, H), topk_idx (N, K), topk_weight (N, K), keep (N, K) bool or None (token dropping: False copies are
        neither computed nor added) -> (N, H): sum_k weight_k * expert_{idx_k}(x)."""
        flat_idx = topk_idx.flatten()  # (N*K,)
        copies = kept_copies(keep, flat_idx)
        order = copies[flat_idx[copies].argsort(stable=True)]  # kept token copies sorted by expert
        token_of = order // topk_idx.shape[1]
        counts = expert_counts(flat_idx[order], self.num_experts)  # (E,)
        y = self.compute(gather_rows(x, token_of), counts)  # (M, H)
        y = y * topk_weight.flatten()[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))

    def compute(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run the experts on tokens sorted by expert. x_sorted (M, H), counts (E,) summing to M -> (M, H).

        One ``torch._grouped_mm`` per projection (a single kernel over ragged groups, no host sync; faster than
        the loop: measured in bench/results.md, "Components vs the plain PyTorch op") on CPU in fp32/bf16
        and on CUDA in bf16 from sm90 (the kernel's limits). Otherwise a loop over the contiguous per-expert
        slices (never a mask over all tokens per expert), which reads the counts on the host. The loop also runs
        on the CPU for a handful of token copies without autograd (decoding: ``SMALL_BATCH_COPIES``): the CPU
        ``_grouped_mm`` visits every expert, empty or not, while the loop skips the empty ones (the same
        per-expert products; other kernels, so equal up to float reassociation).
        """
        small = (x_sorted.device.type == "cpu" and x_sorted.shape[0] * SMALL_BATCH_COPIES <= self.num_experts
                 and not torch.is_grad_enabled())  # training keeps one kernel whatever its micro-batch
        if _grouped_mm_ok(x_sorted) and not small:
            return _grouped_swiglu(x_sorted, counts, self.gate_proj, self.up_proj, self.down_proj)
        outs = [x_sorted[:0]]
        for e, xs in enumerate(x_sorted.split(counts.tolist())):
            if xs.shape[0]:
                h = F.silu(F.linear(xs, self.gate_proj[e])) * F.linear(xs, self.up_proj[e])
                outs.append(F.linear(h, self.down_proj[e]))
        return torch.cat(outs)


SMALL_BATCH_COPIES = 8
"""CPU: the per-expert loop replaces ``_grouped_mm`` when there are at most (num_experts / this) token copies
(measured: 2 copies over 64 experts 2.5x faster, 16 about even; bench/results.md, generation)."""


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not _HAS_GROUPED_MM:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is one ``index_add_``.

    Autograd's own backward for ``x[index]`` is ``index_put_`` with accumulation, slower than ``index_add_``
    (measured in bench/results.md, "Components vs the plain PyTorch op")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, *grad.shape[1:]).index_add_(0, index, grad), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` (index (M,) long, repeats allowed) with a fast backward: the MoE dispatch gather."""
    return _GatherRows.apply(x, index)


def kept_copies(keep: torch.Tensor | None, flat_idx: torch.Tensor) -> torch.Tensor:
    """Indices (M,) of the token copies to compute: all N*K without token dropping, else where ``keep (N, K)``."""
    if keep is None:
        return torch.arange(flat_idx.numel(), device=flat_idx.device)
    return keep.flatten().nonzero().squeeze(1)


def expert_counts(flat_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token copies per expert: flat_idx (M,) long -> (E,) long. A scatter-add, not ``torch.bincount``, which on
    CUDA reads the input's maximum back to the host (a device sync per MoE layer)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_idx.device)
    return counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))


def _grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor,
                    down_w: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over ragged groups: x (M, H) sorted by expert, counts (E,) -> (M, H).

    Calls ``torch._grouped_mm``, except fp32 under torch.compile: there it goes through the opaque
    ``pretrain::grouped_mm`` op, since ``_grouped_mm``'s own fake-tensor rule (torch 2.13) accepts only bf16 (the
    CUDA kernel's limit) while the CPU kernel runs fp32 too; so the fp32 step compiles without a graph break.
    """
    opaque = x.dtype != torch.bfloat16 and torch.compiler.is_compiling()
    mm = _grouped_mm_op if opaque else torch._grouped_mm
    offs = counts.cumsum(0).to(torch.int32)
    gate = mm(x, gate_w.transpose(-2, -1), offs=offs)
    up = mm(x, up_w.transpose(-2, -1), offs=offs)
    return mm(F.silu(gate) * up, down_w.transpose(-2, -1), offs=offs)


@torch.library.custom_op("pretrain::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a (M, K), b (E, K, N), offs)`` -> (M, N), opaque to torch.compile."""
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # (M, K) x (E, K, N) -> (M, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # (K, M) x (M, N), groups along M -> (E, K, N)


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    # the forward is (M, K) x (E, K, N): dA = dY B^T per group, dB_e = A_e^T dY_e (groups along M)
    return _grouped_mm_op(grad, b.transpose(-2, -1), offs), _grouped_mm_op(a.t(), grad, offs), None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def balance_losses(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, num_groups: int = 1,
                   topk_group: int = 1) -> dict[str, torch.Tensor]:
    """One layer's balance terms (unweighted), each computed per sequence (T = one sequence's tokens) and averaged
    over the micro-batch's sequences.

    scores (N, E) unbiased router scores with N = batch * T, topk_idx (N, K). s' = scores normalised to sum 1 per
    token (identity for softmax), f_i = E / (K T) * (tokens choosing expert i), P_i = mean_t s'_i.

    - ``seq_aux`` (V3 sequence-wise) and ``expert_aux`` (V2 expert-level): sum_i f_i P_i (the same formula: V2
      states it with softmax scores, V3 normalises its sigmoid scores);
    - ``device_aux`` (V2 device-level): the experts in D = ``num_groups`` contiguous groups, one per device
      (``model.n_group``): sum_d f'_d P'_d with f'_d the mean f_i of group d's experts and P'_d the sum of their P_i;
    - ``comm_aux`` (V2 communication): sum_d f''_d P'_d with f''_d = D / (M T) * (tokens sending a copy to group d),
      M = ``topk_group`` (the device limit).
    """
    N, E = scores.shape
    K, D, T = topk_idx.shape[1], num_groups, N // batch
    probs = scores / scores.sum(dim=-1, keepdim=True)
    with torch.no_grad():
        idx_BTK = topk_idx.view(batch, T, K)
        chosen = scores.new_zeros(batch, E).scatter_add_(1, idx_BTK.view(batch, T * K),
                                                         scores.new_ones(batch, T * K))
        sent = scores.new_zeros(batch, T, D).scatter_(2, idx_BTK // (E // D), 1.0).sum(dim=1)  # (B, D) tokens
    f = chosen * (E / (K * T))  # (B, E)
    P = probs.view(batch, T, E).mean(dim=1)  # (B, E)
    expert = (f * P).sum(dim=-1).mean()
    P_group = P.view(batch, D, E // D).sum(dim=-1)  # (B, D)
    device = (f.view(batch, D, E // D).mean(dim=-1) * P_group).sum(dim=-1).mean()
    comm = (sent * (D / (topk_group * T)) * P_group).sum(dim=-1).mean()
    return {"seq_aux": expert, "expert_aux": expert, "device_aux": device, "comm_aux": comm}


DROP_EXEMPT_EVERY = 10
"""Token dropping spares about 1 in this many sequences (DeepSeek-V2: "approximately 10%")."""


def exempt_sequences(input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the training sequences whose token copies are never dropped (DeepSeek-V2: "approximately 10% of
    the training sequences"), about 1 in ``DROP_EXEMPT_EVERY``: a position-weighted sum of the sequence's token ids
    modulo 10, so the same sequences in every MoE layer and in every parallel layout (the model computes it once
    per forward from ``input_ids (B, T)`` and hands it to each layer)."""
    weights = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return (input_ids.long() * weights).sum(dim=1) % DROP_EXEMPT_EVERY == 0


def drop_exempt_sequences(topk_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) bool: the sequences whose token copies are never dropped, about 1 in ``DROP_EXEMPT_EVERY``.

    Those whose chosen expert ids sum to a multiple of 10: a function of the micro-batch's routing alone, so every
    parallel layout exempts the same sequences (the model's MoE layer sees no sample index; with micro batch 1 a
    position rule would exempt all). The choice is made per layer."""
    return topk_idx.view(batch, -1).sum(dim=1) % DROP_EXEMPT_EVERY == 0


def device_capacity_keep(affinity: torch.Tensor, topk_idx: torch.Tensor, exempt: torch.Tensor, num_experts: int,
                         num_groups: int, capacity_factor: float) -> torch.Tensor:
    """DeepSeek-V2's device-level token dropping: keep (N, K) bool.

    affinity (N, K) router scores (<= 1) of the chosen experts, topk_idx (N, K), exempt (N,) bool (tokens never
    dropped). Each of the D = ``num_groups`` contiguous expert groups (devices) receives at most
    floor(capacity_factor * N K / D) copies, its average share; beyond that its lowest-affinity copies are dropped.
    Exempt copies are kept first (even past the capacity), then the others by decreasing affinity.
    """
    N, K = topk_idx.shape
    capacity = math.floor(capacity_factor * N * K / num_groups)
    group = (topk_idx // (num_experts // num_groups)).flatten()  # (N*K,)
    exempt = exempt.unsqueeze(1).expand(N, K).flatten()
    priority = affinity.detach().float().flatten() + 2.0 * exempt  # scores <= 1: exempt copies rank first
    # Sort by (group, -priority); a copy's rank within its group is its position minus the group's start.
    by_priority = priority.argsort(descending=True, stable=True)
    order = by_priority[group[by_priority].argsort(stable=True)]
    counts = expert_counts(group, num_groups)
    rank = torch.arange(N * K, device=group.device) - (counts.cumsum(0) - counts)[group[order]]
    keep = torch.zeros(N * K, dtype=torch.bool, device=group.device)
    keep[order] = (rank < capacity) | exempt[order]
    return keep.view(N, K)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts. Returns the output and this layer's balancing stats."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.capacity_factor = None
        """Device-level token dropping in training (``moe.capacity_factor``, set by :func:`set_token_dropping`)."""

    def forward(self, x: torch.Tensor, exempt: torch.Tensor | None = None, stats: bool = True
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """x (B, T, H), exempt (B,) bool or None (sequences never dropped: ``exempt_sequences``, given by the model;
        None = a choice from this layer's routing, ``drop_exempt_sequences``) -> y (B, T, H), this layer's stats: ``{"load": (E,) float tokens per expert (before dropping),
        "seq_aux", "expert_aux", "device_aux", "comm_aux": () unweighted balance terms (``balance_losses``;
        ``pretrain.loss.BALANCE_TERMS`` names each term's weight), "dropped": () token copies dropped}``, or None
        with ``stats=False`` (decoding: nothing reads them; their cost is measured in bench/results.md, generation)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        topk_idx, topk_weight, scores = self.gate(flat)
        keep = None
        if self.training and self.capacity_factor is not None:  # never in evaluation
            if exempt is None:
                exempt = drop_exempt_sequences(topk_idx, B)
            exempt = exempt.repeat_interleave(T)  # (N,)
            keep = device_capacity_keep(scores.detach().gather(1, topk_idx), topk_idx, exempt,
                                        self.gate.num_experts, self.n_group, self.capacity_factor)
        y = self.experts(flat, topk_idx, topk_weight, keep).view(B, T, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not stats:
            return y, None
        terms = balance_losses(scores, topk_idx, B, self.n_group, self.topk_group)
        terms["load"] = expert_counts(topk_idx.flatten(), self.gate.num_experts).float()
        terms["dropped"] = (scores.new_zeros(()) if keep is None else (~keep).sum().float())
        return y, terms


def set_token_dropping(model: nn.Module, capacity_factor: float | None) -> None:
    """Turn DeepSeek-V2's device-level token dropping on (``capacity_factor``) or off (None) in every MoE layer.

    Decided in the layer on the micro-batch's routing, before any expert-parallel dispatch, so every layout drops
    the same copies; only in training mode."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.capacity_factor = capacity_factor


@torch.no_grad()
def update_expert_bias(model: nn.Module, expert_load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): bias += gamma for under-loaded, -= gamma for over-loaded experts.

    expert_load (L, E): tokens per expert for each MoE layer, in ``model.modules()`` order (main layers, then
    MTP blocks), summed over data-parallel ranks by the caller. Experts exactly at the mean load are unchanged.
    Only sigmoid routers carry a bias (softmax models export to DeepseekV2, which has none), so others are skipped.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if expert_load.shape[0] != len(routers):
        raise ValueError(f"expert_load has {expert_load.shape[0]} rows but the model has {len(routers)} MoE layers")
    for router, load in zip(routers, expert_load):
        if router.scoring_func != "sigmoid":
            continue
        load = load.to(router.e_score_correction_bias.device, torch.float32)
        router.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))

"""The single-process gradient norm, computed from one rank's gradients in any (tp, pp, ep, dp) layout.

Why not DeepSpeed's: under ZeRO stage 0 DeepSpeed clips fp32 gradients with ``runtime.utils.clip_grad_norm_``,
which counts TP-replicated parameters once but *averages* the norm over data-parallel ranks "because of MoE
parameters": with expert parallelism each rank holds other experts, and the average of per-rank norms is not the
norm of all experts. (ZeRO 1/2 and the bf16 optimizer split expert groups out and get it right; the layout tests
compare all of them with one process.) Here every parameter's squared gradient is counted exactly once:

- TP-sharded parameters (megatron-core sets ``tensor_model_parallel``): summed over the TP group;
- replicated parameters (norms, routers, MLA's down-projections): taken from TP rank 0 only;
- experts (``allreduce = False``, parallel.expert): from TP rank 0, summed over the EP group;
- pipeline stages: summed over the PP group; the last stage's copy of the tied embedding (``ds_pipe_replicated``)
  is left out, its gradient equals stage 0's after DeepSpeed's tied all-reduce.

Data-parallel replicas hold the same (already reduced) gradients and are not summed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def global_grad_norm(module: nn.Module, topo) -> torch.Tensor:
    """L2 norm of all gradients of the logical (single-process) model; call after the boundary backward on every
    rank (collective over the TP, PP and EP groups). Returns a float32 scalar tensor (inf/NaN propagate)."""
    device = next(module.parameters()).device
    dense = torch.zeros((), dtype=torch.float32, device=device)  # everything but experts
    expert = torch.zeros((), dtype=torch.float32, device=device)
    for p in module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        square = p.grad.detach().float().square().sum()
        if getattr(p, "allreduce", True) is False:
            expert += square if topo.tp_rank == 0 else 0.0
        elif getattr(p, "tensor_model_parallel", False) or topo.tp_rank == 0:
            dense += square
    if topo.ep > 1:
        dist.all_reduce(expert, group=topo.ep_group)
    total = dense + expert
    if topo.tp > 1:
        dist.all_reduce(total, group=topo.tp_group)
    if topo.pp > 1:
        dist.all_reduce(total, group=topo.pp_group)
    return total.sqrt()


def clip_by_global_norm(module: nn.Module, topo, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` semantics (coefficient max_norm / (norm + 1e-6), applied when < 1) with
    :func:`global_grad_norm`. Returns the norm before clipping."""
    norm = global_grad_norm(module, topo)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm

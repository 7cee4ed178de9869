"""Expert parallelism: experts sharded over the expert-parallel group, tokens moved by all-to-all.

The MoE boundary is ``mlp.experts(x (N, H), topk_idx (N, K), topk_weight (N, K), keep (N, K) | None) -> (N, H)``
(``keep``: the copies the MoE layer's device-level token dropping kept; decided before dispatch, so every layout
drops the same copies).
``apply_expert_parallel`` replaces each ``GroupedExperts`` with ``ExpertParallelExperts``, which keeps only
this rank's slice of the stacked weights (same parameter names, so state dicts keep their keys) and runs

    dispatch (sort copies by expert, exchange counts, all-to-all)  ->  local experts  ->  combine (the reverse,
    un-permute, weight, sum over k)

All split sizes and permutations travel in a ``DispatchContext`` returned by ``dispatch``; nothing is kept on
``self`` between calls (house rule 2).

Gradients: both all-to-alls are autograd Functions whose backward is the reverse all-to-all, so an expert's
weight gradient sums the tokens of every rank in its EP group. Expert parameters are marked the way
DeepSpeed's MoE expects (``allreduce=False``, ``group_name='ep_size_{ep}'``) so ZeRO reduces them over the
expert-data-parallel group only; ``_DeepSpeedMoEMarker`` makes ``deepspeed.initialize`` see MoE layers at all.

With tensor parallelism (Megatron's sequence parallelism for the routed experts) the MoE input is identical on all
TP ranks (TP leaves activations replicated between layers), so each TP rank takes 1/tp of the token rows (the
router ran on all of them: its balance terms and expert loads are the single process's), dispatches them within its
own EP group (the ranks with the same TP rank), and the expert outputs are all-gathered over TP after the combine:
no expert work is repeated. Experts stay replicated over TP; each rank's expert gradient covers its token rows, so
the three stacked weights' gradients are summed over TP once per step (``_SumGradOverGroup``: at the accumulation
boundary, in place; under ZeRO-2 reduce-scattered per micro-batch and gathered once), which leaves them identical
on the TP ranks, as DeepSpeed and ``parallel.grad_norm``
expect of replicated parameters. The split's backward all-gathers the input (and gating-weight) gradients, so
the router and the layers below see complete gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.model.moe import GroupedExperts, _grouped_mm_ok, _grouped_swiglu, expert_counts, gather_rows, kept_copies


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits on dim 0; backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back_output_splits, back_input_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), back_output_splits, back_input_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all: rows ``x[sum(input_splits[:r]) ...]`` go to rank r; (sum(output_splits), ...).

    ``group=None`` means no expert parallelism (one rank): the identity.
    """
    if group is None:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class DispatchContext:
    """What ``combine`` needs to undo ``dispatch``. S = token copies kept and sent, M = copies received."""

    token_index: torch.Tensor
    """(S,) source token of each sent copy, in send order (sorted by global expert)."""
    weight: torch.Tensor
    """(S,) gating weight of each sent copy."""
    recv_order: torch.Tensor
    """(M,) received row -> position sorted by local expert: ``x_local = x_recv[recv_order]``."""
    input_splits: list
    """Copies sent to each EP rank (dispatch direction)."""
    output_splits: list
    """Copies received from each EP rank."""
    num_tokens: int
    """N: rows of the original input."""
    group: object
    """The EP process group."""


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int, group,
             keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
    """Send each token copy to the EP rank owning its expert.

    x (N, H), topk_idx (N, K) global expert ids, topk_weight (N, K), keep (N, K) bool or None: the copies the MoE
    layer's token dropping kept (``pretrain.model.moe.device_capacity_keep``; dropped ones are never sent). Experts
    are split contiguously: EP rank r owns experts [r * E_local, (r + 1) * E_local); ``group=None`` = one rank
    owning all. Returns the received copies sorted by local expert (M, H), ``tokens_per_local_expert`` (E_local,)
    long summing to M, and the context for ``combine``.
    """
    ep = 1 if group is None else dist.get_world_size(group)
    num_local = num_experts // ep
    flat_idx, flat_weight = topk_idx.flatten(), topk_weight.flatten()  # (N*K,)
    copy_ids = kept_copies(keep, flat_idx)
    # Stable sort by expert: the same copy order as the single-process GroupedExperts, so sums match.
    order = copy_ids[flat_idx[copy_ids].argsort(stable=True)]
    counts = expert_counts(flat_idx[order], num_experts)  # (E,) copies this rank sends per expert
    token_index = order // topk_idx.shape[1]

    # Exchange counts: row r of recv_counts = copies rank r sends to each of my local experts.
    recv_counts = counts
    if group is not None:
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(ep, num_local)
    input_splits = counts.view(ep, num_local).sum(dim=1).tolist()
    output_splits = recv_counts.sum(dim=1).tolist()  # host sync: the split sizes must be known on the CPU

    x_recv = all_to_all(gather_rows(x, token_index), output_splits, input_splits, group)  # (M, H) grouped by source rank
    local_expert = torch.arange(num_local, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten())
    recv_order = local_expert.argsort(stable=True)
    ctx = DispatchContext(token_index=token_index, weight=flat_weight[order], recv_order=recv_order,
                          input_splits=input_splits, output_splits=output_splits, num_tokens=x.shape[0],
                          group=group)
    return gather_rows(x_recv, recv_order), recv_counts.sum(dim=0), ctx


def combine(expert_out: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
    """Return expert outputs to their tokens. expert_out (M, H) in dispatch's output order -> (N, H).

    Un-sorts by local expert, reverses the all-to-all, multiplies each copy by its gating weight and sums the
    K copies of each token (dropped copies add nothing).
    """
    unsorted = torch.empty_like(expert_out).index_copy(0, ctx.recv_order, expert_out)  # back to arrival order
    y = all_to_all(unsorted, ctx.input_splits, ctx.output_splits, ctx.group)  # (S, H) in send order
    y = y * ctx.weight.unsqueeze(-1).to(y.dtype)
    out = y.new_zeros((ctx.num_tokens, y.shape[1]))
    return out.index_add(0, ctx.token_index, y)


class ExpertParallelExperts(GroupedExperts):
    """This rank's experts of one MoE layer behind all-to-all dispatch/combine (and, under TP, this rank's token rows).

    Holds ``gate_proj``/``up_proj``/``down_proj`` of shape (E_local, ...) for global experts
    [first_expert, first_expert + E_local). Same call as ``GroupedExperts``: (x, topk_idx, topk_weight) -> (N, H).
    ``tp_group``: the TP group over which the token rows are split (None: no tensor parallelism).
    """

    def __init__(self, full: GroupedExperts, ep_group, ep_rank: int, ep_size: int, tp_group=None):
        num_local = full.num_experts // ep_size
        hidden, inter = full.gate_proj.shape[2], full.gate_proj.shape[1]
        with torch.device("meta"):
            super().__init__(num_local, hidden, inter)
        self.num_global_experts, self.first_expert = full.num_experts, ep_rank * num_local
        self.ep_group, self.tp_group = ep_group, tp_group
        self.local_backwards = 0  # under TP: how many coming backwards keep their gradients local (sync_expert_grads)
        self.local_grads = False  # .grad holds deferred, not yet TP-summed micro-batches
        self.shard_grads = False  # ZeRO-2: deferred micro-batches are reduce-scattered into ``grad_shard`` instead
        self.grad_shard = None  # this TP rank's fp32 shard of the deferred micro-batches' TP-summed gradients
        local = slice(self.first_expert, self.first_expert + num_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, nn.Parameter(getattr(full, name).detach()[local].clone()))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, H), topk_idx (N, K) global expert ids, topk_weight (N, K), keep (N, K) bool or None -> (N, H)."""
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        if self.tp_group is None:
            return self._experts(x, topk_idx, topk_weight, keep, weights)
        rows, tp_rank = _row_split(x.shape[0], dist.get_world_size(self.tp_group)), dist.get_rank(self.tp_group)
        mine = slice(sum(rows[:tp_rank]), sum(rows[:tp_rank + 1]))
        y = self._experts(_ScatterRows.apply(x, rows, self.tp_group), topk_idx[mine],
                          _ScatterRows.apply(topk_weight, rows, self.tp_group), None if keep is None else keep[mine],
                          _SumGradOverGroup.apply(self, self.tp_group, *weights))
        return _AllGatherRows.apply(y, rows, self.tp_group)  # (N, H)

    def _experts(self, x, topk_idx, topk_weight, keep, weights) -> torch.Tensor:
        """Dispatch, the local experts with ``weights`` (gate, up, down), combine: (n, H) -> (n, H)."""
        x_local, tokens_per_expert, ctx = dispatch(x, topk_idx, topk_weight, self.num_global_experts,
                                                   self.ep_group, keep)
        if x_local.shape[0] > 0:
            y_local = _swiglu(x_local, tokens_per_expert, *weights)  # (M, H)
        else:
            # No copies reached this rank. torch._grouped_mm's backward rejects empty inputs, so skip it but keep
            # the weights in the graph: they get zero gradients like on the other ranks.
            y_local = x_local + 0.0 * sum(p.sum() for p in weights)
        return combine(y_local, ctx).to(x.dtype)


def _swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, gate_w, up_w, down_w) -> torch.Tensor:
    """``GroupedExperts.compute`` with the weights given (under TP they pass through ``_SumGradOverGroup``)."""
    if _grouped_mm_ok(x_sorted):
        return _grouped_swiglu(x_sorted, counts, gate_w, up_w, down_w)
    parts = x_sorted.split(counts.tolist())
    return torch.cat([F.linear(F.silu(F.linear(xs, gate_w[e])) * F.linear(xs, up_w[e]), down_w[e])
                      for e, xs in enumerate(parts)])


# ------------------------------------------------------------------- token rows over the tensor-parallel group

def _row_split(num_rows: int, size: int) -> list[int]:
    """Rows per TP rank: contiguous, the first ``num_rows % size`` ranks one more."""
    return [num_rows // size + (r < num_rows % size) for r in range(size)]


def _all_gather_rows(x: torch.Tensor, rows: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (``rows[r]`` from rank r) along dim 0; gloo wants equal sizes, so pad."""
    pad = max(rows)
    padded = x.new_zeros((pad,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, rows)])


class _ScatterRows(torch.autograd.Function):
    """Forward: this TP rank's rows of a replicated tensor; backward: all-gather the row gradients, so the
    replicated input gets its complete gradient on every rank (megatron-core's scatter to the sequence-parallel
    region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: list[int], group) -> torch.Tensor:
        ctx.rows, ctx.group = rows, group
        start = sum(rows[:dist.get_rank(group)])
        return x[start:start + rows[dist.get_rank(group)]].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.rows, ctx.group), None, None


class _AllGatherRows(torch.autograd.Function):
    """Forward: all-gather the TP ranks' rows; backward: this rank's rows of the (replicated, complete) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: list[int], group) -> torch.Tensor:
        ctx.rows, ctx.rank = rows, dist.get_rank(group)
        return _all_gather_rows(x.contiguous(), rows, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = sum(ctx.rows[:ctx.rank])
        return grad[start:start + ctx.rows[ctx.rank]].contiguous(), None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity on the expert weights; backward sums their gradients over the group (the same collectives in the
    same order on every rank whichever weights received tokens).

    While ``module.local_backwards`` > 0 (``sync_expert_grads``: micro-batches before the accumulation boundary) the
    gradients stay local and accumulate in ``.grad``; the boundary micro-batch then all-reduces its gradients
    together with the accumulated ones, so the expert gradients cross TP once per step, not once per micro-batch.
    ``.grad`` is set to the sum here and a zero is returned: the replicated weights get bit-identical gradients.

    ZeRO-2 takes the gradients out of ``.grad`` after every micro-batch, so there they cannot wait in ``.grad``
    (``module.shard_grads``): each deferred micro-batch's gradients are reduce-scattered over TP and this rank's
    shard of the sum is accumulated in fp32 (``module.grad_shard``; autograd gets zeros), and the boundary
    micro-batch reduce-scatters its own, adds them and all-gathers the total once: per step (micro-batches)
    reduce-scatters and one all-gather over TP, the analytic minimum's bytes, instead of an all-reduce per
    micro-batch (twice the bytes)."""

    @staticmethod
    def forward(ctx, module, group, *weights: torch.Tensor):
        ctx.module, ctx.group = module, group
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        module = ctx.module
        params = (module.gate_proj, module.up_proj, module.down_proj)
        if module.local_backwards > 0:
            module.local_backwards -= 1
            if module.shard_grads:
                _add_to_grad_shard(module, grads, ctx.group)
                return (None, None, *_zeros_like(grads))
            module.local_grads = True
            return (None, None, *grads)
        if module.grad_shard is not None:  # the boundary after reduce-scattered micro-batches: gather the total
            _add_to_grad_shard(module, grads, ctx.group)
            shard, module.grad_shard = module.grad_shard.to(grads[0].dtype), None
            full = shard.new_empty(shard.numel() * dist.get_world_size(ctx.group))
            dist.all_gather_into_tensor(full, shard, group=ctx.group)
            return (None, None, *(f.view_as(g).to(g.dtype) for f, g in
                                  zip(full[:sum(g.numel() for g in grads)].split([g.numel() for g in grads]), grads)))
        if module.local_grads:
            # earlier deferred micro-batches' local sums, in .grad or in DeepSpeed's fp32 ``grad_accum`` (its
            # grad_accum_dtype; both contiguous, like the parameters): add this micro-batch in place and all-reduce
            # each buffer in place (no flat copy and copy back of the model's largest gradients)
            module.local_grads = False
            for p, g in zip(params, grads):
                acc = p.grad if p.grad is not None else p.grad_accum
                acc.add_(g.to(acc.dtype).view(acc.shape))
                dist.all_reduce(acc, group=ctx.group)
            return (None, None, *_zeros_like(grads))
        flat = torch.cat([g.reshape(-1) for g in grads])  # nothing deferred: this micro-batch's, in one all-reduce
        dist.all_reduce(flat, group=ctx.group)
        return (None, None, *(f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)))


def _zeros_like(grads) -> list[torch.Tensor]:
    """Zero gradients for autograd to add (one broadcast scalar: no weight-sized zeros are filled)."""
    zero = grads[0].new_zeros(())
    return [zero.expand_as(g) for g in grads]


def _add_to_grad_shard(module: "ExpertParallelExperts", grads, group) -> None:
    """Reduce-scatter one micro-batch's expert weight gradients over ``group`` (flattened, zero-padded to a multiple
    of the group size) and add this rank's part to ``module.grad_shard`` (fp32)."""
    size = dist.get_world_size(group)
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = F.pad(flat, (0, -flat.numel() % size))
    part = flat.new_empty(flat.numel() // size)
    dist.reduce_scatter_tensor(part, flat, group=group)
    module.grad_shard = part.float() if module.grad_shard is None else module.grad_shard.add_(part)


def sync_expert_grads(model: nn.Module, now: bool, local_backwards: int | None = None, shard: bool = False) -> None:
    """Whether the next backward sums the TP-split experts' weight gradients over TP (the accumulation boundary) or
    leaves them local. ``local_backwards``: the next that many backwards stay local and the one after sums (the
    pipeline engine, whose 1F1B schedule runs the forwards ahead of the backwards but the backwards in micro-batch
    order: gas - 1 before its step). ``shard``: gradients leave ``.grad`` every micro-batch (ZeRO-2), so the
    deferred ones are reduce-scattered into a per-rank shard (``_SumGradOverGroup``)."""
    count = (0 if now else 1) if local_backwards is None else local_backwards
    for m in model.modules():
        if isinstance(m, ExpertParallelExperts):
            m.local_backwards, m.shard_grads = count, shard


def _deepspeed_marker(num_experts: int, ep_size: int) -> nn.Module:
    """A parameter-free ``deepspeed.moe.layer.MoE`` so ``deepspeed.initialize`` enables its MoE code paths.

    DeepSpeed decides ``has_moe_layers`` by ``isinstance(module, MoE)`` (``runtime/engine.py``); only then
    does it build 'moe' optimizer groups and reduce ``allreduce=False`` parameters over the expert-data-parallel
    group. The marker owns no state and declares no local experts, so DeepSpeed writes and expects no per-expert
    checkpoint files; the experts stay in the module state dict under their usual names. That file is written by
    data-parallel rank 0 only (it holds EP rank 0's experts): after ``engine.load_checkpoint`` call
    ``engine.optimizer.update_lp_params()`` so every rank takes its own experts back from its ZeRO fp32 partition.
    """
    from deepspeed.moe.layer import MoE

    class _DeepSpeedMoEMarker(MoE):
        def __init__(self):
            nn.Module.__init__(self)  # skip MoE.__init__: it would build its own gate, experts and groups
            self.num_experts, self.ep_size = num_experts, ep_size
            # Zero: DeepSpeed's per-expert checkpoint files assume its own module layout; with none declared it
            # neither writes nor expects them. Each rank's experts are restored from its ZeRO fp32 partition.
            self.num_local_experts = 0
            self.expert_group_name = f"ep_size_{ep_size}"
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups already registered by parallel.topology.initialize_parallel

        def forward(self, *args, **kwargs):
            raise RuntimeError("_DeepSpeedMoEMarker is a marker for DeepSpeed; it is never called")

    return _DeepSpeedMoEMarker()


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Tag parameters as DeepSpeed expert parameters: reduced over the expert-data-parallel group ``group_name``."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = group_name


def apply_expert_parallel(model: nn.Module, topo) -> nn.Module:
    """Replace every ``GroupedExperts`` of ``model`` (main layers and MTP blocks) with its EP shard, in place.

    Call after ``initialize_parallel(topo)`` and with the full weights identical on all ranks. With ``topo.ep == 1``
    every rank keeps all experts and nothing is communicated over EP (tests); with ``topo.tp > 1`` the experts split
    the token rows over TP (``parallel.tensor`` calls this). A second call finds nothing left to replace.
    """
    group = topo.ep_group if topo.ep > 1 else None
    tp_group = topo.tp_group if topo.tp > 1 else None
    targets = [(name, m) for name, m in model.named_modules() if type(m) is GroupedExperts]
    for name, full in targets:
        parent_name, _, child = name.rpartition(".")
        sharded = ExpertParallelExperts(full, group, topo.ep_rank, topo.ep, tp_group)
        if topo.ep > 1:
            mark_expert_params(sharded, topo.expert_group_name)
        setattr(model.get_submodule(parent_name), child, sharded)
    if targets and topo.ep > 1:
        model.ds_moe_marker = _deepspeed_marker(targets[0][1].num_experts, topo.ep)
    return model

"""Tensor parallelism: megatron-core's parallel layers swapped into the finished model by module path.

Plan (Megatron's column-then-row pairing; sequence parallelism only for the routed experts):

| module | becomes |
|---|---|
| ``embed_tokens`` | ``VocabParallelEmbedding`` (vocab rows split; output all-reduced) |
| attention ``q_proj``/``q_b_proj``, ``k_proj``, ``v_proj``, ``kv_b_proj`` | ``ColumnParallelLinear``: whole heads |
| attention ``o_proj`` | ``RowParallelLinear`` (input is this rank's heads; output all-reduced) |
| MLA ``q_a_proj``, ``kv_a_proj_with_mqa`` and their norms | replicated |
| dense FFN / shared experts ``gate_proj``, ``up_proj`` / ``down_proj`` | column / row |
| ``lm_head`` | ``ColumnParallelLinear`` without gather: logits stay vocab-sharded |
| ``model.loss_fn`` | megatron-core's ``vocab_parallel_cross_entropy`` (with ``-100`` ignored) |
| routed experts | replicated; each TP rank runs them on 1/tp of the token rows (``parallel.expert``) |
| router, norms, MTP ``eh_proj`` | replicated (see "Still replicated" below) |

Each rank copies its slice of the full weights, so the TP model computes what the single-process one does.
``model(input_ids)`` without labels returns gathered (full-vocab) logits; ``ModelOutput.logits`` is this rank's
vocab shard.

Still replicated under TP, with the reason: the router (E x H, ~1% of an MoE layer's FLOPs; run on all rows so its
per-sequence balance terms and expert loads are the single process's without another collective), the norms, MLA's
``q_a_proj``/``kv_a_proj_with_mqa`` (megatron-core keeps them "duplicated": their outputs are normalised over the
whole latent, and sharding them by tokens would need a gather before the column-parallel up-projections) and the MTP
``eh_proj`` (one 2h x h GEMM per depth). Their FLOPs are repeated tp times (bench/results.md, "Scale efficiency").

Why replicated parameters get identical, complete gradients on every TP rank: activations between the layers
are replicated (each row-parallel layer and the embedding all-reduce their output), and every column-parallel
layer all-reduces the gradient of its input in backward. So a replicated parameter sees the same input and the
same full output gradient everywhere. The one exception is MLA's decoupled RoPE key, which leaves the replicated
``kv_a_proj_with_mqa`` and meets the per-head queries directly (not through a column layer): each rank would
see only its heads' share of its gradient, so ``_ReplicatedRopeKeyProjection`` all-reduces that gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           set_tensor_model_parallel_attributes, vocab_parallel_cross_entropy)
from megatron.core.parallel_state import get_tensor_model_parallel_group

from pretrain.model.attention import Attention, MLAttention
from pretrain.model.head import IGNORE_INDEX
from pretrain.model.transformer import token_mean
from pretrain.model.layers import MLP


def _model_parallel_config(tp: int, dtype: torch.dtype):
    # Weights are copied from the built model, so megatron-core allocates on the CPU and skips its own init.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype, sequence_parallel=False,
                               gradient_accumulation_fusion=False)


def _finish(layer: nn.Module, partition_dim: int) -> None:
    """Mark the weight as TP-sharded and drop megatron-core's empty ``_extra_state`` state-dict entries.

    megatron-core sets ``tensor_model_parallel`` only when it initialises the weights itself (we copy them);
    DeepSpeed's gradient norm counts a parameter without it on TP rank 0 only, as if it were replicated.
    """
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, partition_dim, 1)
    layer._load_state_dict_pre_hooks.clear()


class ColumnParallel(ColumnParallelLinear):
    """megatron-core's column-parallel linear returning a tensor (theirs returns ``(output, bias)``)."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) replicated -> (B, T, out / tp): this rank's output columns."""
        return super().forward(x)[0]


class RowParallel(RowParallelLinear):
    """megatron-core's row-parallel linear returning a tensor."""

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in / tp) this rank's slice -> (B, T, out) summed over the TP group."""
        return super().forward(x)[0]


def _shard(full: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    return full.detach().chunk(tp, dim=dim)[rank].clone()


def _column(linear: nn.Linear, topo, config, gather_output: bool = False) -> nn.Module:
    layer = ColumnParallel(linear.in_features, linear.out_features, config=config, init_method=None,
                           bias=linear.bias is not None, gather_output=gather_output, skip_bias_add=False)
    _finish(layer, 0)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 0, topo.tp_rank, topo.tp))
        if linear.bias is not None:
            layer.bias.copy_(_shard(linear.bias, 0, topo.tp_rank, topo.tp))
    return layer.to(linear.weight.device)


def _row(linear: nn.Linear, topo, config) -> nn.Module:
    layer = RowParallel(linear.in_features, linear.out_features, config=config, init_method=None,
                        bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False)
    _finish(layer, 1)
    with torch.no_grad():
        layer.weight.copy_(_shard(linear.weight, 1, topo.tp_rank, topo.tp))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())  # added once, after the all-reduce
    return layer.to(linear.weight.device)


def _embedding(embedding: nn.Embedding, topo, config) -> nn.Module:
    layer = VocabParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim, init_method=None,
                                   config=config)
    _finish(layer, 0)
    with torch.no_grad():
        layer.weight.copy_(_shard(embedding.weight, 0, topo.tp_rank, topo.tp))
    return layer.to(embedding.weight.device)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group.

    megatron-core's ``copy_to_tensor_model_parallel_region`` does the same but all-reduces
    ``grad.contiguous()`` and returns ``grad``: a no-op when the gradient is a strided view, as here.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=get_tensor_model_parallel_group())
        return grad


class _ReplicatedRopeKeyProjection(nn.Linear):
    """MLA's ``kv_a_proj_with_mqa`` (replicated) with the gradient of its RoPE-key outputs summed over TP.

    Output (B, T, kv_lora_rank + rope_dim): the latent part feeds the column-parallel ``kv_b_proj`` (whose
    backward already all-reduces), the RoPE key is shared by all heads, so each rank holds only its heads' part.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        latent, k_rope = out.split([self.out_features - self.rope_dim, self.rope_dim], dim=-1)
        return torch.cat([latent, _AllReduceGrad.apply(k_rope)], dim=-1)


def _parallelize_attention(attn: nn.Module, topo, config) -> None:
    tp = topo.tp
    if isinstance(attn, MLAttention):
        for name in ("q_proj", "q_b_proj", "kv_b_proj"):
            if hasattr(attn, name):
                setattr(attn, name, _column(getattr(attn, name), topo, config))
        old = attn.kv_a_proj_with_mqa
        attn.kv_a_proj_with_mqa = _ReplicatedRopeKeyProjection(old.in_features, old.out_features, bias=False,
                                                               device=old.weight.device, dtype=old.weight.dtype)
        attn.kv_a_proj_with_mqa.rope_dim = attn.rope_dim
        attn.kv_a_proj_with_mqa.weight = old.weight
    elif isinstance(attn, Attention):
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _column(getattr(attn, name), topo, config))
        attn.num_kv_heads //= tp
    else:
        raise TypeError(f"tensor parallelism: unknown attention module {type(attn).__name__}")
    attn.o_proj = _row(attn.o_proj, topo, config)
    attn.num_heads //= tp  # the forward reshapes by the local head count


def _parallelize_mlp(mlp: MLP, topo, config) -> None:
    mlp.gate_proj = _column(mlp.gate_proj, topo, config)
    mlp.up_proj = _column(mlp.up_proj, topo, config)
    mlp.down_proj = _row(mlp.down_proj, topo, config)


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V / tp) vocab shard, labels (B, T) with -100 = ignore -> mean CE over the kept positions.

    The same value on every TP rank and equal to ``cross_entropy_loss`` on the gathered logits.
    """
    keep = labels != IGNORE_INDEX
    losses = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))  # (B, T)
    return token_mean((losses * keep).sum(), labels)  # a fully masked micro-batch: 0, not 0 / 0


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim over TP; backward keeps this rank's slice.

    megatron-core's ``gather_from_tensor_model_parallel_region`` allocates on ``torch.cuda.current_device()``,
    so it cannot run on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def _gather_eval_logits(module: nn.Module, args, output):
    """Forward hook: ``model(input_ids)`` (no labels) returns full-vocab logits, as the plain model does."""
    if isinstance(output, torch.Tensor):
        return _GatherLastDim.apply(output, get_tensor_model_parallel_group())
    return output


def apply_tensor_parallel(model: nn.Module, topo) -> nn.Module:
    """Shard ``model`` (a ``DeepSeekModel`` holding the full weights, identical on every rank) over TP, in place.

    Call after ``initialize_parallel(topo)``. Returns the model.
    """
    dtype = next(model.parameters()).dtype
    config = _model_parallel_config(topo.tp, dtype)
    tied = model.lm_head.weight is model.embed_tokens.weight
    for module in list(model.modules()):
        if isinstance(module, (Attention, MLAttention)):
            _parallelize_attention(module, topo, config)
        elif isinstance(module, MLP):  # dense FFN and shared experts
            _parallelize_mlp(module, topo, config)
    model.embed_tokens = _embedding(model.embed_tokens, topo, config)
    model.lm_head = _column(model.lm_head, topo, config)
    if tied:  # both split the vocabulary into the same contiguous rows
        model.lm_head.weight = model.embed_tokens.weight
    model.loss_fn = vocab_parallel_loss
    model.register_forward_hook(_gather_eval_logits)
    from parallel.expert import apply_expert_parallel
    return apply_expert_parallel(model, topo)  # routed experts: token rows split over TP (and EP if ep > 1)

"""Pipeline parallelism: the finished (possibly TP/EP-parallelized) model cut into DeepSpeed ``PipelineModule`` stages.

A stage is the same ``DeepSeekModel`` with the modules it does not own removed (torchtitan's pattern): stage 0
keeps the embedding, every stage its slice of ``layers`` (a ModuleDict keyed by the global layer index, so the
state-dict names stay the plain model's), the last stage the norm, head, MTP modules and the embedding again (for
the MTP inputs and a tied head). ``PipelineStage.forward`` is a thin adapter between DeepSpeed's tuple protocol and
``DeepSeekModel.forward``, so blocks, RoPE positions, document masks, MTP input shifting, activation checkpointing
and expert-load collection exist once, in the model. The loss is ``pretrain.loss.total_loss``, the same function as
the plain path's. DeepSpeed's layer list is one entry per stage::

    stage 0       (input_ids, labels[, document_ids])                 -> (h, terms, input_ids, labels[, document_ids])
    stage 1..p-2  (h, terms, input_ids, labels[, document_ids])       -> the same tuple
    stage p-1     (h, terms, input_ids, labels[, document_ids])       -> the training loss (scalar)

What travels between stages and why:
- ``h`` (B, T, H): the hidden states.
- ``terms`` (len(BALANCE_TERMS),): the unweighted balance terms of every MoE layer so far, detached, as the bits of
  an fp32 vector in an int32 tensor, so the last stage logs (and returns) the single-process loss. Their gradients
  do not travel: each stage hands its own alpha-weighted terms the gradient the loss has (1 / accumulation steps)
  in backward (``_AuxLossGrad``, megatron-core's MoEAuxLossAutoScaler). DeepSpeed runs one backward per float
  tensor a stage sent, so ``h`` is the only one: a second would walk each stage's graph twice.
- ``input_ids``, ``labels``, ``document_ids`` (B, T) int64, as the objective's ``batch`` made them (SFT: labels
  -100 outside the assistant turns, a document per packed conversation): the last stage embeds the shifted tokens
  for MTP and computes the loss; integer tensors travel without gradients. DeepSpeed also hands the labels to the
  last stage for its ``loss_fn``, which here only returns the loss the stage computed.
- The embedding is tied between the first and the last stage (``TiedLayerSpec`` on ``embed_tokens.weight``):
  DeepSpeed broadcasts it at start and all-reduces its gradient over the two stages before the optimizer step.
- Expert-load counts are not differentiable and each stage needs only its own routers' rows, so they go through
  a side channel: in training mode (never in ``eval_batch``) each stage adds its rows to a local buffer; after
  ``train_batch`` the rows are summed over data-parallel ranks and stages (``collect_expert_load``) and, when the
  optimizer step was applied, every stage moves its own routers' bias (``pretrain.loss.balance_experts``).

Partitioning: by parameter count with DeepSpeed's ``partition_balanced`` over [embedding, blocks..., norm/head/MTP]
(the embedding always on the first stage, norm/head/MTP always on the last), or ``parallel.pipeline_layout`` =
transformer layers per stage.

Checkpoints keep DeepSpeed's pipeline layout (``layer_XX-model_TT-model_states.pt``: one file per stage and TP
rank) with state-dict keys equal to the plain model's names; with expert parallelism EP rank e > 0 also writes its
experts to ``layer_XX-model_TT-expert_EE-model_states.pt``. ``gather_pipeline_state_dict`` (DeepSpeed-free) merges
stages, TP shards and expert shards back into the single-process state dict for export.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from deepspeed.pipe import PipelineModule, TiedLayerSpec

from parallel.expert import sync_expert_grads
from parallel.topology import check_pipeline_layout
from pretrain.config import Config, ConfigError
from pretrain.loss import BALANCE_TERMS, LOSS_NAMES, LossWeights, balance_vector, dropped_tokens, total_loss
from pretrain.model.moe import Router
from pretrain.model.transformer import DeepSeekModel

EMBED_KEY = "embed"
TIED_WEIGHT = "embed_tokens.weight"


def stage_bounds(model: nn.Module, cfg: Config) -> list[int]:
    """Layer bounds of the pp stages: stage s owns transformer layers [bounds[s], bounds[s+1]).

    ``parallel.pipeline_layout`` when set, else DeepSpeed's ``partition_balanced`` over the parameter counts of
    [embedding, block 0..L-1, norm + head + MTP] (the embedding unit always opens stage 0, the tail closes the last).
    """
    from deepspeed.runtime.utils import partition_balanced

    pp, num_layers = cfg.parallel.pp, len(model.layers)
    if cfg.parallel.pipeline_layout is not None:
        bounds = [0]
        for n in cfg.parallel.pipeline_layout:
            bounds.append(bounds[-1] + n)
        return bounds
    count = lambda *ms: sum(p.numel() for m in ms if m is not None for p in m.parameters())  # noqa: E731
    weights = [count(model.embed_tokens)] + [count(b) for b in model.layers]
    weights.append(count(model.norm, model.lm_head, model.mtp) if model.lm_head.weight is not model.embed_tokens.weight
                   else count(model.norm, model.mtp))
    parts = partition_balanced(weights=weights, num_parts=pp)  # unit bounds over len(weights) units
    bounds = [min(max(p - 1, 0), num_layers) for p in parts]  # unit u >= 1 is block u - 1
    bounds[0], bounds[-1] = 0, num_layers
    if any(a > b for a, b in zip(bounds, bounds[1:])) or any(a == b for a, b in zip(bounds[1:-1], bounds[2:-1])):
        raise ConfigError(f"pipeline stages {bounds} (layer bounds): an inner stage got no layers; set "
                          f"parallel.pipeline_layout or use fewer stages than model.num_hidden_layers")
    return bounds


def _moe_rows(model: nn.Module) -> dict[int, int]:
    """id(router) -> its row in ``ModelOutput.expert_load`` (``model.modules()`` order)."""
    return {id(r): row for row, r in enumerate(m for m in model.modules() if isinstance(m, Router))}


class _AuxLossGrad(torch.autograd.Function):
    """Identity on the hidden states; backward also gives the stage's weighted balance loss the gradient ``scale``
    (megatron-core's ``MoEAuxLossAutoScaler``). A stage before the last thus trains its routers with its own
    balance terms without sending them forward as a second float tensor: DeepSpeed's pipeline runs one
    ``backward`` per float tensor a stage sent, which would walk the stage's whole graph twice."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_h, torch.full_like(aux_loss, ctx.scale), None


class PipelineStage(DeepSeekModel):
    """One pipeline stage: ``DeepSeekModel`` holding only its modules, with DeepSpeed's tuple protocol."""

    @classmethod
    def cut(cls, model: DeepSeekModel, first_layer: int, stop_layer: int, is_first: bool, is_last: bool,
            weights: LossWeights) -> "PipelineStage":
        """A stage sharing ``model``'s modules (no copy of any tensor): layers [first_layer, stop_layer)."""
        rows = _moe_rows(model)
        stage = copy.copy(model)  # attributes (config, rotary, loss_fn, checkpointing mode) are the model's
        stage.__class__ = cls
        stage._modules = dict(model._modules)  # own module table: removing a module leaves ``model`` intact
        stage._forward_hooks = OrderedDict()  # TP's eval-logits hook is for the whole model's logits
        stage.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(first_layer, stop_layer)})
        if not (is_first or is_last):
            stage.embed_tokens = None
        if not is_last:
            stage.norm, stage.lm_head, stage.mtp = None, None, nn.ModuleList()
        stage.is_first, stage.is_last, stage.weights = is_first, is_last, weights
        stage.moe_rows = [rows[id(m)] for m in stage.modules() if isinstance(m, Router)]
        stage.load_sum, stage.dropped_sum, stage.last_parts = None, 0.0, None
        stage.aux_grad_scale = 1.0  # d(loss)/d(loss) as DeepSpeed backpropagates it: 1 / gradient accumulation steps
        return stage

    def forward(self, inputs):
        if self.is_first:
            h, carried, (input_ids, labels, *doc) = None, None, inputs
        else:
            h, carried_bits, input_ids, labels, *doc = inputs
            carried = carried_bits.view(torch.float32)  # fp32 bits sent as int32 (see the module docstring)
        document_ids = doc[0] if doc else None
        out = super().forward(input_ids, labels=labels if self.is_last else None, document_ids=document_ids,
                              hidden_states=h)
        if self.training and out.expert_load.numel():  # the bias follows training batches only
            load = out.expert_load.detach().float()
            self.load_sum = load if self.load_sum is None else self.load_sum + load
            self.dropped_sum += dropped_tokens(out)
        if not self.is_last:
            terms = balance_vector(out.moe_terms, out.hidden_states)
            h = out.hidden_states
            aux = sum(self.weights.alphas[t] * terms[i] for i, t in enumerate(BALANCE_TERMS) if self.weights.alphas[t])
            if self.training and torch.is_tensor(aux) and aux.requires_grad:
                h = _AuxLossGrad.apply(h, aux, self.aux_grad_scale)
            carried = terms.detach() if carried is None else carried + terms.detach()
            return (h, carried.view(torch.int32), input_ids, labels, *doc)
        if not self.training:  # evaluation: the main head's loss (MTP is a training objective)
            return out.lm_loss
        loss, self.last_parts = total_loss(out, self.weights, carried)
        return loss


class _TiedModuleSpec(TiedLayerSpec):
    """A TiedLayerSpec for an already built stage (DeepSpeed builds specs; ours exist, possibly TP-sharded)."""

    def __init__(self, key: str, module: nn.Module | None):
        super().__init__(key, nn.Module if module is None else type(module), tied_weight_attr=[TIED_WEIGHT])
        self.module = module

    def build(self, log=False):
        return self.module


class DeepSeekPipeline(PipelineModule):
    """The model's stages for DeepSpeed's ``PipelineEngine``: one layer per stage (see the module docstring)."""

    def __init__(self, model: DeepSeekModel, topo, cfg: Config):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        check_pipeline_layout(cfg)
        self.bounds = stage_bounds(model, cfg)
        self.num_moe_rows, self.num_experts = len(_moe_rows(model)), model.config.n_routed_experts
        weights = LossWeights.at(cfg, 0.0)  # lambda is set per step (set_loss_weights)
        pp, stage = topo.pp, topo.pp_rank
        # Only this rank's stage is cut; the other stages' modules go with the plain model once the caller drops it.
        layers = [None] * pp
        module = PipelineStage.cut(model, self.bounds[stage], self.bounds[stage + 1], stage == 0, stage == pp - 1,
                                   weights)
        layers[stage] = _TiedModuleSpec(EMBED_KEY, module) if stage in (0, pp - 1) else module
        for s in range(pp):  # placeholders DeepSpeed never builds (other ranks' stages); keys for the tied groups
            if layers[s] is None:
                layers[s] = _TiedModuleSpec(EMBED_KEY, None) if s in (0, pp - 1) else nn.Identity()
        ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
        super().__init__(layers, topology=ds_topo, loss_fn=_stage_loss, partition_method="uniform")
        self.topo, self.cfg = topo, cfg
        # DeepSpeed marks every parameter of a tied module on its non-first owner as a replica (left out of the
        # gradient norm); here the tied module is the whole last stage, and only its embedding is a replica.
        for name, p in module.named_parameters():
            p.ds_pipe_replicated = stage == pp - 1 and name == TIED_WEIGHT and pp > 1
        if hasattr(model, "ds_moe_marker"):  # parallel.expert: makes DeepSpeed reduce experts over expert-DP
            self.ds_moe_marker = model.ds_moe_marker
        if self.global_rank == 0:
            print("[pipeline] " + " | ".join(self._describe_stage(s) for s in range(pp)), flush=True)

    def _partition_layers(self, method="uniform"):
        """One DeepSpeed layer per stage."""
        self.parts = list(range(self.num_stages + 1))
        self._set_bounds(start=self._topo.get_coord(self.global_rank).pipe,
                         stop=self._topo.get_coord(self.global_rank).pipe + 1)

    def _describe_stage(self, stage: int) -> str:
        """E.g. 'stage 0: embedding, layers 0-3'."""
        first, stop, last = self.bounds[stage], self.bounds[stage + 1], stage == self.num_stages - 1
        parts = (["embedding"] if stage == 0 else []) + ([f"layers {first}-{stop - 1}"] if stop > first else [])
        parts += ["norm, head, MTP"] if last else []
        return f"stage {stage}: {', '.join(parts)}"

    @property
    def stage(self) -> PipelineStage:
        return next(f for f in self.forward_funcs if isinstance(f, PipelineStage))

    def set_loss_weights(self, weights: LossWeights) -> None:
        self.stage.weights = weights

    def get_additional_losses(self):
        """DeepSpeed averages these over micro-batches and data-parallel ranks and broadcasts them to all stages;
        every stage must return the same names (non-last stages only count them)."""
        parts = self.stage.last_parts
        return {n: torch.zeros(()) if parts is None else parts[n] for n in LOSS_NAMES[1:]}

    # -------------------------------------------------------------------------------- expert balancing

    @torch.no_grad()
    def collect_expert_load(self, device) -> tuple[float, torch.Tensor]:
        """(dropped token copies, (L, E) tokens per expert) of this step's training micro-batches, summed over
        micro-batches, data-parallel ranks and stages (identical on every rank); resets the stage's accumulators."""
        stage = self.stage
        load = torch.zeros(self.num_moe_rows * self.num_experts + 1, device=device)
        if stage.load_sum is not None:
            load[:-1].view(self.num_moe_rows, self.num_experts)[stage.moe_rows] += stage.load_sum.to(device)
        load[-1] = stage.dropped_sum
        stage.load_sum, stage.dropped_sum = None, 0.0
        dist.all_reduce(load, group=self.topo.dp_group)
        dist.all_reduce(load, group=self.topo.pp_group)  # each stage filled only its own rows
        return float(load[-1]), load[:-1].view(self.num_moe_rows, self.num_experts)

    # ------------------------------------------------------------------------------------- checkpoints

    def _expert_keys(self, layer: nn.Module) -> set[str]:
        from parallel.shards import expert_parameter_names
        return expert_parameter_names(layer)

    def _expert_path(self, ckpt_dir: str, local_idx: int) -> str:
        return self.ckpt_layer_path(ckpt_dir, local_idx).replace("-model_states.pt",
                                                                 f"-expert_{self.topo.ep_rank:02d}-model_states.pt")

    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        """DeepSpeed's layer files, written by the first expert-data-parallel rank of each EP group: EP rank 0
        writes every tensor, EP ranks > 0 only their experts (DeepSpeed alone would keep EP rank 0's experts)."""
        from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

        if self.topo.edp_rank != 0:
            return
        checkpoint_engine.makedirs(save_dir, exist_ok=True)
        for idx, layer in enumerate(self.forward_funcs):
            if not isinstance(layer, nn.Module):
                continue
            state = layer.state_dict()
            path = self.ckpt_layer_path(save_dir, idx)
            if self.topo.ep_rank > 0:
                keys = self._expert_keys(layer)
                if not keys:
                    continue
                state, path = {k: v for k, v in state.items() if k in keys}, self._expert_path(save_dir, idx)
            checkpoint_engine.save(clone_tensors_for_torch_save(state), path)

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        for idx, layer in enumerate(self.forward_funcs):
            if not isinstance(layer, nn.Module):
                continue
            state = checkpoint_engine.load(self.ckpt_layer_path(load_dir, idx), map_location="cpu")
            if self.topo.ep_rank > 0 and self._expert_keys(layer):
                state.update(checkpoint_engine.load(self._expert_path(load_dir, idx), map_location="cpu"))
            layer.load_state_dict(state, strict=strict)
        self._synchronize_tied_weights()


def to_pipeline_module(model: nn.Module, topo, cfg: Config) -> DeepSeekPipeline:
    """Cut a built (and TP/EP-parallelized) ``DeepSeekModel`` into ``topo.pp`` DeepSpeed pipeline stages.

    Call on every rank (collective: DeepSpeed creates its pipeline, data and tied-weight groups).
    """
    return DeepSeekPipeline(model, topo, cfg)


# ------------------------------------------------------------------------------------------- training loop

def pipeline_train_batch(engine, micro_batches: list, weights: LossWeights, batch_fn, device):
    """One optimizer step with DeepSpeed's 1F1B schedule over this data-parallel rank's micro-batches.

    micro_batches: the data stream's rows, one per micro-batch (every stage draws them; the first and last stage
    read them); batch_fn: rows -> the objective's batch on the device, ``{"input_ids", "labels", "document_ids"}``
    (``pretrain.train.Objective.batch``: pretraining's (mb, seq + 1) windows, SFT's packed rows with masked labels
    and per-row document ids). Returns (the ``pretrain.loss.LOSS_NAMES`` parts averaged over micro-batches and
    data-parallel ranks, identical on every rank; dropped token copies; expert load (L, E) of the training
    micro-batches summed over micro-batches, data-parallel ranks and stages). The bias is moved by the caller
    (``balance_experts``) once it knows whether the step was applied.
    """
    module = engine.module
    module.set_loss_weights(weights)
    # the last stage's loss is backpropagated with 1 / accumulation steps (DeepSpeed's scale_wrt_gas); the balance
    # losses of earlier stages get the same (_AuxLossGrad)
    module.stage.aux_grad_scale = 1.0 / engine.gradient_accumulation_steps()
    # TP-split experts: gradients accumulate locally and cross TP in the last micro-batch's backward (the pipeline
    # supports ZeRO 0/1, which keep .grad until the step)
    sync_expert_grads(module.stage, False, local_backwards=engine.gradient_accumulation_steps() - 1)
    loss = engine.train_batch(pipeline_batches(micro_batches, batch_fn))
    extra = engine.get_additional_losses()
    parts = {"loss": loss, **extra}
    means = torch.stack([parts[n].float().reshape(()).to(device) for n in LOSS_NAMES])
    return (means, *module.collect_expert_load(device))


def pipeline_batches(micro_batches: list, batch_fn):
    """DeepSpeed's (inputs, labels) per micro-batch: inputs = (input_ids, labels[, document_ids]) for the first
    stage, which sends them on to the last (see the module docstring)."""
    batches = []
    for rows in micro_batches:
        b = batch_fn(rows)
        doc = b.get("document_ids")
        batches.append(((b["input_ids"], b["labels"]) + (() if doc is None else (doc,)), b["labels"]))
    return iter(batches)


@torch.no_grad()
def pipeline_eval_loss(engine, micro_batches: list, batch_fn) -> float:
    """Mean main-head loss over micro-batches and data-parallel ranks (MTP off in eval), on every rank. No expert
    load is collected (the stages count training micro-batches only)."""
    loss = engine.eval_batch(pipeline_batches(micro_batches, batch_fn), num_micro_batches=len(micro_batches))
    return float(loss)


def _stage_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's ``loss_fn``: the last stage already computed the loss (``PipelineStage.forward``)."""
    return outputs

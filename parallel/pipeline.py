"""Pipeline parallelism: the finished (possibly TP/EP-parallelized) model cut into DeepSpeed ``PipelineModule`` stages.

A stage is the same ``DeepSeekModel`` with the modules it does not own removed (torchtitan's pattern): stage 0
keeps the embedding, every stage its slice of ``layers`` (a ModuleDict keyed by the global layer index, so the
state-dict names stay the plain model's), the last stage the norm, head, MTP modules and the embedding again (for
the MTP inputs and a tied head). ``PipelineStage.forward`` is a thin adapter between DeepSpeed's tuple protocol and
``DeepSeekModel.forward``, so blocks, RoPE positions, document masks, MTP input shifting, activation checkpointing
and expert-load collection exist once, in the model. The loss is the objective's ``output_loss`` (pretraining's:
``pretrain.loss.total_loss``), the same function as the plain path's. DeepSpeed's layer list is one entry per
stage::

    stage 0       (input_ids, labels[, document_ids])                 -> (h, terms, input_ids, labels[, document_ids])
    stage 1..p-2  (h, terms, input_ids, labels[, document_ids])       -> the same tuple
    stage p-1     (h, terms, input_ids, labels[, document_ids])       -> (model output, terms)
                  + DeepSpeed's labels (labels, the batch's other tensors) -> the objective's loss (``loss_fn``)

What travels between stages and why:
- ``h`` (B, T, H): the hidden states.
- ``terms`` (len(BALANCE_TERMS),): the unweighted balance terms of every MoE layer so far, detached, as the bits of
  an fp32 vector in an int32 tensor, so the last stage logs (and returns) the single-process loss. Their gradients
  do not travel: each stage hands its own alpha-weighted terms the gradient the loss has (1 / accumulation steps)
  in backward (``_AuxLossGrad``, megatron-core's MoEAuxLossAutoScaler). DeepSpeed runs one backward per float
  tensor a stage sent, so ``h`` is the only one: a second would walk each stage's graph twice.
- ``input_ids``, ``labels``, ``document_ids`` (B, T) int64, as the objective's ``batch`` made them (SFT: labels
  -100 outside the assistant turns, a document per packed conversation): the last stage embeds the shifted tokens
  for MTP; integer tensors travel without gradients. DeepSpeed hands the last stage the micro-batch's labels and
  the objective's other tensors (a pair's lengths, DPO's reference log-probs, GRPO's advantages and pi_old) as its
  ``labels`` tuple; ``DeepSeekPipeline.last_stage_loss`` (DeepSpeed's ``loss_fn``) gives them with the stage's
  output to ``Objective.output_loss``, the function the one-process loop calls after its forward.
- The embedding is tied between the first and the last stage (``TiedLayerSpec`` on ``embed_tokens.weight``) when
  the last stage uses it (MTP inputs, a tied head; ``last_stage_embeds``): DeepSpeed broadcasts it at start and
  all-reduces its gradient over the two stages before the optimizer step. Without MTP and with an untied head
  (post-training's RM, DPO, RL) only stage 0 holds it.
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
from pretrain.loss import BALANCE_TERMS, LossWeights, balance_vector, dropped_tokens
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


def last_stage_embeds(model: DeepSeekModel) -> bool:
    """Whether the last stage needs the embedding: for the MTP modules' inputs or a tied head. Without either it
    holds no copy (a copy without a gradient would leave DeepSpeed's tied-gradient all-reduce waiting for it)."""
    return len(model.mtp) > 0 or model.lm_head.weight is model.embed_tokens.weight


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
        if not (is_first or (is_last and last_stage_embeds(model))):
            stage.embed_tokens = None
        if not is_last:
            stage.norm, stage.lm_head, stage.mtp = None, None, nn.ModuleList()
        stage.is_first, stage.is_last, stage.weights = is_first, is_last, weights
        if "ds_moe_marker" in stage._modules and not stage.holds_experts():
            del stage._modules["ds_moe_marker"]  # parallel.expert's marker: DeepSpeed would want a MoE param group
        stage.moe_rows = [rows[id(m)] for m in stage.modules() if isinstance(m, Router)]
        stage.load_sum, stage.dropped_sum, stage.last_parts = None, 0.0, None
        stage.aux_grad_scale = 1.0  # d(loss)/d(loss) as DeepSpeed backpropagates it: 1 / gradient accumulation steps
        return stage

    def holds_experts(self) -> bool:
        """Whether this stage holds expert-parallel experts (a stage of dense first layers does not)."""
        from parallel.shards import expert_parameter_names
        return bool(expert_parameter_names(self))

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
        return out, carried  # the loss: DeepSeekPipeline.last_stage_loss (DeepSpeed's loss_fn), with the batch


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
        tied = (0, pp - 1) if last_stage_embeds(model) else ()
        layers[stage] = _TiedModuleSpec(EMBED_KEY, module) if stage in tied else module
        for s in range(pp):  # placeholders DeepSpeed never builds (other ranks' stages); keys for the tied groups
            if layers[s] is None:
                layers[s] = _TiedModuleSpec(EMBED_KEY, None) if s in tied else nn.Identity()
        ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
        # micro-batches of varying width (GRPO cuts each at its longest row): DeepSpeed sends the shapes every time
        super().__init__(layers, topology=ds_topo, loss_fn=self.last_stage_loss, partition_method="uniform",
                         dynamic_shape=getattr(model, "varying_shapes", False))
        self.topo, self.cfg = topo, cfg
        self.objective, self.label_keys = None, ("labels",)  # pipeline_batches sets them
        # DeepSpeed marks every parameter of a tied module on its non-first owner as a replica (left out of the
        # gradient norm); here the tied module is the whole last stage, and only its embedding is a replica.
        for name, p in module.named_parameters():
            p.ds_pipe_replicated = stage == pp - 1 and name == TIED_WEIGHT and pp > 1
        # parallel.expert's marker makes DeepSpeed reduce experts over expert-DP; a stage holding no experts (dense
        # first layers) carries none (deepspeed.initialize would want a MoE parameter group)
        if hasattr(model, "ds_moe_marker") and module.holds_experts():
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

    def last_stage_loss(self, outputs, labels) -> torch.Tensor:
        """DeepSpeed's ``loss_fn`` on the last stage: (model output, carried balance terms) and the micro-batch's
        label tensors (``pipeline_batches``) -> the objective's loss (``Objective.output_loss``: pretraining's is
        ``total_loss``); in evaluation ``Objective.output_eval_loss`` (the main head's loss)."""
        out, carried = outputs
        batch = dict(zip(self.label_keys, labels if isinstance(labels, (tuple, list)) else (labels,)))
        stage = self.stage
        if not stage.training:  # evaluation: no MTP, no balance terms
            return self.objective.output_eval_loss(out, batch)
        loss, stage.last_parts = self.objective.output_loss(out, batch, stage.weights, carried)
        return loss

    @property
    def part_names(self) -> tuple:
        """The logged parts besides the loss (``Objective.names[1:]``)."""
        return tuple(self.objective.names[1:])

    def get_additional_losses(self):
        """DeepSpeed averages these over micro-batches and data-parallel ranks and broadcasts them to all stages;
        every stage must return the same names (non-last stages only count them). A name the loss does not give is 0
        here (``Objective.finish_parts`` fills it: PPO's critic metrics)."""
        parts = self.stage.last_parts or {}
        return {n: parts.get(n, torch.zeros(())) for n in self.part_names}

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

def pipeline_train_batch(engine, micro_batches: list, weights: LossWeights, batch_fn, device, objective):
    """One optimizer step with DeepSpeed's 1F1B schedule over this data-parallel rank's micro-batches.

    micro_batches: the data stream's rows, one per micro-batch (every stage draws them; the first and last stage
    read them); batch_fn: rows -> the objective's batch on the device, ``{"input_ids", "labels", "document_ids",
    ...}`` (``pretrain.train.Objective.batch``: pretraining's (mb, seq + 1) windows, SFT's packed rows with masked
    labels and per-row document ids, a preference pair's lengths and reference log-probs, a rollout's advantages);
    objective: its ``output_loss`` / ``names`` on the last stage (``pretrain.train.Objective``). Returns (the
    objective's parts (``names``) averaged over micro-batches and data-parallel ranks, identical on every rank;
    dropped token copies; expert load (L, E) of the training micro-batches summed over micro-batches,
    data-parallel ranks and stages). The bias is moved by the caller (``balance_experts``) once it knows whether
    the step was applied.
    """
    module = engine.module
    module.set_loss_weights(weights)
    # the last stage's loss is backpropagated with 1 / accumulation steps (DeepSpeed's scale_wrt_gas); the balance
    # losses of earlier stages get the same (_AuxLossGrad)
    module.stage.aux_grad_scale = 1.0 / engine.gradient_accumulation_steps()
    # TP-split experts: gradients accumulate locally and cross TP in the last micro-batch's backward (the pipeline
    # supports ZeRO 0/1, which keep .grad until the step)
    sync_expert_grads(module.stage, False, local_backwards=engine.gradient_accumulation_steps() - 1)
    loss = engine.train_batch(pipeline_batches(micro_batches, batch_fn, module, objective))
    parts = {"loss": loss, **engine.get_additional_losses()}
    means = torch.stack([parts[n].float().reshape(()).to(device) for n in ("loss",) + module.part_names])
    return (means, *module.collect_expert_load(device))


def pipeline_batches(micro_batches: list, batch_fn, module, objective):
    """DeepSpeed's (inputs, labels) per micro-batch. inputs = (input_ids, labels[, document_ids]) for the first
    stage, which sends them on to the last (see the module docstring); labels = the batch's other tensors (and
    numbers, as 0-d tensors) for the last stage's ``last_stage_loss``, under ``module.label_keys``. Every stage
    calls ``batch_fn`` for every micro-batch in order (an objective may run collective work in it: DPO's
    reference forward through the pipeline)."""
    batches, keys = [], None
    for rows in micro_batches:
        b = batch_fn(rows)
        doc = b.get("document_ids")
        extra = {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in b.items()
                 if k not in ("input_ids", "labels", "document_ids") and v is not None}
        names = ("labels", *extra)
        if keys is not None and names != keys:
            raise ValueError(f"pipeline micro-batches differ in their keys: {keys} vs {names}")
        keys = names
        inputs = (b["input_ids"], b["labels"]) + (() if doc is None else (doc,))
        batches.append((inputs, (b["labels"], *extra.values())))
    module.objective, module.label_keys = objective, keys or ("labels",)
    return iter(batches)


@torch.no_grad()
def pipeline_eval_loss(engine, micro_batches: list, batch_fn, objective) -> float:
    """Mean held-out loss (``Objective.output_eval_loss``; pretraining: the main head's, MTP off) over micro-batches
    and data-parallel ranks, on every rank. No expert load is collected (the stages count training micro-batches
    only)."""
    batches = pipeline_batches(micro_batches, batch_fn, engine.module, objective)
    return float(engine.eval_batch(batches, num_micro_batches=len(micro_batches)))


# ------------------------------------------------------------------------------ forwards outside the schedule

class PipeLink:
    """A pipeline stage's neighbours in the pp group (megatron-core's): h (B, T, H) goes to the next stage point to
    point; what the last stage computes is broadcast to the others (``share``)."""

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(self.group)
        stage = ranks.index(dist.get_rank())
        self.prev = ranks[stage - 1] if stage > 0 else None
        self.next = ranks[stage + 1] if stage + 1 < len(ranks) else None
        self.last = ranks[-1]

    def share(self, value: torch.Tensor | None, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """The last stage's ``value`` on every stage of the pp group (the others pass None)."""
        out = value.contiguous() if self.next is None else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(out, self.last, group=self.group)
        return out


def pipe_link(model) -> PipeLink | None:
    """The stage's link when ``model`` is one stage of a pipeline (``PipelineStage``), else None."""
    if getattr(model, "is_last", None) is None or (model.is_first and model.is_last):
        return None
    return PipeLink()


def stage_forward(stage: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                  document_ids: torch.Tensor | None = None, link: PipeLink | None = None):
    """One forward of a batch through the pipeline outside DeepSpeed's schedule (RL's pi_old and pi_ref, DPO's
    reference, the critic's values; no grad): stage s receives h from stage s - 1, runs its layers and sends h to
    s + 1; the last stage returns the ``DeepSeekModel`` output (``lm_loss`` = its ``loss_fn``'s values), the
    others None. Every stage of the pp group calls it with the same batch. ``stage`` may be a whole model (no
    pipeline): then this is its forward."""
    link = link or pipe_link(stage)
    if link is None:
        return stage(input_ids, labels=labels, document_ids=document_ids)
    h = None
    if link.prev is not None:
        ref = next(stage.parameters())
        h = torch.empty(*input_ids.shape, stage.config.hidden_size, dtype=ref.dtype, device=ref.device)
        dist.recv(h, link.prev)
    out = DeepSeekModel.forward(stage, input_ids, labels=labels if link.next is None else None,
                                document_ids=document_ids, hidden_states=h)
    if link.next is not None:
        dist.send(out.hidden_states.contiguous(), link.next)
        return None
    return out


def forward_everywhere(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, reduce, shape,
                       link: PipeLink | None = None) -> torch.Tensor:
    """``reduce(model output)`` (an fp32 tensor of ``shape``) of ``stage_forward`` on every stage of the pipeline:
    computed by the last stage and broadcast over the pp group (without a pipeline: the model's own)."""
    link = link or pipe_link(model)
    out = stage_forward(model, input_ids, labels, link=link)
    value = None if out is None else reduce(out).float()
    return value if link is None else link.share(value, shape, torch.float32, input_ids.device)


def cut_stage(model: DeepSeekModel, cfg: Config, topo) -> nn.Module:
    """This rank's stage of ``model`` (training's stage bounds, the other stages' modules removed) under
    ``parallel.pp`` > 1, else the model: a frozen copy beside the training engine (DPO's reference, RL's
    reference and critic) or a model for generation."""
    if topo.pp == 1:
        return model
    bounds, stage, pp = stage_bounds(model, cfg), topo.pp_rank, topo.pp
    return PipelineStage.cut(model, bounds[stage], bounds[stage + 1], stage == 0, stage == pp - 1, weights=None)

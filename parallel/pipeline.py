"""Pipeline parallelism: the finished (possibly TP/EP-parallelized) model cut into DeepSpeed ``PipelineModule`` stages.

Layer list handed to DeepSpeed (each stage owns a contiguous slice; 1F1B via ``engine.train_batch``)::

    TiedLayerSpec("embed")  embed_tokens(input_ids)                         -> (h, aux, input_ids)
    _BlockStage x L         h = layers[i](h); aux += (seq_aux, expert_aux)   -> (h, aux, input_ids)
    TiedLayerSpec("embed")  the same embedding on the last stage, for MTP   -> (h, aux, input_ids, emb_1..emb_D)
    _HeadStage              norm, lm_head, mtp[0..D-1]                      -> (logits, mtp_logits_1..D, aux)
    loss_fn(outputs, labels) = lm_loss + lambda * mean(mtp) + seq_aux_alpha * aux[0] + aux_loss_alpha * aux[1]

What travels between stages and why:
- ``input_ids`` (B, T) int64 ride along in the activation tuple: the MTP modules on the last stage embed the
  tokens shifted by k. DeepSpeed sends integer tensors without gradients (``is_floating_point`` filter).
- ``aux`` (2,) fp32 accumulates the unweighted balance losses of every MoE layer on every stage, so the loss on
  the last stage is the single-process loss and autograd carries alpha back to each stage's routers (every
  floating tensor sent forward receives a gradient back, which DeepSpeed requires).
- The embedding is one tied module: stage 0 uses it for the input, the last stage for the MTP inputs (and as
  ``lm_head`` when ``tie_word_embeddings``). DeepSpeed broadcasts it at start and all-reduces its gradient over
  the two stages before the optimizer step, so both copies equal the single-process weight.
- Expert-load counts are not differentiable and every stage needs only its own routers' rows, so they go through
  a side channel: each ``_BlockStage``/``_HeadStage`` adds its counts to a local buffer; after ``train_batch`` the
  rows are summed over data-parallel ranks and pipeline stages (``collect_expert_load``), every stage moves its
  own routers' bias, and the full (L, E) matrix is returned for logging.

Partitioning: by parameter count with DeepSpeed's ``partition_balanced`` (the embedding always on the first
stage, norm/head/MTP always on the last), or ``parallel.pipeline_layout`` = transformer layers per stage.

Checkpoints keep DeepSpeed's pipeline layout (``layer_XX-model_TT-model_states.pt`` per layer and TP rank) with
state-dict keys equal to the plain model's names; with expert parallelism EP rank e > 0 also writes its experts
to ``layer_XX-model_TT-expert_EE-model_states.pt``. ``gather_pipeline_state_dict`` merges stages, TP shards and
expert shards back into the single-process state dict for export.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced

from pretrain.config import Config, ConfigError
from pretrain.model.moe import MoE, Router, update_expert_bias

EMBED_KEY = "embed"
LOSS_NAMES = ("lm_loss", "mtp_loss", "seq_aux_loss")


def check_pipeline_layout(cfg: Config) -> None:
    """One-line ConfigError when ``parallel.pipeline_layout`` does not describe ``parallel.pp`` stages."""
    layout, pp, layers = cfg.parallel.pipeline_layout, cfg.parallel.pp, cfg.model.num_hidden_layers
    if layout is None:
        return
    valid = (isinstance(layout, (list, tuple)) and len(layout) == pp and all(isinstance(n, int) for n in layout)
             and sum(layout) == layers and min(layout) >= 0 and all(n >= 1 for n in layout[1:-1]))
    if not valid:
        raise ConfigError(f"parallel.pipeline_layout={list(layout)}: give pp={pp} layer counts summing to "
                          f"model.num_hidden_layers={layers} (>= 1 for inner stages, >= 0 for the first and last), "
                          f"or null to balance stages by parameters")


def _run(module: nn.Module, mode: str, *args):
    """The model's activation checkpointing ("full" recomputes the block in backward)."""
    if mode == "full" and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class _MoEStatsMixin:
    """Accumulates this stage's expert-load rows over the micro-batches of one step (the side channel)."""

    def _init_stats(self, rows: list[int]) -> None:
        self.moe_rows = rows  # global row of each local MoE layer in the model's (L, E) expert_load
        self.load_sum = None

    def _add_load(self, loads: list[torch.Tensor]) -> None:
        stacked = torch.stack([l.detach().float() for l in loads])
        self.load_sum = stacked if self.load_sum is None else self.load_sum + stacked


class _EmbeddingStage(nn.Module):
    """First layer: token ids -> (h (B, T, H), aux (2,) fp32, input_ids (B, T)). Tied with the last stage."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor):
        h = self.embed_tokens(input_ids)
        # A zero that is part of the graph: DeepSpeed back-propagates into every floating tensor it sent.
        aux = h.new_zeros(2, dtype=torch.float32) + h[:0].sum().float()
        return h, aux, input_ids


def _mtp_embeddings(stage: _EmbeddingStage, inputs, depth: int):
    """Last stage, tied embedding: append emb(roll(input_ids, -k)) (B, T, H) for k = 1..D (as the model does)."""
    h, aux, input_ids = inputs
    embs = tuple(stage.embed_tokens(torch.roll(input_ids, -k, dims=1)) for k in range(1, depth + 1))
    return (h, aux, input_ids) + embs


class _BlockStage(_MoEStatsMixin, nn.Module):
    """One transformer block; registered as ``layers.{index}`` so its state-dict keys are the model's."""

    def __init__(self, index: int, block: nn.Module, rotary: nn.Module, checkpointing: str, rows: list[int]):
        super().__init__()
        self.layers = nn.ModuleDict({str(index): block})  # the block itself is not registered a second time
        self.index, self.rotary, self.checkpointing = str(index), rotary, checkpointing
        self._init_stats(rows)

    def forward(self, inputs):
        h, aux, input_ids = inputs
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        cos, sin = self.rotary(positions, h.dtype)  # no tensors in the module: recomputed per stage
        h, stats = _run(self.layers[self.index], self.checkpointing, h, cos, sin)
        if stats is not None:
            load, seq_aux, expert_aux = stats
            self._add_load([load])
            aux = aux + torch.stack([seq_aux, expert_aux]).float()
        return h, aux, input_ids


class _HeadStage(_MoEStatsMixin, nn.Module):
    """Last layer: final norm, head and the MTP modules -> (logits (B, T, V[/tp]), D x MTP logits, aux (2,))."""

    def __init__(self, model: nn.Module, rows: list[int]):
        super().__init__()
        self.norm, self.lm_head, self.mtp, self.rotary = model.norm, model.lm_head, model.mtp, model.rotary
        self.checkpointing = model.activation_checkpointing
        self._init_stats(rows)

    def forward(self, inputs):
        h, aux, input_ids, *embs = inputs
        outputs = [self.lm_head(self.norm(h))]
        if self.training:  # MTP is a training objective only (eval = the main head's loss)
            positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            cos, sin = self.rotary(positions, h.dtype)
            loads = []
            for module, emb in zip(self.mtp, embs):
                h, stats = _run(module, self.checkpointing, h, emb, cos, sin)
                outputs.append(self.lm_head(module.norm(h)))
                if stats is not None:
                    loads.append(stats[0])
                    aux = aux + torch.stack([stats[1], stats[2]]).float()
            if loads:
                self._add_load(loads)
        return (*outputs, aux)


class _TiedModuleSpec(TiedLayerSpec):
    """A TiedLayerSpec for an already built module (DeepSpeed builds specs; ours exist, possibly TP-sharded)."""

    def __init__(self, key: str, module: nn.Module, forward_fn=None):
        super().__init__(key, type(module), forward_fn=forward_fn, tied_weight_attr=["embed_tokens.weight"])
        self.module = module

    def build(self, log=False):
        return self.module


def _moe_rows(model: nn.Module) -> dict[int, int]:
    """id(router) -> its row in ``ModelOutput.expert_load`` (``model.modules()`` order)."""
    return {id(r): row for row, r in enumerate(m for m in model.modules() if isinstance(m, Router))}


def _rows_of(module: nn.Module, rows: dict[int, int]) -> list[int]:
    return [rows[id(m)] for m in module.modules() if isinstance(m, Router)]


class DeepSeekPipeline(PipelineModule):
    """The model's stages for DeepSpeed's ``PipelineEngine``; see the module docstring for the layer list."""

    def __init__(self, model: nn.Module, topo, cfg: Config):
        check_pipeline_layout(cfg)
        rows = _moe_rows(model)
        self.num_moe_rows, self.num_experts = len(rows), model.config.n_routed_experts
        embedding = _EmbeddingStage(model.embed_tokens)
        depth = len(model.mtp)
        layers = [_TiedModuleSpec(EMBED_KEY, embedding)]
        layers += [_BlockStage(i, block, model.rotary, model.activation_checkpointing, _rows_of(block, rows))
                   for i, block in enumerate(model.layers)]
        layers += [_TiedModuleSpec(EMBED_KEY, embedding, forward_fn=lambda m, x: _mtp_embeddings(m, x, depth)),
                   _HeadStage(model, [r for m in model.mtp for r in _rows_of(m, rows)])]
        self.layout = cfg.parallel.pipeline_layout
        ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
        super().__init__(layers, topology=ds_topo, loss_fn=self.compute_loss, partition_method="parameters")
        # Keep only this stage's layers: the other stages' weights go with the plain model once the caller drops it.
        self._layer_specs = [spec if self._local_start <= i < self._local_stop else None
                             for i, spec in enumerate(self._layer_specs)]
        self.ce, self.topo, self.cfg = model.loss_fn, topo, cfg
        self.mtp_weight = cfg.mtp.loss_weight
        self.last_losses = None
        if hasattr(model, "ds_moe_marker"):  # parallel.expert: makes DeepSpeed reduce experts over expert-DP
            self.ds_moe_marker = model.ds_moe_marker

    # ------------------------------------------------------------------------------------ partitioning

    def _partition_layers(self, method="parameters"):
        """Stage boundaries over [embedding, L blocks, (MTP embedding + head)]: the tail pair stays together."""
        num_specs = len(self._layer_specs)
        if self.layout is not None:  # the embedding precedes stage 0's blocks, the tail pair follows the last's
            self.parts = [0] + [1 + n for n in itertools.accumulate(self.layout[:-1])] + [num_specs]
        else:  # units: embedding, each block, the tail pair (MTP embedding + head) as one
            counts = self._count_layer_params()
            self.parts = partition_balanced(weights=counts[:-2] + [counts[-2] + counts[-1]], num_parts=self.num_stages)
            self.parts[-1] = num_specs
        if any(a >= b for a, b in zip(self.parts, self.parts[1:])):
            raise ConfigError(f"pipeline stages {self.parts} (layer-list bounds): a stage got no layers; set "
                          f"parallel.pipeline_layout or use fewer stages than model.num_hidden_layers + 2")
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        if self.global_rank == 0:
            print("[pipeline] " + " | ".join(self._describe_stage(s) for s in range(self.num_stages)), flush=True)

    def _describe_stage(self, stage: int) -> str:
        """E.g. 'stage 0: embedding, layers 0-3'."""
        start, stop = self.parts[stage], self.parts[stage + 1]
        blocks = [i - 1 for i in range(start, stop) if 1 <= i <= len(self._layer_specs) - 3]
        parts = (["embedding"] if start == 0 else []) + ([f"layers {blocks[0]}-{blocks[-1]}"] if blocks else [])
        parts += ["norm, head, MTP"] if stop == len(self._layer_specs) else []
        return f"stage {stage}: {', '.join(parts)}"

    # -------------------------------------------------------------------------------------------- loss

    def compute_loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """outputs = (logits, MTP logits..., aux (2,)), labels (B, T) -> the training loss (scalar).

        The same formula as ``pretrain.train``: lm + lambda * mean(mtp) + seq_aux_alpha * seq_aux
        + aux_loss_alpha * expert_aux. Eval (module in eval mode) returns the main head's loss only.
        """
        logits, *mtp_logits, aux = outputs
        lm_loss = self.ce(logits, labels)
        if not self.training:
            return lm_loss
        T = labels.shape[1]
        mtp_losses = []
        for k, logits_k in enumerate(mtp_logits, start=1):
            labels_k = torch.roll(labels, -k, dims=1)
            labels_k[:, T - k:] = -100
            mtp_losses.append(self.ce(logits_k, labels_k))
        mtp = torch.stack(mtp_losses).mean() if mtp_losses else torch.zeros_like(lm_loss)
        m = self.cfg.moe
        loss = lm_loss + self.mtp_weight * mtp + m.seq_aux_alpha * aux[0] + m.aux_loss_alpha * aux[1]
        self.last_losses = {"lm_loss": lm_loss.detach(), "mtp_loss": mtp.detach(),
                            "seq_aux_loss": aux[0].detach()}
        return loss

    def get_additional_losses(self):
        """DeepSpeed averages these over micro-batches and data-parallel ranks and broadcasts them to all stages;
        every stage must return the same names (non-last stages only count them)."""
        if self.last_losses is None:
            return {name: torch.zeros(()) for name in LOSS_NAMES}
        return self.last_losses

    # -------------------------------------------------------------------------------- expert balancing

    def stage_layers(self) -> list[nn.Module]:
        return [f for f in self.forward_funcs if isinstance(f, _MoEStatsMixin)]

    @torch.no_grad()
    def collect_expert_load(self, device) -> torch.Tensor:
        """(L, E) tokens per expert this step, summed over micro-batches, data-parallel ranks and stages
        (identical on every rank); resets the per-stage accumulators."""
        load = torch.zeros(self.num_moe_rows, self.num_experts, device=device)
        for layer in self.stage_layers():
            if layer.load_sum is not None:
                load[layer.moe_rows] += layer.load_sum.to(device)
                layer.load_sum = None
        if load.numel():
            dist.all_reduce(load, group=self.topo.dp_group)
            dist.all_reduce(load, group=self.topo.pp_group)  # each stage filled only its own rows
        return load

    @torch.no_grad()
    def update_expert_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Move this stage's routers' bias from the full (L, E) load (rows = the plain model's order)."""
        for layer in self.stage_layers():
            routers = nn.ModuleList(m for m in layer.modules() if isinstance(m, Router))
            if len(routers):
                update_expert_bias(routers, load[layer.moe_rows], gamma)

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

def build_pipeline_engine(model: nn.Module, cfg: Config, topo, global_batch_size: int):
    """``deepspeed.initialize`` on the pipeline stages of ``model`` (the loop's config, groups and precision)."""
    import deepspeed

    from pretrain.engine import deep_merge, deepspeed_config, keep_router_bias_fp32, param_groups

    module = to_pipeline_module(model, topo, cfg)
    # No activation partitioning over TP: the activation tuple holds several tensors that need gradients.
    ds_config = deep_merge({"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}},
                           deepspeed_config(cfg, topo.dp_size, global_batch_size))
    # Named groups: DeepSpeed's MoE support splits expert parameters out of each group by its name.
    groups = [{"name": f"group{i}", **g} for i, g in enumerate(param_groups(module, cfg.optim.weight_decay))]
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, model_parameters=groups)
    keep_router_bias_fp32(engine.module)
    if engine.has_moe_layers:
        _checkpoint_through_layer_files(engine)
    return engine


def _checkpoint_through_layer_files(engine) -> None:
    """Save and load a pipeline with experts through ``DeepSeekPipeline``'s layer files.

    With MoE layers DeepSpeed's PipelineEngine takes its MoE checkpoint path, which skips the pipeline's layer
    files and stores the module from data-parallel rank 0 only: every EP rank would resume with EP rank 0's
    experts (silently). ``has_moe_layers`` matters after initialisation only for checkpoints (the ZeRO optimizer
    keeps its own MoE groups), so it is switched off around them and the plain pipeline path runs.
    """
    def without_moe_path(method):
        def run(*args, **kwargs):
            engine.has_moe_layers = False
            try:
                return method(*args, **kwargs)
            finally:
                engine.has_moe_layers = True
        return run

    engine.save_checkpoint = without_moe_path(engine.save_checkpoint)
    engine.load_checkpoint = without_moe_path(engine.load_checkpoint)


def pipeline_train_batch(engine, micro_batches: list, mtp_weight: float, gamma: float, device):
    """One optimizer step with DeepSpeed's 1F1B schedule over this data-parallel rank's micro-batches.

    micro_batches: LongTensor (mb, seq + 1) each (the first and last stage read them). Returns
    ((loss, lm_loss, mtp_loss, seq_aux_loss) averaged over micro-batches and data-parallel ranks, identical on
    every rank; expert load (L, E) summed over micro-batches and data-parallel ranks). The routers' bias is moved.
    """
    module = engine.module
    module.mtp_weight = mtp_weight
    batches = _inputs_and_labels(micro_batches, device)
    loss = engine.train_batch(batches)
    extra = engine.get_additional_losses()
    means = torch.stack([loss.float().reshape(())] + [extra[n].float().reshape(()) for n in LOSS_NAMES]).to(device)
    load = module.collect_expert_load(device)
    if load.numel():
        module.update_expert_bias(load, gamma)
    return means, load


def _inputs_and_labels(micro_batches: list, device):
    """(input_ids, labels) per micro-batch on ``device``: what DeepSpeed's train_batch / eval_batch iterate.
    Pinned batches (GPU) are copied asynchronously."""
    return iter([(t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True))
                 for t in micro_batches])


@torch.no_grad()
def pipeline_eval_loss(engine, micro_batches: list, device) -> float:
    """Mean main-head loss over micro-batches and data-parallel ranks (MTP off in eval), on every rank."""
    batches = _inputs_and_labels(micro_batches, device)
    loss = engine.eval_batch(batches, num_micro_batches=len(micro_batches))
    return float(loss)


# ---------------------------------------------------------------------------------------------- export

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)(?:-expert_(\d+))?-model_states\.pt$")


def is_pipeline_checkpoint(step_dir: Path) -> bool:
    return any(_LAYER_FILE.search(p.name) for p in Path(step_dir).glob("layer_*-model_states.pt"))


def _merge(name: str, shards: list[torch.Tensor], full_shape: torch.Size) -> torch.Tensor:
    """Concatenate shards along the one dim where a shard is smaller than the full tensor (or take one copy)."""
    first = shards[0]
    if first.shape == full_shape:
        return first
    dims = [d for d in range(first.ndim) if first.shape[d] != full_shape[d]]
    if len(dims) != 1:
        raise ValueError(f"{name}: shard shape {tuple(first.shape)} does not split {tuple(full_shape)} along one dim")
    merged = torch.cat(shards, dim=dims[0])
    if merged.shape != full_shape:
        raise ValueError(f"{name}: {len(shards)} shards give {tuple(merged.shape)}, expected {tuple(full_shape)}")
    return merged


def gather_pipeline_state_dict(step_dir: Path, model: nn.Module) -> dict:
    """The single-process state dict (fp32) from a pipeline checkpoint's layer files.

    ``model`` is the plain model (any device, meta is fine) giving the full shapes: a tensor is split over TP
    ranks (``model_TT``) or, for experts, over EP ranks (``expert_EE``, EP rank 0 in the plain layer file) along
    the one dim where its shard is smaller; replicated tensors are taken from TP rank 0.
    """
    files: dict[tuple[int, int], dict[int, dict]] = {}  # (layer, ep) -> tp -> state
    for path in sorted(Path(step_dir).glob("layer_*-model_states.pt")):
        m = _LAYER_FILE.search(path.name)
        if m:
            layer, tp, ep = int(m[1]), int(m[2]), int(m[3] or 0)
            files.setdefault((layer, ep), {})[tp] = torch.load(path, map_location="cpu", weights_only=True)
    if not files:
        raise FileNotFoundError(f"{step_dir}: no pipeline layer files (layer_XX-model_TT-model_states.pt)")
    full = {k: v.shape for k, v in model.state_dict().items()}
    collected: dict[str, dict[tuple[int, int], torch.Tensor]] = {}  # name -> (ep, tp) -> tensor
    for (layer, ep), by_tp in files.items():
        for tp, state in by_tp.items():
            for name, tensor in state.items():
                collected.setdefault(name, {})[(ep, tp)] = tensor
    out = {}
    for name, parts in collected.items():
        if name not in full:
            raise ValueError(f"{step_dir}: {name} is not a parameter of the model in config.yaml")
        eps = sorted({ep for ep, _ in parts})
        per_ep = [_merge(name, [parts[(ep, tp)] for tp in sorted(t for e, t in parts if e == ep)], full[name])
                  if len(eps) == 1 else parts[(ep, 0)] for ep in eps]
        tensor = _merge(name, per_ep, full[name]) if len(eps) > 1 else per_ep[0]
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    return out

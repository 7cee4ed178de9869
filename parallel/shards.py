"""Model shards of a tensor/expert-parallel run without pipeline stages, written for export.

DeepSpeed's ZeRO merge (``zero_to_fp32``) knows neither megatron-core's TP shards nor expert-parallel parameter
groups, so for ``pp == 1`` with ``tp > 1`` or ``ep > 1`` every rank of the first expert-data-parallel replica also
writes its module weights in the pipeline checkpoint's file layout (one "layer" 00 holding the whole model):
``layer_00-model_TT-model_states.pt`` from EP rank 0 (every tensor of TP rank TT) and
``layer_00-model_TT-expert_EE-model_states.pt`` from EP rank EE > 0 (its experts only). Export then merges them
with ``gather_pipeline_state_dict`` below, the same code that merges pipeline stages. Like the
pipeline layer files these hold the module's weights (bf16 under bf16 training), not the fp32 master copies.

Nothing here imports DeepSpeed: exporting a checkpoint merges its files with plain ``torch.load``.

``split_dims`` is the partition plan seen from the state dict (which dim of a tensor TP and EP split), used by the
layout-free checkpoint format (``pretrain.checkpoint_format``) to place a rank's slice in the full tensor and by
the offline converter to cut a checkpoint for a layout no process of which is running.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.expert import ExpertParallelExperts
from parallel.topology import Topology


def expert_parameter_names(module: nn.Module) -> set[str]:
    """State-dict names of the expert-parallel (rank-local) expert weights in ``module``."""
    return {f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, ExpertParallelExperts)
            for p, _ in m.named_parameters(recurse=False)}


# parallel/tensor.py's plan by state-dict name: column-parallel layers split dim 0 (weight and bias), row-parallel
# ones dim 1 of the weight (their bias is replicated), the vocabulary-parallel embedding and head dim 0.
_TP_COLUMN = re.compile(r"(^|\.)(q_proj|q_b_proj|k_proj|v_proj|kv_b_proj|gate_proj|up_proj)\.(weight|bias)$"
                        r"|^(embed_tokens|lm_head)\.weight$")
_TP_ROW = re.compile(r"(^|\.)(o_proj|down_proj)\.weight$")
_ROUTED_EXPERTS = re.compile(r"(^|\.)experts\.[^.]+$")  # stacked (E, ...) routed-expert weights, no ".weight"


def split_dims(name: str) -> tuple[int | None, int | None]:
    """(dim TP splits, dim EP splits) of the plain model's tensor ``name``; None = not split by that axis.

    Routed experts are split only over EP (dim 0, whole experts); they are replicated over TP."""
    if _ROUTED_EXPERTS.search(name):
        return None, 0
    if _TP_COLUMN.search(name):
        return 0, None
    if _TP_ROW.search(name):
        return 1, None
    return None, None


def slice_box(name: str, full_shape, tp: int, tp_rank: int, ep: int, ep_rank: int) -> tuple[list, list]:
    """(offsets, shape) of the slice of tensor ``name`` (full shape ``full_shape``) a rank at (tp_rank, ep_rank)
    holds in a layout of degrees tp, ep: contiguous equal chunks, as ``parallel.tensor._shard`` and
    ``parallel.expert`` cut them."""
    offsets, shape = [0] * len(full_shape), list(full_shape)
    for dim, degree, coord in zip(split_dims(name), (tp, ep), (tp_rank, ep_rank)):
        if dim is not None and degree > 1:
            if shape[dim] % degree:
                raise ValueError(f"{name}: dim {dim} of size {shape[dim]} does not split over {degree} ranks")
            shape[dim] //= degree
            offsets[dim] = coord * shape[dim]
    return offsets, shape


def needs_model_shards(cfg) -> bool:
    return cfg.parallel.pp == 1 and (cfg.parallel.tp > 1 or cfg.parallel.ep > 1)


def save_model_shards(module: nn.Module, cfg, step_dir: Path) -> None:
    """This rank's TP/EP shard of ``module`` into ``step_dir`` (see the module docstring); no-op on other ranks."""
    topo = Topology.from_config(cfg, dist.get_world_size(), dist.get_rank())
    if topo.edp_rank != 0:
        return
    state = module.state_dict()
    name = f"layer_00-model_{topo.tp_rank:02d}-model_states.pt"
    if topo.ep_rank > 0:
        keys = expert_parameter_names(module)
        state = {k: v for k, v in state.items() if k in keys}
        name = f"layer_00-model_{topo.tp_rank:02d}-expert_{topo.ep_rank:02d}-model_states.pt"
    torch.save({k: v.detach().clone() for k, v in state.items()}, Path(step_dir) / name)


# ------------------------------------------------------------------------------------- consolidation

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

"""Model shards of a tensor/expert-parallel run without pipeline stages, written for export.

DeepSpeed's ZeRO merge (``zero_to_fp32``) knows neither megatron-core's TP shards nor expert-parallel parameter
groups, so for ``pp == 1`` with ``tp > 1`` or ``ep > 1`` every rank of the first expert-data-parallel replica also
writes its module weights in the pipeline checkpoint's file layout (one "layer" 00 holding the whole model):
``layer_00-model_TT-model_states.pt`` from EP rank 0 (every tensor of TP rank TT) and
``layer_00-model_TT-expert_EE-model_states.pt`` from EP rank EE > 0 (its experts only). Export then merges them
with ``parallel.pipeline.gather_pipeline_state_dict``, the same code that merges pipeline stages. Like the
pipeline layer files these hold the module's weights (bf16 under bf16 training), not the fp32 master copies.
"""
from __future__ import annotations

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

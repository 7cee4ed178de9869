"""Parallelism applied from outside to the finished plain model (house rule 1).

    from parallel import Topology, initialize_parallel, parallelize_model
    topo = Topology.from_config(cfg, world_size)   # validates the layout before any process group exists
    initialize_parallel(topo)                       # after torch.distributed init: megatron-core groups
    model = parallelize_model(model, topo, cfg)     # tensor parallel, then expert parallel
    deepspeed.initialize(model=model, mpu=topo.deepspeed_mpu(), ...)
"""
from __future__ import annotations

from torch import nn

from parallel.topology import DeepSpeedMPU, Topology, initialize_parallel


def parallelize_model(model: nn.Module, topo: Topology, cfg=None) -> nn.Module:
    """Apply tensor parallelism (tp > 1), then expert parallelism (ep > 1) to a built model, and switch on the
    MoE layers' token dropping (``moe.capacity_factor``; training mode only).

    The model must hold the full weights (the same on every rank: build it with the same seed); each rank
    keeps its slices. Identity when tp = ep = 1. Pipeline cutting is separate (``parallel.pipeline``).
    """
    if topo.tp > 1:
        from parallel.tensor import apply_tensor_parallel
        model = apply_tensor_parallel(model, topo)
    if topo.ep > 1:
        from parallel.expert import apply_expert_parallel
        model = apply_expert_parallel(model, topo)
    if cfg is not None and cfg.moe.capacity_factor is not None:  # decided in the MoE layers, the same in every layout
        from pretrain.model.moe import set_token_dropping
        set_token_dropping(model, cfg.moe.capacity_factor)
    return model


__all__ = ["DeepSpeedMPU", "Topology", "initialize_parallel", "parallelize_model"]

"""Process-group setup and the DeepSpeed engine for the training loop.

The DeepSpeed config is generated from ours (ZeRO stage, precision, clipping, AdamW, micro-batch and gradient
accumulation derived from the global batch) and then deep-merged with the config's free-form ``deepspeed:``
section, so anything DeepSpeed offers can be switched on without code here.
"""
from __future__ import annotations

import copy
import os
import socket

import torch
from torch import nn

from pretrain.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun / the deepspeed launcher; plain ``python`` = one process.

    Under plain python the rendezvous variables are filled in for a 1-process group on a free local port.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def init_distributed(local_rank: int) -> torch.device:
    """NCCL on GPU, gloo on CPU; returns this process's device."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return device


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``; nested mappings merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: Config, dp_size: int, global_batch_size: int) -> dict:
    """The DeepSpeed config for ``cfg`` on ``dp_size`` data-parallel ranks, merged with ``cfg.deepspeed``.

    The LR in the optimizer block is only the initial value: the loop sets it from ``pretrain.schedule``
    before every optimizer step (no DeepSpeed scheduler).
    """
    t, o = cfg.train, cfg.optim
    generated = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // (t.micro_batch_size * dp_size),
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            # torch.optim.AdamW: runs on CPU and GPU without building DeepSpeed's fused kernels.
            "torch_adam": True}},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # our MetricsLogger prints
        "wall_clock_breakdown": False,
    }
    return deep_merge(generated, cfg.deepspeed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (incl. stacked expert weights), none on norms, biases and other 1-D params.

    The router's ``e_score_correction_bias`` is a buffer, not a parameter: the optimizer never sees it.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    # Named groups: with ep > 1 DeepSpeed splits the expert parameters out of each group by its name.
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


def keep_router_bias_fp32(model: nn.Module) -> None:
    """DeepSpeed's bf16 mode casts every buffer; the balancing bias moves in steps of gamma (1e-3), which bf16
    cannot resolve around typical bias values, so it is kept in fp32 (the router scores in fp32 anyway)."""
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor) and bias.dtype != torch.float32:
            module.e_score_correction_bias = bias.float()


def build_engine(model: nn.Module, cfg: Config, topo, global_batch_size: int):
    """``deepspeed.initialize`` for ``model`` on the layout ``topo``; returns the engine."""
    import deepspeed

    ds_config = deepspeed_config(cfg, topo.dp_size, global_batch_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                           config=ds_config, mpu=topo.deepspeed_mpu())
    keep_router_bias_fp32(engine.module)
    return engine


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every optimizer group (ZeRO exposes the wrapped optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr

"""Process-group setup and the DeepSpeed engine for the training loop.

The DeepSpeed config is generated from ours (ZeRO stage, precision, clipping, AdamW, micro-batch and gradient
accumulation derived from the global batch) and then deep-merged with the config's free-form ``deepspeed:``
section, so anything DeepSpeed offers can be switched on without code here.
"""
from __future__ import annotations

import copy
import math
import os
import socket
from datetime import timedelta

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


def init_distributed(local_rank: int, timeout_s: float = 1800.0) -> torch.device:
    """NCCL on GPU, gloo on CPU; returns this process's device. A collective that waits longer than ``timeout_s``
    (a rank died or hangs) raises instead of blocking forever (``train.dist_timeout_s``)."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = timedelta(seconds=timeout_s)
    _init_restarted_process_group(backend, timeout)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)  # no-op init if done above
    return device


def _init_restarted_process_group(backend: str, timeout: timedelta) -> None:
    """After a ``torchrun --max-restarts`` restart the workers reuse the agent's TCPStore, where gloo finds the
    peer addresses of the failed attempt and connects to dead ranks; a per-attempt key prefix keeps attempts
    apart (the first attempt is left to DeepSpeed's usual env:// initialisation)."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import _create_c10d_store

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"/pretrain/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def exit_process(code: int) -> None:
    """End a command that may have run under torchrun: destroy the process group, flush, skip interpreter
    finalisation. Tearing down gloo's and DeepSpeed's C++ worker threads during finalisation (a process group
    still alive, or even one destroyed) occasionally aborts a process whose work is done ("terminate called
    without an active exception", SIGABRT) -- seen on ``posttrain.rejection_sample`` under torchrun in CI."""
    import sys
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def set_collective_timeout(timeout_s: float) -> None:
    """Change the timeout of every process group that exists (world, megatron-core's and DeepSpeed's groups)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
    if dist.is_initialized():
        dist.barrier()  # every rank has switched before anyone relies on the new value


class StepGuard:
    """Skip the optimizer step on *every* rank when any rank saw a non-finite loss or gradient, or a loss spike.

    The loop calls :meth:`begin_step` with the spike threshold and :meth:`add_loss` per micro-batch. The decision
    runs inside the optimizer step, so it covers ``engine.step`` and the pipeline engine's ``train_batch`` alike:
    under ZeRO 1/2 it replaces DeepSpeed's overflow check (DeepSpeed then skips the update, clears the gradients
    and counts ``engine.skipped_steps`` exactly as for an fp16 overflow); under ZeRO 0 it wraps the optimizer's
    ``step``. One all-reduce of 2 * world + 2 numbers per step tells every rank which ranks were bad.
    """

    def __init__(self, engine):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = engine.device
        self.begin_step(float("inf"))
        self.bad_loss_ranks: list[int] = []
        self.bad_grad_ranks: list[int] = []
        opt = engine.optimizer
        self.zero = hasattr(opt, "has_overflow_partitioned_grads_serial")
        if self.zero:  # DeepSpeed ZeRO 1/2
            opt.check_grad_overflow = True

            def check_overflow(partition_gradients=True):
                opt.overflow = self.decide(bool(opt.has_overflow_partitioned_grads_serial()))
            opt.check_overflow = check_overflow
        else:
            inner, params = opt.step, [p for g in opt.param_groups for p in g["params"]]

            def step(*args, **kwargs):
                grads = [p.grad for p in params if p.grad is not None]
                if self.decide(any(not torch.isfinite(g).all() for g in grads)):
                    return None  # the engine clears the gradients after the step as usual
                return inner(*args, **kwargs)
            opt.step = step

    def begin_step(self, spike_threshold: float) -> None:
        self.threshold, self.loss_bad, self.loss_sum, self.loss_count = spike_threshold, False, 0.0, 0
        self.skipped, self.spike = False, False

    def add_loss(self, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        self.loss_bad |= not math.isfinite(value)
        self.loss_sum, self.loss_count = self.loss_sum + value, self.loss_count + 1

    def decide(self, local_grad_bad: bool) -> bool:
        """Collective (all ranks, at the optimizer step): True = skip this update everywhere."""
        import torch.distributed as dist

        w = self.world
        vec = torch.zeros(2 * w + 2, dtype=torch.float64, device=self.device)
        vec[self.rank], vec[w + self.rank] = float(self.loss_bad), float(local_grad_bad)
        vec[-2], vec[-1] = (0.0 if self.loss_bad else self.loss_sum), self.loss_count
        dist.all_reduce(vec)
        flags = vec.tolist()
        self.bad_loss_ranks = [r for r in range(w) if flags[r]]
        self.bad_grad_ranks = [r for r in range(w) if flags[w + r]]
        mean = flags[-2] / flags[-1] if flags[-1] else float("nan")
        self.spike = not (self.bad_loss_ranks or self.bad_grad_ranks) and mean > self.threshold
        self.skipped = bool(self.bad_loss_ranks or self.bad_grad_ranks or self.spike)
        return self.skipped

    def reason(self) -> str:
        """Why the last step was skipped, naming the ranks."""
        if self.spike:
            return f"loss spike (mean loss above the threshold {self.threshold:.4f})"
        parts = [f"non-finite loss on rank(s) {self.bad_loss_ranks}"] if self.bad_loss_ranks else []
        if self.bad_grad_ranks:
            # Under ZeRO the check sees each rank's partition of the already-reduced gradients.
            parts.append(f"non-finite gradients on rank(s) {self.bad_grad_ranks} (ZeRO: in their partition of "
                         f"the reduced gradients)" if self.zero else
                         f"non-finite gradients on rank(s) {self.bad_grad_ranks} (after the all-reduce)")
        return "; ".join(parts) or "non-finite gradient norm (DeepSpeed's overflow check)"


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
            # torch.optim.AdamW: runs on CPU and GPU without building DeepSpeed's fused kernels. Its fused
            # (single-kernel) implementation is the faster step (bench/results.md, "Components vs the plain
            # PyTorch op").
            "torch_adam": True, "fused": True}},
        # ZeRO 1/2 reduce each gradient partition to its owner (DeepSpeed's default all-reduces the whole gradient
        # and keeps a slice: 2x the bytes of a reduce-scatter; bench/results.md, "Scale efficiency"). A user's
        # deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=true restores DeepSpeed's default.
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "use_multi_rank_bucket_allreduce": False},
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
    """``deepspeed.initialize`` for ``model`` on the layout ``topo``; returns the engine.

    With ``topo.pp > 1`` the model is cut into DeepSpeed pipeline stages (``parallel.pipeline``) and the engine is
    a ``PipelineEngine`` trained with 1F1B ``train_batch``.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, topo.dp_size, global_batch_size)
    groups = param_groups(model, cfg.optim.weight_decay)
    if topo.pp > 1:
        from parallel.pipeline import to_pipeline_module
        model = to_pipeline_module(model, topo, cfg)
        # No activation partitioning over TP: the activation tuple holds several tensors that need gradients.
        ds_config = deep_merge({"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}, ds_config)
        groups = param_groups(model, cfg.optim.weight_decay)  # this stage's parameters only
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           mpu=None if topo.pp > 1 else topo.deepspeed_mpu())
    keep_router_bias_fp32(engine.module)
    if topo.pp > 1 and engine.has_moe_layers:
        _checkpoint_through_layer_files(engine)
    if topo.pp > 1 and cfg.parallel.zero_stage >= 1:
        _grad_norm_over_stages(engine, topo)
    if cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32":
        _clip_with_exact_norm(engine, topo, cfg.optim.grad_clip)
    return engine


def _grad_norm_over_stages(engine, topo) -> None:
    """ZeRO 1 under pipeline parallelism: DeepSpeed all-reduces each optimizer group's gradient norm over the
    stage x TP ("model parallel") group, one collective per group, but stages differ in their groups (a stage with
    experts has a MoE group, a dense one does not) and the counts would not match (a hang). Each group's norm is
    reduced over the stage's TP group instead (it already skips TP-replicated copies on TP ranks > 0 and the tied
    embedding's replica), and the squared total once over the pipeline group."""
    import torch.distributed as dist

    opt = engine.optimizer
    if not hasattr(opt, "scaled_global_norm"):
        return
    tp_group = None
    if topo.tp > 1:
        from megatron.core.parallel_state import get_tensor_model_parallel_group
        tp_group = get_tensor_model_parallel_group()
    opt.model_parallel_group, opt.model_parallel_world_size = tp_group, topo.tp
    stage_norm = opt.scaled_global_norm

    def scaled_global_norm(norm_type=2):
        norm = stage_norm(norm_type).float()
        sq_and_bad = torch.stack([norm.clamp(min=0) ** 2, (norm < 0).float()])  # -1: DeepSpeed's invalid norm
        dist.all_reduce(sq_and_bad, group=topo.pp_group)
        return torch.where(sq_and_bad[1] > 0, torch.full_like(norm, -1.0), sq_and_bad[0].sqrt())
    opt.scaled_global_norm = scaled_global_norm


def _clip_with_exact_norm(engine, topo, max_norm: float) -> None:
    """ZeRO 0 in fp32: DeepSpeed clips with a norm averaged over data-parallel ranks, wrong with expert parallelism
    (see parallel/grad_norm.py); clip with the single-process norm instead and report it
    (``engine.get_global_grad_norm()``). Called by DeepSpeed at the optimizer step, also inside ``train_batch``."""
    from parallel.grad_norm import clip_by_global_norm

    def clip() -> None:
        engine._global_grad_norm = float(clip_by_global_norm(engine.module, topo, max_norm))
    engine.clip_fp32_gradients = clip


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every optimizer group (ZeRO exposes the wrapped optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


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

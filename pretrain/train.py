"""The pretraining loop on DeepSpeed: ``python -m pretrain.train --config PRESET_OR_YAML [section.key=value ...]``.

Runs under plain ``python`` (one process: a 1-process group is created here), ``torchrun -m`` and
``deepspeed --module``; gloo on CPU, NCCL on GPU. Data-parallel here; tensor/expert parallelism enters through
``parallel.parallelize_model`` and DeepSpeed's ``mpu``; with ``parallel.pp > 1`` the model is cut into DeepSpeed
pipeline stages and each step is one 1F1B ``engine.train_batch`` (``parallel.pipeline``).

One optimizer step (``train_step``): ``pretrain.loss.total_loss`` (lm + lambda * mean(mtp) + the alpha-weighted
balance terms, the same function in every layout) on each of this rank's micro-batches (DeepSpeed accumulates and
averages the gradients over micro-batches and data-parallel ranks); then, if the optimizer step was applied, the
expert-load counts summed over micro-batches and ranks move every replica's routers' bias by the same amount
(``pretrain.loss.balance_experts``), so the bias stays identical everywhere.

Seeds: the model is built after ``torch.manual_seed(train.seed)`` on every rank (identical initial weights);
afterwards rank r seeds python, numpy and torch with ``train.seed + r``. Checkpoints store every rank's RNG state.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.expert import sync_expert_grads
from pretrain import faults
from pretrain.checkpoint import (CheckpointError, TrainState, resume, save_checkpoint, wait_for_pending_save,
                                 write_run_files)
from pretrain.config import Config, ConfigError, load_config
from pretrain.engine import StepGuard, build_engine, exit_process, init_distributed, launcher_env, set_collective_timeout, set_lr
from pretrain.loss import LOSS_NAMES, LossWeights, balance_experts, dropped_tokens, total_loss
from pretrain.preflight import preflight
from pretrain.schedule import global_batch_at, loss_weights_at, lr_at, total_samples, total_steps


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    cfg: Config
    topo: object
    engine: object
    device: torch.device
    stream: object
    eval_dataset: object
    metrics: object
    preempt: object
    state: TrainState
    total_steps: int
    last_step: int
    guard: object = None
    eos_id: int | None = None  # document boundaries (data.reset_attention_at_eos)
    schedule_state: dict = field(default_factory=dict)
    stage0_grad_norm: float = float("nan")
    report_norm: bool = False  # DeepSpeed reports no norm (ZeRO 0, fp32, no clipping): the loop computes it
    consecutive_skips: int = 0
    timeout_key: str = "train.dist_timeout_s"  # the timeout in force, for the message of a timed-out collective
    objective: "Objective" = None  # what the loop optimises (pretraining: the language-model objective)


@dataclass
class StepResult:
    """Per-step values averaged over micro-batches and data-parallel ranks (identical on every rank)."""

    parts: dict  # Objective.names -> float (pretraining: loss, lm_loss, mtp_loss and each balance term)
    dropped_tokens: float  # token copies dropped over capacity, summed over micro-batches and ranks
    lr: float
    grad_norm: float
    tokens: int
    step_time_s: float
    expert_load: torch.Tensor  # (num_moe_layers, n_routed_experts), summed over micro-batches and ranks
    eval_loss: float | None = None
    skipped: bool = False  # the optimizer step was skipped on every rank (StepGuard)

    @property
    def loss(self) -> float:
        return self.parts["loss"]


# ------------------------------------------------------------------------------------------------ setup

def check_data_unchanged(state: TrainState, fingerprint: list) -> None:
    """Resuming on shards that differ from the ones the checkpoint was trained on would silently change the
    sample order: refuse, naming the first differing shard."""
    saved = state.data_fingerprint
    if state.step == 0 or not saved or saved == fingerprint:
        return
    for old, new in zip(saved + [None] * len(fingerprint), fingerprint + [None] * len(saved)):
        if old != new:
            name = (new or old)[0]
            raise ConfigError(f"data.paths: shard {name} differs from the one the checkpoint at step {state.step} "
                              f"was trained on (was {old}, now {new}); restore the original shards or start a new "
                              f"train.output_dir")


def install_fault_hooks(engine, state: TrainState, rank: int) -> None:
    """``PRETRAIN_FAULT=nan_expert_grad:STEP:RANK``: NaN in routed expert 0's gradient (tests only, pretrain.faults)."""
    if "nan_expert_grad" not in os.environ.get(faults.ENV, ""):
        return
    name, param = next((n, p) for n, p in engine.module.named_parameters() if ".experts." in n and p.ndim == 3)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if faults.active("nan_expert_grad", state.step + 1, rank):
            grad = grad.clone()
            grad[0] = float("nan")
        return grad
    param.register_hook(hook)
    print(f"[fault] rank {rank}: NaN gradients of {name}[0] per PRETRAIN_FAULT", file=sys.stderr, flush=True)


def build_data(cfg: Config, topo, state: TrainState, pin_memory: bool = False):
    """(training SampleStream positioned at the resume point, eval dataset or None); pinned batches on GPU."""
    from data_pipeline.dataset import SampleStream, build_dataset

    d, t = cfg.data, cfg.train
    train_ds = build_dataset(d.paths, d.weights, d.seq_length, t.seed, total_samples(cfg))
    stream = SampleStream(train_ds, topo.dp_rank, topo.dp_size, t.micro_batch_size,
                          consumed_samples=state.consumed_samples, pin_memory=pin_memory)
    eval_ds = None
    if d.eval_paths and t.eval_interval > 0:
        eval_ds = build_dataset(d.eval_paths, None, d.seq_length, t.seed, t.eval_iters * t.micro_batch_size * topo.dp_size)
    return stream, eval_ds


def build_model_for(cfg: Config, topo, objective: "Objective | None" = None):
    """The model with identical initial weights on every rank (``train.init_from``'s when set), parallelized for
    ``topo`` and finished by the objective (a reward model's value head, per-token log-probs)."""
    from parallel import parallelize_model
    from pretrain.checkpoint import load_init_weights
    from pretrain.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if cfg.train.init_from:  # a new phase: the weights only; a resumed run's checkpoint replaces them below
        load_init_weights(model, cfg)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    model = parallelize_model(model, topo, cfg)
    model = (objective or Objective()).prepare_model(model, cfg, topo)
    if cfg.train.compile == "blocks":
        model.compile_blocks()
    elif cfg.train.compile == "model":
        model.compile()
    return model


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class Objective:
    """What a training stage optimises, and on which data. Pretraining's is the language-model objective below;
    ``posttrain`` subclasses it (masked SFT, reward model, DPO, GRPO, PPO). Per micro-batch the loop calls
    ``batch(run, tokens)`` and ``loss(model, batch, weights) -> (loss, {name: detached scalar} for each of names, model
    output)`` = ``output_loss(forward(model, batch), batch, weights)``; under pipeline parallelism the last stage
    calls ``output_loss`` itself on its output and the batch's tensors (``parallel.pipeline``), so an objective that
    splits its loss into ``forward`` and ``output_loss`` runs in every layout. A part whose name holds a '/' is
    logged under that name (``rewards/chosen``), the others as ``train/<name>``."""

    names: tuple = LOSS_NAMES
    def preflight(self, cfg: Config, world_size: int, rank: int):
        if cfg.train.epochs is not None and cfg.train.steps is None and cfg.train.total_tokens is None:
            raise ConfigError("train.epochs is for posttrain.* (small datasets); pretraining is sized by "
                              "train.total_tokens or train.steps")
        return preflight(cfg, world_size, rank)

    def prepare_model(self, model, cfg: Config, topo):
        """The parallelized model, before the engine wraps it."""
        return model

    def build_data(self, cfg: Config, topo, state: TrainState, pin_memory: bool):
        return build_data(cfg, topo, state, pin_memory)

    def batch(self, run: "Run", tokens: torch.Tensor) -> dict:
        """A (mb, seq + 1) window -> the model's inputs on the device."""
        tokens = tokens.to(run.device, non_blocking=True)  # pinned on GPU: an async copy
        input_ids = tokens[:, :-1]
        return {"input_ids": input_ids, "labels": tokens[:, 1:], "document_ids": document_ids(run, input_ids)}

    def eval_batch(self, run: "Run", tokens: torch.Tensor) -> dict:
        """A held-out micro-batch -> the model's inputs (DPO: with the held-out reference log-probs)."""
        return self.batch(run, tokens)

    def forward(self, model, batch: dict):
        return model(batch["input_ids"], labels=batch["labels"], document_ids=batch.get("document_ids"))

    def output_loss(self, out, batch: dict, weights: LossWeights, carried: torch.Tensor | None = None):
        """The model output of ``batch`` -> (loss, {name: detached scalar} for each of ``names``). Also the last
        pipeline stage's loss (``parallel.pipeline``), where ``out`` holds the last stage's MoE terms and ``carried``
        the earlier stages' balance terms (detached: their gradient is the stages' own, ``_AuxLossGrad``)."""
        return total_loss(out, weights, carried)

    def loss(self, model, batch: dict, weights: LossWeights):
        out = self.forward(model, batch)
        loss, parts = self.output_loss(out, batch, weights)
        return loss, parts, out

    def step_tokens(self, padded: int) -> int:
        """Tokens the step trained, for ``train/tokens_per_sec`` and MFU; ``padded`` = global batch x seq_length
        (pretraining's windows are full; GRPO's rows are prompt + response, cut before the padding)."""
        return padded

    def finish_parts(self, parts: dict) -> None:
        """Complete the step's logged parts (every rank, after the step) with what the loss could not see: under
        pipeline parallelism GRPO's route flips, counted on every stage."""

    def before_checkpoint(self, step: int) -> None:
        """Save what the objective trains outside ``engine`` (PPO's critic) for the checkpoint of ``step``, before
        that checkpoint is published; ``build_data`` (after the resume) restores it for ``state.step``."""

    def attach(self, engine, topo) -> None:
        """Called once the engine is built (before the resume): ``engine.module`` is the model, or with
        ``parallel.pp`` > 1 the ``DeepSeekPipeline`` whose ``stage`` is this rank's part of it."""

    def output_eval_loss(self, out, batch: dict) -> torch.Tensor:
        """The held-out value ``maybe_eval`` averages (``eval/loss``): the main head's loss (no MTP, no balance)."""
        return out.lm_loss

    def eval_loss(self, model, batch: dict) -> torch.Tensor:
        return self.output_eval_loss(self.forward(model, batch), batch)


def check_pipeline_support(cfg: Config, objective: Objective) -> None:
    """Under parallel.pp > 1 the last stage calls ``output_loss``, never ``loss``: an objective that overrides only
    ``loss`` would train the language-model loss there instead of its own."""
    cls = type(objective)
    if cfg.parallel.pp > 1 and cls.loss is not Objective.loss and cls.output_loss is Objective.output_loss:
        raise ConfigError(f"parallel.pp={cfg.parallel.pp}: {cls.__name__} overrides loss() but not output_loss(), "
                          f"which the last pipeline stage calls; split it into forward() + output_loss(), or use "
                          f"parallel.pp=1")


def setup(cfg: Config, objective: Objective | None = None) -> Run:
    """Validate, start the process group, build model/engine/data/metrics, resume if a checkpoint exists."""
    from parallel import initialize_parallel
    from pretrain.info import flops_per_token
    from pretrain.metrics import MetricsLogger
    from pretrain.preemption import PreemptionHandler

    objective = objective or Objective()
    rank, local_rank, world_size = launcher_env()
    # Everything a user can get wrong is checked before any process group work (pretrain.preflight).
    check_pipeline_support(cfg, objective)
    checked = objective.preflight(cfg, world_size, rank)
    topo, fingerprint, tokenizer = checked.topo, checked.fingerprint, checked.tokenizer

    device = init_distributed(local_rank, cfg.train.dist_timeout_s)
    if not topo.is_trivial:  # megatron-core groups; pure data parallelism needs only the world group (and
        initialize_parallel(topo)  # skipping megatron-core's import saves ~5 s of start-up per process)
    engine = build_engine(build_model_for(cfg, topo, objective), cfg, topo, global_batch_at(0, cfg))
    objective.attach(engine, topo)
    set_collective_timeout(cfg.train.dist_timeout_s)  # also the groups megatron-core and DeepSpeed created
    guard = StepGuard(engine)
    state = resume(engine, cfg)
    check_data_unchanged(state, fingerprint)
    state.data_fingerprint = fingerprint
    install_fault_hooks(engine, state, rank)
    if state.step == 0:  # on resume the checkpoint restored every rank's RNG state instead
        seed_rank(cfg.train.seed, rank)
    run_dir = Path(cfg.train.output_dir)
    if rank == 0:
        write_run_files(cfg, run_dir, tokenizer)
        truncate_metrics_log(run_dir, state.step)
    if global_batch_at(state.tokens_seen, cfg) != engine.train_batch_size():
        engine.set_train_batch_size(global_batch_at(state.tokens_seen, cfg))
    stream, eval_ds = objective.build_data(cfg, topo, state, pin_memory=device.type == "cuda")
    steps = total_steps(cfg)
    metrics = MetricsLogger(run_dir, enabled=rank == 0, peak_flops=cfg.train.peak_flops,
                            flops_per_token=flops_per_token(cfg.model, cfg.data.seq_length, include_mtp=True),
                            total_steps=steps, num_devices=world_size, initial_tokens=state.tokens_seen,
                            log_interval=cfg.train.log_interval)
    preempt = PreemptionHandler(cfg.train.preemption_signals).install()
    last = min(steps, cfg.train.exit_at_step) if cfg.train.exit_at_step else steps
    report_norm = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32" and not cfg.optim.grad_clip
    return Run(cfg, topo, engine, device, stream, eval_ds, metrics, preempt, state, steps, last, guard,
               eos_id=checked.eos_id, report_norm=report_norm, objective=objective)


# ------------------------------------------------------------------------------------------------- step

def dp_sum(tensor: torch.Tensor, topo) -> torch.Tensor:
    """In-place sum over the data-parallel group (the world group for a trivial layout); the tensor itself without
    a process group or with one data-parallel rank."""
    if dist.is_initialized() and topo.dp_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=None if topo.is_trivial else topo.dp_group)
    return tensor


def _grad_norm(run: Run) -> float:
    """The single-process gradient norm (``parallel.grad_norm``), for ZeRO stage 0 in fp32 without clipping, where
    nobody computes it (pretrain.engine clips ZeRO-0 fp32 with it; the bf16 and ZeRO optimizers report theirs). Called after the boundary backward (gradients already all-reduced) and before
    ``engine.step`` clips them."""
    from parallel.grad_norm import global_grad_norm
    return float(global_grad_norm(run.engine.module, run.topo))


def document_ids(run: Run, input_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) document ids for ``data.reset_attention_at_eos`` (each document ends with the tokenizer's eos), else
    None (the window is one sequence, as DeepSeek-V3 pretrains)."""
    from data_pipeline.dataset import document_boundaries

    return document_boundaries(input_ids, run.eos_id) if run.cfg.data.reset_attention_at_eos else None


def _forward_backward(run: Run, micro_batches: list, weights: LossWeights):
    """Forward/backward over this rank's micro-batches and the optimizer step (plain, TP and EP layouts).

    Returns (the objective's parts (``Objective.names``) averaged over micro-batches and data-parallel ranks, dropped token copies and
    the expert load (L, E), both summed over micro-batches and data-parallel ranks).
    """
    engine, step, rank = run.engine, run.state.step + 1, dist.get_rank()
    names = run.objective.names
    sums = torch.zeros(len(names) + 1, device=run.device)  # the parts, then dropped tokens
    load = None
    for i, tokens in enumerate(micro_batches):
        # DeepSpeed's own boundary is (micro_steps + 1) % accumulation_steps: wrong once a batch-size ramp changes
        # the accumulation steps after a number of micro-steps that is not a multiple of the new value (and after
        # a resume, which restarts micro_steps at 0). The last micro-batch of this step is the boundary.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        # TP-split experts: their weight gradients cross TP at the boundary only (under ZeRO-2, which takes .grad
        # every micro-batch, each micro-batch's are reduce-scattered into a per-rank shard, gathered at the boundary)
        sync_expert_grads(engine.module, i == len(micro_batches) - 1, shard=run.cfg.parallel.zero_stage >= 2)
        loss, parts, out = run.objective.loss(engine, run.objective.batch(run, tokens), weights)
        for kind, factor in (("nan_loss", float("nan")), ("inf_loss", float("inf")), ("spike_loss", 100.0)):
            if faults.active(kind, step, rank):  # tests only (pretrain.faults)
                loss = loss * factor
        parts["loss"] = loss.detach()
        run.guard.add_loss(loss)
        engine.backward(loss)
        if run.report_norm and engine.is_gradient_accumulation_boundary():
            run.stage0_grad_norm = _grad_norm(run)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        sums[:-1] += torch.stack([parts[n].reshape(()).float() for n in names]).to(run.device)
        sums[-1] += dropped_tokens(out)
        load = out.expert_load.detach().float() if load is None else load + out.expert_load.detach().float()
    # Losses for logging: mean over micro-batches and data-parallel ranks. Expert load: sum over both, so every
    # replica applies the same bias update.
    sums = dp_sum(sums, run.topo)
    means = sums[:-1] / (len(micro_batches) * run.topo.dp_size)
    return means, float(sums[-1]), dp_sum(load, run.topo)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step over this rank's share of the global batch; updates ``run.state``."""
    cfg, engine, st = run.cfg, run.engine, run.state
    global_batch = global_batch_at(st.tokens_seen, cfg)
    if global_batch != engine.train_batch_size():  # batch-size ramp-up: DeepSpeed changes the accumulation steps
        engine.set_train_batch_size(global_batch)
    lr = lr_at(step, st.tokens_seen, cfg)
    mtp_weight, gamma = loss_weights_at(st.tokens_seen, cfg)
    set_lr(engine, lr)
    run.guard.begin_step(spike_threshold(run.cfg, st.loss_window))
    skipped_before = engine.skipped_steps
    if faults.active("hang", step, dist.get_rank()):  # tests only: this rank stops before the step's collectives
        time.sleep(1e9)
    start = time.perf_counter()
    micro_batches = run.stream.next_batch(global_batch)
    weights = LossWeights.at(cfg, mtp_weight)
    if run.topo.pp > 1:  # every stage draws the batch; the first and last stages read it
        from parallel.pipeline import pipeline_train_batch
        means, dropped, load = pipeline_train_batch(engine, micro_batches, weights,
                                                    lambda rows: run.objective.batch(run, rows), run.device,
                                                    run.objective)
        model, rows = engine.module.stage, engine.module.stage.moe_rows
    else:
        means, dropped, load = _forward_backward(run, micro_batches, weights)
        model, rows = engine.module, None
    # DeepSpeed's own overflow check (ZeRO, non-finite norm) may skip even when the guard saw nothing.
    skipped = run.guard.skipped or engine.skipped_steps > skipped_before
    balance_experts(model, load, gamma, applied=not skipped, rows=rows)
    st.step, st.consumed_samples = step, run.stream.consumed_samples
    st.tokens_seen += global_batch * cfg.data.seq_length
    run.schedule_state = {"lr": lr, "mtp_weight": mtp_weight, "bias_update_speed": gamma,
                          "global_batch_size": global_batch}
    grad_norm = engine.get_global_grad_norm()
    grad_norm = run.stage0_grad_norm if grad_norm is None else grad_norm
    parts = dict(zip(run.objective.names, means.tolist()))
    run.objective.finish_parts(parts)
    return StepResult(parts, dropped, lr, float("nan") if grad_norm is None else float(grad_norm),
                      run.objective.step_tokens(global_batch * cfg.data.seq_length), time.perf_counter() - start,
                      load.cpu(), skipped=skipped)


def spike_threshold(cfg: Config, window: list) -> float:
    """mean + k * std of the loss window once it is full (``train.loss_spike_sigma``); inf = no spike check."""
    t = cfg.train
    if not t.loss_spike_sigma or len(window) < t.loss_spike_window:
        return float("inf")
    values = np.asarray(window, dtype=np.float64)
    return float(values.mean() + t.loss_spike_sigma * values.std())


class TrainingAborted(RuntimeError):
    """The run cannot continue (repeated non-finite steps, a collective timeout); the message says why."""


def account_skip(run: Run, step: int, r: StepResult) -> None:
    """Count skipped steps, keep the loss-spike window, abort after ``train.max_skipped_steps`` in a row."""
    st, t = run.state, run.cfg.train
    if not r.skipped:
        run.consecutive_skips = 0
        if t.loss_spike_sigma:
            st.loss_window = (st.loss_window + [r.loss])[-t.loss_spike_window:]
        return
    st.skipped_steps += 1
    run.consecutive_skips += 1
    reason = run.guard.reason()
    if dist.get_rank() == 0:
        print(f"[train] step {step}: optimizer step skipped on every rank: {reason}", file=sys.stderr, flush=True)
    if run.consecutive_skips >= t.max_skipped_steps:
        raise TrainingAborted(f"step {step}: {run.consecutive_skips} consecutive optimizer steps skipped "
                              f"(train.max_skipped_steps={t.max_skipped_steps}), last: {reason}; nothing was saved "
                              f"after the last good checkpoint: lower optim.lr or check the data, then resume")


# ------------------------------------------------------------------------------------- eval, log, checkpoint

@torch.no_grad()
def maybe_eval(run: Run, step: int) -> float | None:
    """Mean held-out ``Objective.eval_loss`` (pretraining, SFT: the main head's ``lm_loss``) over ``train.eval_iters``
    micro-batches per rank, every ``train.eval_interval``."""
    from data_pipeline.dataset import SampleStream

    t = run.cfg.train
    if run.eval_dataset is None or step % t.eval_interval:
        return None
    stream = SampleStream(run.eval_dataset, run.topo.dp_rank, run.topo.dp_size, t.micro_batch_size)
    micro_batches = stream.next_batch(t.eval_iters * t.micro_batch_size * run.topo.dp_size)
    if run.topo.pp > 1:
        from parallel.pipeline import pipeline_eval_loss
        return pipeline_eval_loss(run.engine, micro_batches, lambda rows: run.objective.eval_batch(run, rows),
                                  run.objective)
    model = run.engine.module
    model.eval()
    total = torch.zeros(1, device=run.device)
    for rows in micro_batches:
        total += run.objective.eval_loss(model, run.objective.eval_batch(run, rows)).float()
    model.train()
    return (dp_sum(total, run.topo) / (t.eval_iters * run.topo.dp_size)).item()


def maybe_log(run: Run, step: int, r: StepResult) -> None:
    """TensorBoard + console every ``log_interval`` (MetricsLogger decides), heatmap, metrics.jsonl every step."""
    from pretrain.metrics import load_max_violation

    t, m = run.cfg.train, run.metrics
    scalars = {**{name if "/" in name else f"train/{name}": value for name, value in r.parts.items()},
               "train/lr": r.lr,
               "train/grad_norm": r.grad_norm, "train/mtp_weight": run.schedule_state["mtp_weight"],
               "moe/bias_update_speed": run.schedule_state["bias_update_speed"],
               "train/skipped_steps": run.state.skipped_steps}
    m.log_step(step, scalars, r.tokens, r.step_time_s)
    if r.expert_load.numel():
        if step % t.heatmap_interval == 0 or step == 1:
            m.log_expert_load(step, r.expert_load)
        elif step % t.log_interval == 0:
            m.log_scalar("moe/load_max_violation", load_max_violation(r.expert_load), step)
        if step % t.log_interval == 0 or step == 1:
            m.log_scalar("moe/dropped_tokens", r.dropped_tokens, step)
    if r.eval_loss is not None:
        m.log_scalar("eval/loss", r.eval_loss, step)
    if dist.get_rank() == 0:
        record = {"step": step, **r.parts, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": run.state.tokens_seen,
                  "skipped": r.skipped}
        if r.eval_loss is not None:
            record["eval_loss"] = r.eval_loss
        with open(Path(t.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_metrics_log(run_dir: Path, resumed_step: int) -> None:
    """Drop metrics.jsonl records after the resume point (steps that will be trained again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(line + "\n" for line in keep))


def maybe_checkpoint(run: Run, step: int, force: bool) -> None:
    if force or step % run.cfg.train.save_interval == 0:
        run.objective.before_checkpoint(step)
        save_checkpoint(run.engine, run.cfg, run.state, run.schedule_state)
    if force:  # the last step or a preemption: the process exits next, so an async save must finish first
        wait_for_pending_save()


# ------------------------------------------------------------------------------------------------- loop

def train(cfg: Config, objective: Objective | None = None) -> None:
    run = setup(cfg, objective)
    run.timeout_key = f"train.dist_timeout_s={cfg.train.dist_timeout_s}"
    if run.state.step >= run.last_step:
        print(f"[train] {cfg.train.output_dir} is already at step {run.state.step}; nothing to do", flush=True)
    first = run.state.step + 1
    try:
        for step in range(first, run.last_step + 1):
            with collective_failures(run, step):
                stop = train_one(run, step)
            if step == first and cfg.train.step_timeout_s:  # start-up and first step (compilation) are done
                set_collective_timeout(cfg.train.step_timeout_s)
                run.timeout_key = f"train.step_timeout_s={cfg.train.step_timeout_s}"
            if stop:
                break
    finally:
        run.metrics.close()  # TensorBoard events are flushed also when the run aborts


def train_one(run: Run, step: int) -> bool:
    """Step, skip accounting, eval, log, checkpoint; True when preempted (every rank agrees)."""
    from pretrain.metrics import log_memory_split, log_peak_memory

    if step == run.cfg.train.profile_step:  # counters of this one step (pretrain/profiling.py)
        from pretrain.profiling import StepProfiler, write_profile
        with StepProfiler(run.engine) as profile:
            result = train_step(run, step)
        counters = profile.result()
        write_profile(counters, run.cfg.train.output_dir, step, dist.get_rank())
        log_memory_split(run.metrics, step, counters)
    else:
        result = train_step(run, step)
    log_peak_memory(run.metrics, step, run.device)  # the first steps: max over ranks (pretrain/metrics.py)
    account_skip(run, step, result)
    result.eval_loss = maybe_eval(run, step)
    maybe_log(run, step, result)
    stop = run.preempt.should_stop()  # collective: all ranks agree
    maybe_checkpoint(run, step, force=stop or step == run.last_step)
    return stop


# gloo / NCCL wording of a collective that lost a peer or ran out of time
_COMM_FAILURE = ("timed out", "timeout", "connection reset", "connection closed", "remote worker", "nccl error")


@contextlib.contextmanager
def collective_failures(run: Run, step: int):
    """A collective that timed out or lost a peer becomes one line naming the step, the rank and the timeout."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeError / DistBackendError
        text = str(e).lower()
        if isinstance(e, (TrainingAborted, CheckpointError)) or not any(k in text for k in _COMM_FAILURE):
            raise
        what = (f"a collective did not complete within {run.timeout_key}: another rank hung or died"
                if "time" in text else "a collective lost its peer: another rank died")
        raise TrainingAborted(f"step {step}, rank {dist.get_rank()}: {what} ({str(e).splitlines()[0][:160]}); "
                              f"resume from `latest` once the cause is fixed") from None


def parse_args(argv: list[str] | None, prog: str = "python -m pretrain.train") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="preset name (e.g. tiny, small-moe) or a YAML path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    return p.parse_args(argv)


def _print_error(e: Exception) -> None:
    # One write per line: every rank prints its error to the same pipe, and print()'s separate writes of the
    # message and the newline can interleave between processes.
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None, objective: Objective | None = None, prog: str = "python -m pretrain.train"
         ) -> int:
    """The command line of ``pretrain.train`` and of ``posttrain.*`` (which pass their objective)."""
    from data_pipeline.readers import DataError

    args = parse_args(argv, prog)
    try:
        train(load_config(args.config, args.overrides), objective)
    except (ConfigError, FileNotFoundError, DataError) as e:
        _print_error(e)
        return 2
    except (CheckpointError, TrainingAborted) as e:
        _print_error(e)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())  # checkpoints, metrics.jsonl and TensorBoard are closed by now

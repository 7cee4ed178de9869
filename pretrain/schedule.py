"""Learning rate and batch size as pure functions of (step, tokens seen).

Conventions (used by the training loop and the tests):

- ``step`` is the 1-based number of the optimizer step about to be taken (the TensorBoard x-axis);
  ``tokens_seen`` is the number of training tokens consumed *before* that step. A sample contributes
  ``data.seq_length`` tokens (the labels), not ``seq_length + 1``.
- Warmup is counted in steps (``schedule.warmup_steps``): ``lr = optim.lr * step / warmup_steps`` for
  ``step <= warmup_steps``. Everything after warmup is defined on tokens, as a fraction of the run's total
  tokens, so that a batch-size ramp-up does not shift the decay points.
- ``multi_step`` (DeepSeek LLM): constant peak, then ``decay_factors[i] * peak`` from
  ``decay_points[i] * total_tokens`` tokens seen on.
- ``cosine``: from the peak at the end of warmup to ``min_lr_ratio * peak`` at ``total_tokens``.
- ``wsd``: constant peak, then a linear decay to ``min_lr_ratio * peak`` over the last
  ``wsd_decay_fraction`` of the tokens.
- Batch-size ramp-up (``train.batch_size_rampup = [[tokens, global_batch_size], ...]``): the global batch
  in force once ``tokens`` tokens have been seen (before the first entry, the first entry's size). The
  last entry must equal ``train.global_batch_size``. Steps and tokens convert exactly through
  ``tokens_at_step`` / ``steps_for_tokens``, which walk the ramp segment by segment (no per-step loop).
"""
from __future__ import annotations

import math

from pretrain.config import Config, ConfigError, step_value_at


def global_batch_at(tokens_seen: float, cfg: Config) -> int:
    """Global batch size (sequences per optimizer step) in force after ``tokens_seen`` tokens."""
    ramp = cfg.train.batch_size_rampup
    if not ramp:
        return cfg.train.global_batch_size
    return int(step_value_at(ramp, tokens_seen))


def _segments(cfg: Config) -> list[tuple[float, int]]:
    """Ramp segments as (start_tokens, global_batch) in increasing token order; one segment without a ramp."""
    ramp = cfg.train.batch_size_rampup
    if not ramp:
        return [(0.0, cfg.train.global_batch_size)]
    segs = [(0.0, int(ramp[0][1]))] + [(float(t), int(b)) for t, b in ramp if float(t) > 0]
    return segs


def tokens_at_step(num_steps: int, cfg: Config) -> int:
    """Tokens consumed by the first ``num_steps`` optimizer steps (exact, including the ramp-up)."""
    seq = cfg.data.seq_length
    tokens, steps_left = 0, num_steps
    segs = _segments(cfg)
    for i, (_, batch) in enumerate(segs):
        per_step = batch * seq
        if i + 1 < len(segs):
            # Steps taken in this segment: until tokens_seen reaches the next segment's start.
            in_seg = max(0, math.ceil((segs[i + 1][0] - tokens) / per_step))
            take = min(in_seg, steps_left)
        else:
            take = steps_left
        tokens += take * per_step
        steps_left -= take
        if steps_left == 0:
            break
    return tokens


def steps_for_tokens(total_tokens: float, cfg: Config) -> int:
    """Smallest number of optimizer steps whose tokens reach ``total_tokens``."""
    seq = cfg.data.seq_length
    tokens, steps = 0, 0
    segs = _segments(cfg)
    for i, (_, batch) in enumerate(segs):
        per_step = batch * seq
        end = min(segs[i + 1][0], total_tokens) if i + 1 < len(segs) else total_tokens
        take = max(0, math.ceil((end - tokens) / per_step))
        tokens += take * per_step
        steps += take
        if tokens >= total_tokens:
            break
    return steps


def total_steps(cfg: Config) -> int:
    """Optimizer steps in the run: ``train.steps``, or enough steps to reach ``train.total_tokens``."""
    if cfg.train.total_tokens is not None:
        return steps_for_tokens(cfg.train.total_tokens, cfg)
    return cfg.train.steps


def total_tokens(cfg: Config) -> int:
    """Tokens the schedule is defined on: ``train.total_tokens``, or the tokens of ``train.steps`` steps."""
    if cfg.train.total_tokens is not None:
        return cfg.train.total_tokens
    return tokens_at_step(cfg.train.steps, cfg)


def total_samples(cfg: Config) -> int:
    """Sequences the run consumes (sizes the data sample stream)."""
    return tokens_at_step(total_steps(cfg), cfg) // cfg.data.seq_length


def validate_schedule(cfg: Config, dp_size: int) -> None:
    """Checks that need the data-parallel size: every batch splits into whole micro-batches per rank."""
    unit = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % unit:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x data-parallel size = {cfg.train.micro_batch_size} x {dp_size}")
    ramp = cfg.train.batch_size_rampup
    if not ramp:
        return
    ok = all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ramp)
    if not ok or [float(p[0]) for p in ramp] != sorted(float(p[0]) for p in ramp):
        raise ConfigError(f"train.batch_size_rampup={ramp!r}: expected [[tokens, global_batch_size], ...] "
                          f"with increasing token counts")
    for t, b in ramp:
        if int(b) <= 0 or int(b) % unit:
            raise ConfigError(f"train.batch_size_rampup: batch {b} at {t} tokens is not a positive multiple of "
                              f"train.micro_batch_size x data-parallel size = {unit}")
    if int(ramp[-1][1]) != cfg.train.global_batch_size:
        raise ConfigError(f"train.batch_size_rampup ends at batch {ramp[-1][1]} but train.global_batch_size="
                          f"{cfg.train.global_batch_size}; make the last entry the global batch size")


def lr_at(step: int, tokens_seen: float, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (1-based) after ``tokens_seen`` tokens (see module doc)."""
    peak, s = cfg.optim.lr, cfg.schedule
    if step <= s.warmup_steps:
        return peak * step / s.warmup_steps
    total = total_tokens(cfg)
    if s.name == "multi_step":
        factor = 1.0
        for point, f in zip(s.decay_points, s.decay_factors):
            if tokens_seen >= point * total:
                factor = float(f)
        return peak * factor
    floor = s.min_lr_ratio * peak
    if s.name == "cosine":
        start = tokens_at_step(s.warmup_steps, cfg)
        progress = min(1.0, max(0.0, (tokens_seen - start) / max(1.0, total - start)))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if s.name == "wsd":
        decay_start = (1.0 - s.wsd_decay_fraction) * total
        if tokens_seen < decay_start:
            return peak
        progress = min(1.0, (tokens_seen - decay_start) / (total - decay_start))
        return peak + (floor - peak) * progress
    raise ConfigError(f"schedule.name={s.name!r}: use multi_step, cosine or wsd")


def loss_weights_at(tokens_seen: float, cfg: Config) -> tuple[float, float]:
    """(MTP lambda, expert-bias gamma) in force after ``tokens_seen`` tokens (constant or step changes)."""
    return step_value_at(cfg.mtp.loss_weight, tokens_seen), step_value_at(cfg.moe.bias_update_speed, tokens_seen)

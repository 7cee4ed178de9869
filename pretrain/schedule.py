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
- ``piecewise`` (V3): ``schedule.phases`` after the warmup, each ``{until_tokens, shape, lr_end}`` with shape
  constant, cosine or linear (see ``ScheduleConfig.phases``); ``constant``: the peak after the warmup.
- Batch-size ramp-up, step changes (``train.batch_size_rampup = [[tokens, global_batch_size], ...]``): the global
  batch in force once ``tokens`` tokens have been seen (before the first entry, the first entry's size). The
  last entry must equal ``train.global_batch_size``.
- Gradual batch ramp (Megatron's ``rampup_batch_size``; V2, V3): ``batch(t) = start + floor((end - start) * t / T
  / u) * u`` for ``t`` tokens seen, ``start = train.batch_ramp_start``, ``end = train.global_batch_size``,
  ``T = train.batch_ramp_tokens``, ``u = train.batch_ramp_increment``. The papers state no increment, so it
  defaults to the smallest one every layout can split into whole micro-batches, ``micro_batch_size x dp``. ``dp``
  is known only when the run starts: :func:`validate_schedule` (called by the loop before the first batch) writes
  it into ``cfg.train.batch_ramp_increment``, so ``global_batch_at(tokens, cfg)`` keeps its signature and the
  resolved ``config.yaml`` records the increment the run used. Before that (``pretrain.info``, tests) a null
  increment means ``micro_batch_size`` (dp = 1).
- Steps and tokens convert exactly through ``tokens_at_step`` / ``steps_for_tokens``, which walk the ramp
  segment by segment (no per-step loop; V3's ramp at u = 1 has 12,288 segments, a few ms).
"""
from __future__ import annotations

import math

from pretrain.config import Config, ConfigError, step_value_at


def _ramp_increment(cfg: Config) -> int:
    return cfg.train.batch_ramp_increment or cfg.train.micro_batch_size


def global_batch_at(tokens_seen: float, cfg: Config) -> int:
    """Global batch size (sequences per optimizer step) in force after ``tokens_seen`` tokens."""
    t = cfg.train
    if t.batch_ramp_start is not None:
        u, span = _ramp_increment(cfg), t.global_batch_size - t.batch_ramp_start
        increments = int((span * tokens_seen) // (t.batch_ramp_tokens * u))  # exact integer floor for int tokens
        return min(t.global_batch_size, t.batch_ramp_start + increments * u)
    if not t.batch_size_rampup:
        return t.global_batch_size
    return int(step_value_at(t.batch_size_rampup, tokens_seen))


class _GradualRampSegments:
    """The gradual ramp's segments, computed on access (V3 at u = 1 has 12,289; the walks visit only a few)."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.u, self.span = _ramp_increment(cfg), t.global_batch_size - t.batch_ramp_start
        self.start, self.end, self.ramp_tokens = t.batch_ramp_start, t.global_batch_size, t.batch_ramp_tokens

    def __len__(self) -> int:
        return -(-self.span // self.u) + 1

    def __getitem__(self, k: int) -> tuple[int, int]:
        # Increment k is in force from the first integer token count where (end - start) * tokens >= k * T * u.
        return -(-k * self.ramp_tokens * self.u // self.span), min(self.end, self.start + k * self.u)


def _segments(cfg: Config):
    """Ramp segments as (start_tokens, global_batch) in increasing token order; one segment without a ramp."""
    t = cfg.train
    if t.batch_ramp_start is not None and t.batch_ramp_start < t.global_batch_size:
        return _GradualRampSegments(cfg)
    if t.batch_ramp_start is not None:
        return [(0, t.global_batch_size)]
    ramp = t.batch_size_rampup
    if not ramp:
        return [(0, t.global_batch_size)]
    return [(0, int(ramp[0][1]))] + [(float(tok), int(b)) for tok, b in ramp if float(tok) > 0]


def tokens_at_steps(steps: list[int], cfg: Config) -> list[int]:
    """Tokens consumed by the first ``n`` optimizer steps for each ``n`` of ascending ``steps`` (exact, including
    the ramp-up), in one walk over the ramp's segments."""
    seq, segs = cfg.data.seq_length, _segments(cfg)
    out, tokens, taken, i = [], 0, 0, 0
    for n in steps:
        while i + 1 < len(segs):
            # Steps taken in segment i: until tokens_seen reaches the next segment's start.
            in_seg = max(0, math.ceil((segs[i + 1][0] - tokens) / (segs[i][1] * seq)))
            if taken + in_seg > n:
                break
            tokens, taken, i = tokens + in_seg * segs[i][1] * seq, taken + in_seg, i + 1
        out.append(tokens + (n - taken) * segs[i][1] * seq)
    return out


def tokens_at_step(num_steps: int, cfg: Config) -> int:
    """Tokens consumed by the first ``num_steps`` optimizer steps (exact, including the ramp-up)."""
    return tokens_at_steps([num_steps], cfg)[0]


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
    if cfg.train.batch_ramp_start is not None:
        _validate_gradual_ramp(cfg, unit)
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


def _validate_gradual_ramp(cfg: Config, unit: int) -> None:
    """Fill in the default increment (micro batch x dp) and check that every batch of the ramp splits evenly."""
    t = cfg.train
    if t.batch_ramp_increment is None:
        t.batch_ramp_increment = unit  # recorded in the resolved config; see the module doc
    u = t.batch_ramp_increment
    if u % unit:
        raise ConfigError(f"train.batch_ramp_increment={u} is not a multiple of train.micro_batch_size x "
                          f"data-parallel size = {unit}; use a multiple or null")
    if t.batch_ramp_start % u or t.global_batch_size % u:
        raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} and train.global_batch_size="
                          f"{t.global_batch_size} must be multiples of the ramp increment {u} "
                          f"(train.batch_ramp_increment, default micro batch x dp)")


def _interpolate(shape: str, lr_from: float, lr_to: float, progress: float) -> float:
    """LR at ``progress`` in [0, 1] of a decay from ``lr_from`` to ``lr_to`` (cosine: half a cosine period)."""
    progress = min(1.0, max(0.0, progress))
    if shape == "cosine":
        return lr_to + (lr_from - lr_to) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr_from + (lr_to - lr_from) * progress  # linear


def _piecewise_lr(tokens_seen: float, cfg: Config) -> float:
    """schedule.phases (validated by pretrain.config): the phase holding ``tokens_seen``, interpolated."""
    lr, start = cfg.optim.lr, None  # None: the end of the warmup, walked only when a decay needs it
    for phase in cfg.schedule.phases:
        end = phase["until_tokens"] if phase["until_tokens"] is not None else total_tokens(cfg)
        lr_end = lr if phase["lr_end"] is None else phase["lr_end"]
        if tokens_seen < end:
            if phase["shape"] == "constant":
                return lr_end
            start = tokens_at_step(cfg.schedule.warmup_steps, cfg) if start is None else start
            return _interpolate(phase["shape"], lr, lr_end, (tokens_seen - start) / max(1.0, end - start))
        lr, start = lr_end, end
    return lr


def lr_at(step: int, tokens_seen: float, cfg: Config) -> float:
    """Learning rate for optimizer step ``step`` (1-based) after ``tokens_seen`` tokens (see module doc)."""
    peak, s = cfg.optim.lr, cfg.schedule
    if step <= s.warmup_steps:
        return peak * step / s.warmup_steps
    if s.name == "constant":
        return peak
    if s.name == "piecewise":
        return _piecewise_lr(tokens_seen, cfg)
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
        return _interpolate("cosine", peak, floor, (tokens_seen - start) / max(1.0, total - start))
    if s.name == "wsd":
        decay_start = (1.0 - s.wsd_decay_fraction) * total
        return _interpolate("linear", peak, floor, (tokens_seen - decay_start) / (total - decay_start))
    raise ConfigError(f"schedule.name={s.name!r}: use multi_step, cosine, wsd, piecewise or constant")


def loss_weights_at(tokens_seen: float, cfg: Config) -> tuple[float, float]:
    """(MTP lambda, expert-bias gamma) in force after ``tokens_seen`` tokens (constant or step changes)."""
    return step_value_at(cfg.mtp.loss_weight, tokens_seen), step_value_at(cfg.moe.bias_update_speed, tokens_seen)


# ------------------------------------------------------------------------------------- the recipe, phase by phase

def _token_breakpoints(cfg: Config) -> set[float]:
    """Token counts where the LR shape, the batch ramp, lambda or gamma change (warmup excluded: it is by steps)."""
    s, t, total = cfg.schedule, cfg.train, total_tokens(cfg)
    points = {0.0}
    if s.name == "multi_step":
        points |= {p * total for p in s.decay_points}
    elif s.name == "wsd":
        points.add((1.0 - s.wsd_decay_fraction) * total)
    elif s.name == "piecewise":
        points |= {ph["until_tokens"] for ph in s.phases if ph["until_tokens"] is not None}
    if t.batch_ramp_start is not None:
        points.add(t.batch_ramp_tokens)
    points |= {float(tok) for tok, _ in t.batch_size_rampup or []}
    for spec in (cfg.mtp.loss_weight, cfg.moe.bias_update_speed):
        if not isinstance(spec, (int, float)):
            points |= {float(tok) for tok, _ in spec}
    return {p for p in points if p < total}


def _lr_shape(step: int, tokens_seen: float, cfg: Config) -> str:
    s = cfg.schedule
    if step <= s.warmup_steps:
        return "warmup"
    if s.name == "piecewise":
        for ph in s.phases:
            if ph["until_tokens"] is None or tokens_seen < ph["until_tokens"]:
                return ph["shape"]
        return "constant"
    if s.name == "wsd":
        return "linear" if tokens_seen >= (1.0 - s.wsd_decay_fraction) * total_tokens(cfg) else "constant"
    return "cosine" if s.name == "cosine" else "constant"


def schedule_phases(cfg: Config) -> list[dict]:
    """The run cut into phases wherever the LR shape, the batch ramp, lambda or gamma change.

    Each phase: ``first_step``/``last_step`` (1-based, inclusive), ``tokens_start``/``tokens_end`` (tokens seen
    before its first step / after its last), ``lr_start``/``lr_end`` (at its first / last step), ``lr_shape``,
    ``batch_start``/``batch_end``, ``mtp_weight`` and ``bias_update_speed`` (lambda, gamma at its first step).
    Call :func:`validate_schedule` first for a layout's ramp increment (else dp = 1)."""
    num_steps = total_steps(cfg)
    firsts = {1, min(num_steps, cfg.schedule.warmup_steps + 1)}
    # A token count takes effect at the first step whose tokens_seen reaches it.
    firsts |= {steps_for_tokens(p, cfg) + 1 for p in _token_breakpoints(cfg)}
    firsts = sorted(f for f in firsts if f <= num_steps)
    lasts = [f - 1 for f in firsts[1:]] + [num_steps]
    # tokens seen before each first step, before each last step, and after the last
    counts = sorted({n for f, l in zip(firsts, lasts) for n in (f - 1, l - 1, l)})
    seen = dict(zip(counts, tokens_at_steps(counts, cfg)))
    phases = []
    for first, last in zip(firsts, lasts):
        a, z = seen[first - 1], seen[last - 1]
        lam, gamma = loss_weights_at(a, cfg)
        phases.append({"first_step": first, "last_step": last, "tokens_start": a, "tokens_end": seen[last],
                       "lr_start": lr_at(first, a, cfg), "lr_end": lr_at(last, z, cfg),
                       "lr_shape": _lr_shape(first, a, cfg), "batch_start": global_batch_at(a, cfg),
                       "batch_end": global_batch_at(z, cfg), "mtp_weight": lam, "bias_update_speed": gamma})
    return phases


def schedule_samples(cfg: Config, num: int = 1500) -> dict[str, list[float]]:
    """The recipe sampled at ~``num`` steps spread over the run plus both ends of every phase (for plots):
    {"step", "tokens" (seen before the step), "lr", "batch", "mtp_weight", "bias_update_speed"}, by step."""
    num_steps = total_steps(cfg)
    steps = {1 + round(i * (num_steps - 1) / max(1, num - 1)) for i in range(num)}
    for ph in schedule_phases(cfg):
        steps |= {ph["first_step"], ph["last_step"]}
    steps = sorted(steps)
    tokens = tokens_at_steps([n - 1 for n in steps], cfg)
    weights = [loss_weights_at(t, cfg) for t in tokens]
    return {"step": steps, "tokens": tokens, "lr": [lr_at(n, t, cfg) for n, t in zip(steps, tokens)],
            "batch": [global_batch_at(t, cfg) for t in tokens], "mtp_weight": [w[0] for w in weights],
            "bias_update_speed": [w[1] for w in weights]}

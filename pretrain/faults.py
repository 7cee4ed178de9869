"""Fault injection for the reliability tests (docs/RELIABILITY.md): ``PRETRAIN_FAULT`` names faults to inject.

    PRETRAIN_FAULT="KIND:STEPS:RANK[,KIND:STEPS:RANK ...]"

``STEPS`` is a step (``2``), a range (``2-5``) or ``*``; ``RANK`` a global rank or ``*``. Kinds, each checked at
one place of the loop or the checkpoint code:

    crash_in_save     SIGKILL this process after DeepSpeed wrote its checkpoint files, before ours (mid-save)
    enospc_in_save    raise OSError(ENOSPC) while writing this rank's checkpoint files
    nan_loss          this rank's loss becomes NaN (every micro-batch of the step)
    inf_loss          this rank's loss becomes +Inf
    nan_expert_grad   the gradient of one routed expert's weights becomes NaN on this rank
    spike_loss        this rank's loss is multiplied by 100 (a loss spike with finite gradients)
    hang              this rank sleeps forever just before the step's collectives

Faults fire only in the first attempt of a job (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a run restarted
by ``torchrun --max-restarts`` does not crash again. Unset in production: :func:`active` is one dict lookup.
"""
from __future__ import annotations

import os

ENV = "PRETRAIN_FAULT"
KINDS = ("crash_in_save", "enospc_in_save", "nan_loss", "inf_loss", "nan_expert_grad", "spike_loss", "hang")


def _matches(spec: str, value: int) -> bool:
    if spec == "*":
        return True
    lo, _, hi = spec.partition("-")
    return int(lo) <= value <= int(hi or lo)


def active(kind: str, step: int, rank: int) -> bool:
    """True if ``PRETRAIN_FAULT`` asks for ``kind`` at ``step`` on ``rank`` in this (first) attempt."""
    spec = os.environ.get(ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in KINDS:
            raise ValueError(f"{ENV}={spec!r}: each fault is KIND:STEPS:RANK with KIND one of {', '.join(KINDS)}")
        if parts[0] == kind and _matches(parts[1], step) and _matches(parts[2], rank):
            return True
    return False

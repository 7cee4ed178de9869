"""Preemption: turn SIGTERM / SIGUSR1 on any rank into "checkpoint at the next step boundary, then exit 0" on all.

A scheduler (slurm's ``--signal``, a preemption, ``kill``) may signal only some processes. The handler only sets a
local flag; the loop calls :meth:`PreemptionHandler.should_stop` once per optimizer step on every rank, and that
call agrees across ranks (an all-reduce MAX on the default process group), so one signalled rank stops every rank
at the same step and the checkpoint they write together is complete.

Usage in the training loop::

    preempt = PreemptionHandler(cfg.train.preemption_signals).install()
    for step in ...:
        train_step()
        if preempt.should_stop():      # collective: every rank calls it at the same place
            save_checkpoint(step); break
"""
from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist


def _to_signal(sig: str | int) -> signal.Signals:
    if isinstance(sig, int):
        return signal.Signals(sig)
    name = sig.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"preemption signal {sig!r}: unknown signal name; use e.g. SIGTERM or SIGUSR1") from None


class PreemptionHandler:
    """Catches ``signals`` (names like ``"SIGTERM"``/``"USR1"`` or numbers) and agrees on stopping across ranks."""

    def __init__(self, signals=("SIGTERM", "SIGUSR1")):
        self.signals = [_to_signal(s) for s in signals]
        self._requested = False
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only). Returns self. A launcher that ignores a signal (SIG_IGN, as
        ``launch_scripts/`` arranges for SIGUSR1) does not stop this process from catching it."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the loop acts at the next step boundary, never in the middle of a collective.
        self._requested = True
        self.received = signal.Signals(signum)
        print(f"[preemption] received {self.received.name}: checkpointing at the next step boundary",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        """True once this process received one of the signals (local, no communication)."""
        return self._requested

    def should_stop(self) -> bool:
        """True on every rank if any rank was signalled. A collective when torch.distributed is initialized:
        call it on all ranks at the same point of every step."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._requested
        # NCCL reduces only CUDA tensors; gloo and others take CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self._requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

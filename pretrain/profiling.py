"""Counters for one training step: FLOPs, bytes per collective kind and peak live-tensor bytes on this rank.

``train.profile_step=N`` wraps step N of ``pretrain.train`` in :class:`StepProfiler` and writes
``profile_step_N_rank_R.json`` into the run directory; ``bench/bench_scale.py`` reads those files.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; forward, backward and any activation
  recompute as executed). Its registry has no rule for ``torch._grouped_mm`` (the routed experts), the opaque
  ``pretrain::grouped_mm``, CPU SDPA or the in-place ``addmm_``: :func:`register_flop_formulas` adds them, else
  expert FLOPs (and the fused head's weight gradient) read 0.
- Bytes: every ``torch.distributed`` collective called during the step (ours, megatron-core's and DeepSpeed's:
  ``deepspeed.comm`` calls ``torch.distributed``) is wrapped and counted as the bytes this rank puts on the wire
  with the bandwidth-optimal (ring) algorithm for a group of p ranks and a payload of S bytes: all-reduce
  2 (p - 1) / p S, reduce-scatter, reduce and all-gather (p - 1) / p S (S the full, unsharded tensor), all-to-all
  the rows sent to other ranks, p2p the bytes sent (received bytes are another rank's sent bytes), broadcast S at
  the root. Groups of one rank move nothing. DeepSpeed's own handles on ``all_gather_into_tensor`` and
  ``reduce_scatter_tensor`` (taken at start-up) are redirected too.
- Memory: torch's ``MemTracker`` (a ``TorchDispatchMode`` tracking tensor storages through weak references, the
  same on CPU and GPU) with the module, the optimizer and the tensors the (ZeRO) optimizer holds registered before
  the step; the peak is the largest sum of live storages during the step, split into weights, gradients, optimizer
  state, activations (forward activations plus backward temporaries) and communication buffers (DeepSpeed's
  gradient-reduction buckets, ``comm_buffers``; the categories they were counted in at the peak give them back).
  On GPU ``torch.cuda.max_memory_allocated`` is reported next to it.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from contextlib import ExitStack
from functools import wraps
from pathlib import Path

import torch
import torch.distributed as dist

# Collective -> (kind, bytes on the wire for this rank as a function of (args, kwargs, group size)).
_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p", "broadcast")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _arg(args, kwargs, index: int, name: str):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _group_size(args, kwargs, index: int) -> int:
    group = _arg(args, kwargs, index, "group")
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _all_to_all_bytes(args, kwargs) -> float:
    """Rows of ``all_to_all_single(out, in, out_splits, in_splits, group)`` sent to the other ranks."""
    inp, splits = _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 3, "input_split_sizes")
    group = _arg(args, kwargs, 4, "group")
    p = dist.get_world_size(group) if group is not None else dist.get_world_size()
    me = dist.get_rank(group) if group is not None else dist.get_rank()
    total = _nbytes(inp)
    if p == 1:
        return 0.0
    if not splits:
        return total * (p - 1) / p
    row = total / max(inp.shape[0], 1)
    return row * (sum(splits) - splits[me])


def _rules() -> dict:
    """name -> (kind, bytes(args, kwargs)) for the collectives of ``torch.distributed``."""
    def ring(factor, tensor_index, name, group_index):
        def count(args, kwargs):
            p = _group_size(args, kwargs, group_index)
            return factor * (p - 1) / p * _nbytes(_arg(args, kwargs, tensor_index, name))
        return count

    def broadcast(args, kwargs):
        src, group = _arg(args, kwargs, 1, "src"), _arg(args, kwargs, 3, "group")
        p = dist.get_world_size(group) if group is not None else dist.get_world_size()
        return _nbytes(_arg(args, kwargs, 0, "tensor")) if p > 1 and dist.get_rank() == src else 0.0

    def sent(args, kwargs):
        return _nbytes(_arg(args, kwargs, 0, "tensor"))

    return {
        "all_reduce": ("all_reduce", ring(2, 0, "tensor", 2)),
        # reduce-scatter: the input is the full tensor; all-gather: the output is
        "reduce_scatter_tensor": ("reduce_scatter", ring(1, 1, "input", 3)),
        "_reduce_scatter_base": ("reduce_scatter", ring(1, 1, "input", 3)),
        "reduce_scatter": ("reduce_scatter", ring(1, 1, "input_list", 3)),
        "all_gather_into_tensor": ("all_gather", ring(1, 0, "output_tensor", 2)),
        "_all_gather_base": ("all_gather", ring(1, 0, "output_tensor", 2)),
        "all_gather": ("all_gather", ring(1, 0, "tensor_list", 2)),
        # a reduce to one rank (ZeRO's per-partition reduction) moves what a reduce-scatter of it does
        "reduce": ("reduce_scatter", ring(1, 0, "tensor", 3)),
        "all_to_all_single": ("all_to_all", _all_to_all_bytes),
        "send": ("p2p", sent), "isend": ("p2p", sent),
        "broadcast": ("broadcast", broadcast),
    }


class CollectiveCounter:
    """Context manager: counts calls and bytes per collective kind while patched into ``torch.distributed``."""

    def __init__(self):
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)
        self._saved = {}

    def __enter__(self) -> "CollectiveCounter":
        for name, (kind, count) in _rules().items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapper(*args, _original=original, _kind=kind, _count=count, **kwargs):
                self.bytes[_kind] += _count(args, kwargs)
                self.calls[_kind] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, wraps(original)(wrapper))
        self._patch_deepspeed()
        return self

    def _patch_deepspeed(self) -> None:
        """DeepSpeed's torch backend keeps ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` as attributes
        taken when it started (ZeRO's gradient reduce-scatter and parameter all-gather): point them at the
        wrappers too."""
        comm = sys.modules.get("deepspeed.comm.comm")
        backend = getattr(comm, "cdb", None)
        self._deepspeed = {}
        for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                           ("reduce_scatter_function", "reduce_scatter_tensor")):
            if getattr(backend, attr, None) is not None:
                self._deepspeed[attr] = getattr(backend, attr)
                setattr(backend, attr, getattr(dist, name))

    def __exit__(self, *exc) -> None:
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        for attr, original in self._deepspeed.items():
            setattr(backend, attr, original)
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()


# ----------------------------------------------------------------------------------------------- FLOPs

def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``_grouped_mm(a, b, offs)``: every row of a meets one group's matrix once. (M, K) x (E, K, N) -> 2 M K N;
    (K, M) x (M, N) with groups along M (the weight gradient) -> 2 K M N."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the grouped GEMMs of the experts and CPU SDPA (idempotent)."""
    from torch.utils import flop_counter as fc

    import pretrain.model.moe  # noqa: F401  (defines torch.ops.pretrain.grouped_mm)

    aten = torch.ops.aten
    ours = {aten._grouped_mm: _grouped_mm_flop, torch.ops.pretrain.grouped_mm: _grouped_mm_flop}
    # torch's own formulas (already shape-wrapped): the fused head accumulates its weight gradient in place
    theirs = {aten.addmm_: fc.addmm_flop}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        theirs[aten._scaled_dot_product_flash_attention_for_cpu] = fc.sdpa_flop
        theirs[aten._scaled_dot_product_flash_attention_for_cpu_backward] = fc.sdpa_backward_flop
    for rules, raw in ((ours, False), (theirs, True)):
        for op, formula in rules.items():
            if op not in fc.flop_registry:
                fc.register_flop_formula(op, get_raw=raw)(formula)


# ---------------------------------------------------------------------------------------------- memory

def _tensors_of(obj, depth: int = 3):
    """Tensors held by an optimizer object (ZeRO's flat fp32 partitions and gradient buffers), a few levels down."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_of(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_of(x, depth - 1)
    elif depth > 0 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        for key, x in vars(obj).items():
            if not key.startswith("__"):
                yield from _tensors_of(x, depth - 1)


def _memory_split(peak: dict, comm: dict | None = None) -> dict:
    """MemTracker's categories -> weights, gradients, optimizer state, activations (and temporaries) and
    communication buffers: ``comm`` ({category: bytes}) is the part of each category that was DeepSpeed's gradient
    reduction buckets (``comm_buffers``) at that moment; it moves to ``comm_buffers``."""
    comm = comm or {}
    get = lambda *keys: int(sum(peak.get(k, 0) - comm.get(k, 0) for k in keys))  # noqa: E731
    return {"weights": get("Parameter", "Buffer"), "gradients": get("Gradient"),
            "optimizer": get("Optstate", "Other"), "activations": get("Activation", "Temp"),
            "comm_buffers": int(sum(comm.values()))}


def comm_buffers(optimizer) -> list[torch.Tensor]:
    """DeepSpeed's gradient-reduction buckets: ZeRO 1/2's ``ipg_buckets[dtype].buffer`` (``reduce_bucket_size``
    elements each, allocated again at every micro-step; a second one with ``overlap_comm`` or under the pipeline
    engine). ZeRO 0's flattened all-reduce buffers are temporaries of the step and stay with the activations."""
    buckets = getattr(optimizer, "ipg_buckets", None) or {}
    return [t for b in buckets.values() for t in getattr(b, "buffer", ()) if isinstance(t, torch.Tensor)]


def _step_mem_tracker(optimizer=None):
    """torch's ``MemTracker`` without its per-module snapshots: those refuse a module called twice in one step
    (the shared embedding and head under MTP, every micro-batch). The module's parameters get their gradient hooks
    once in ``StepProfiler.__enter__``; live storages, the peak and the categories work as in ``MemTracker``
    (in backward: "Temp", else "Activation"; inside ``optimizer.step``: "Optstate"). Whenever the peak rises it
    also records which categories hold ``optimizer``'s live communication buffers (``peak_comm``)."""
    from torch.distributed._tools.common_utils import get_untyped_storages
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepMemTracker(MemTracker):
        peak_comm: dict = {}
        _pending = False  # the peak rose at the last op: look at the buffers again after it (see below)

        def _update_peak_stats(self, peak_state) -> None:
            # DeepSpeed appends a new bucket to its list after torch.empty returns: when the allocation itself set
            # the peak, the list is complete only at the next op (which frees or creates no bucket)
            if self._pending:
                self.peak_comm, self._pending = self.live_comm(), False
            before = dict(self._peak_mem)
            super()._update_peak_stats(peak_state)
            if optimizer is not None and self._peak_mem != before:
                self.peak_comm, self._pending = self.live_comm(), True

        def live_comm(self) -> dict:
            """{category: bytes} of the communication buffers alive now (each storage once)."""
            out, seen = {}, set()
            for t in comm_buffers(optimizer):
                for st in get_untyped_storages(t):
                    winfo = self._WINFO.get(st, (None, None))[0]
                    if winfo is not None and id(st) not in seen:
                        seen.add(id(st))
                        out[str(winfo.reftype.value)] = out.get(str(winfo.reftype.value), 0) + winfo.mem_consumed
            return out

        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

        def _pre_bw_hook(self, module, args) -> None:
            pass

        def _post_bw_hook(self, module, args) -> None:
            pass

    return StepMemTracker()


class StepProfiler:
    """Counters of one step on this rank: ``with StepProfiler(engine) as prof: train_step(...)``; ``prof.result()``.

    ``engine`` is the DeepSpeed engine (or any object with ``module`` and ``optimizer``).
    """

    def __init__(self, engine):
        self.engine = engine
        self._stack = ExitStack()

    def __enter__(self) -> "StepProfiler":
        from torch.utils.flop_counter import FlopCounterMode

        register_flop_formulas()
        optimizer = getattr(self.engine, "optimizer", None)
        self.memory = _step_mem_tracker(optimizer)
        self.memory._track_module_params_and_buffers(self.engine.module, install_grad_hooks=True)
        inner = getattr(optimizer, "optimizer", optimizer)
        if isinstance(inner, torch.optim.Optimizer):
            self.memory.track_external(inner)
        # ZeRO's fp32 partitions, flat buffers and reduction buckets: tracked as "Other" (counted as optimizer state);
        # the module's own parameters (which the optimizer also holds) stay "Parameter"
        params = {p.untyped_storage().data_ptr() for p in self.engine.module.parameters()}
        extra = [t for t in _tensors_of(optimizer, depth=5) if t.device.type != "meta"
                 and t.untyped_storage().data_ptr() not in params] if optimizer is not None else []
        if extra:
            self.memory.track_external(*extra)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.flops = FlopCounterMode(display=False)
        self.comm = CollectiveCounter()
        self._stack.enter_context(self.comm)
        self._stack.enter_context(self.flops)
        self._stack.enter_context(self.memory)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def result(self) -> dict:
        """This rank's {"flops", "comm_bytes": {kind: bytes}, "comm_calls", "peak_bytes", "memory": the split at the
        peak, "memory_after_step": the split when the step is over, ...}."""
        snap = self.memory.get_tracker_snapshot("peak")
        peak = next(iter(snap.values()), {}) if snap else {}
        end = next(iter(self.memory.get_tracker_snapshot("current").values()), {})
        out = {
            "flops": int(self.flops.get_total_flops()),
            "flops_by_op": {str(op): int(n) for op, n in self.flops.get_flop_counts().get("Global", {}).items()},
            "comm_bytes": {k: float(self.comm.bytes.get(k, 0.0)) for k in _KINDS},
            "comm_calls": {k: int(self.comm.calls.get(k, 0)) for k in _KINDS},
            "peak_bytes": int(peak.get("Total", 0)),
            "memory": _memory_split(peak, self.memory.peak_comm),  # at the moment of the peak
            # what stays: weights, gradients, optimizer state (and the last micro-step's buckets)
            "memory_after_step": _memory_split(end, self.memory.live_comm()),
            "memory_tracker_peak": {str(getattr(k, "value", k)): int(v) for k, v in peak.items()},
        }
        if torch.cuda.is_available():
            out["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
        return out


def write_profile(result: dict, run_dir: str | Path, step: int, rank: int) -> Path:
    """``profile_step_{step}_rank_{rank}.json`` in the run directory."""
    path = Path(run_dir) / f"profile_step_{step}_rank_{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "rank": rank, **result}, indent=1))
    return path

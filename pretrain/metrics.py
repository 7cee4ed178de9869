"""Training metrics: TensorBoard scalars, throughput and MFU, MoE expert-load heatmaps, one console line per log.

Only rank 0 logs: construct ``MetricsLogger(..., enabled=(rank == 0))`` on every rank and the others write nothing.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s:
``tokens_per_sec * flops_per_token / (peak_flops * num_devices)``, where ``flops_per_token`` is the training
(forward + backward) count from ``pretrain.info`` and ``peak_flops`` is one device's peak. Defaults for the peak
(``train.peak_flops`` overrides them):

- GPU: ``989e12`` — NVIDIA H100/H200 SXM dense BF16 tensor-core peak (no sparsity).
- CPU: measured here with :func:`measure_gemm_flops` (a float32 GEMM), so CPU MFU is relative to what this
  machine's BLAS actually reaches, not a datasheet.
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

GPU_PEAK_FLOPS_BF16 = 989e12
"""H100/H200 SXM dense BF16 peak FLOP/s (the default MFU denominator on GPU)."""


def measure_gemm_flops(dtype: torch.dtype = torch.float32, size: int = 512, min_time_s: float = 0.2,
                       device: str | torch.device = "cpu") -> float:
    """Measured FLOP/s of a ``size x size`` square matmul (2 * size**3 FLOPs each), timed for ~``min_time_s``."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: BLAS thread pool, caches
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        iters += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return 2.0 * size ** 3 * iters / elapsed


def default_peak_flops() -> float:
    """989e12 on a CUDA device, else the measured float32 GEMM rate of this CPU."""
    if torch.cuda.is_available():
        return GPU_PEAK_FLOPS_BF16
    return measure_gemm_flops()


def load_max_violation(load_LE: torch.Tensor) -> float:
    """Mean over MoE layers of (max expert load / mean expert load - 1); layers that routed nothing count 0.

    load_LE: (L, E) tokens routed to each expert of each MoE layer.
    """
    load = load_LE.detach().double().cpu()
    if load.ndim != 2 or load.shape[0] == 0:
        raise ValueError(f"expert load: expected a (num_moe_layers, num_experts) tensor, got shape {tuple(load.shape)}")
    mean = load.mean(dim=1)
    violation = torch.where(mean > 0, load.max(dim=1).values / mean.clamp_min(1e-30) - 1.0, torch.zeros_like(mean))
    return float(violation.mean())


def expert_load_heatmap(load_LE: torch.Tensor, cell_px: int = 8) -> np.ndarray:
    """An RGB image (H, W, 3) uint8 of the load relative to each layer's mean: one ``cell_px`` square per
    (layer, expert), rows = layers. White = mean load, blue = idle, red = 2x the mean or more."""
    load = load_LE.detach().double().cpu().numpy()
    mean = load.mean(axis=1, keepdims=True)
    rel = np.divide(load, mean, out=np.ones_like(load), where=mean > 0)  # (L, E), 1 = balanced
    t = np.clip(rel - 1.0, -1.0, 1.0)  # -1 idle .. +1 overloaded (2x mean)
    under, over = np.clip(-t, 0, 1), np.clip(t, 0, 1)
    # diverging blue-white-red: fade the other channels toward the saturated colour
    rgb = np.stack([1.0 - under, 1.0 - under - over, 1.0 - over], axis=-1).clip(0, 1)
    img = (rgb * 255).round().astype(np.uint8)
    return img.repeat(cell_px, axis=0).repeat(cell_px, axis=1)


class MatplotlibMissing(ImportError):
    """matplotlib (the optional ``plot`` extra) is needed and not installed; the message is one line."""


def new_figure(purpose: str):
    """A matplotlib ``Figure`` on its own Agg canvas: no pyplot, no display, no global state touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"{purpose} needs matplotlib: pip install 'deepseek-pretrain[plot]' "
                                f"(or pip install matplotlib)") from None
    fig = Figure()
    FigureCanvasAgg(fig)
    return fig


def expert_load_figure(load_LE: torch.Tensor, step: int):
    """The (MoE layer x expert) load as a labelled heatmap: colour = load / the layer's mean load (white 1 =
    balanced, blue idle, red overloaded), a colour bar, the step and the mean max-violation in the title.

    load_LE: (num_moe_layers, n_routed_experts); rows follow the model's MoE layers (main model, then MTP)."""
    from matplotlib.colors import TwoSlopeNorm

    load = load_LE.detach().double().cpu().numpy()
    mean = load.mean(axis=1, keepdims=True)
    rel = np.divide(load, mean, out=np.ones_like(load), where=mean > 0)  # (L, E), 1 = balanced
    num_layers, num_experts = rel.shape
    fig = new_figure("the expert-load heatmap")
    fig.set_size_inches(min(14.0, 3.5 + 0.06 * num_experts), min(10.0, 1.8 + 0.22 * num_layers))
    fig.set_dpi(80)  # a 256-expert x 59-layer figure renders in ~1 s on one CPU core
    ax = fig.add_subplot()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
    im = ax.imshow(rel, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (main model, then MTP)")
    if num_layers <= 32:
        ax.set_yticks(range(num_layers))
    fig.colorbar(im, ax=ax, label="load / mean load")
    ax.set_title(f"expert load, step {step} (max / mean - 1, mean over layers: {load_max_violation(load_LE):.3f})")
    fig.tight_layout()
    return fig


def expert_load_image(load_LE: torch.Tensor, step: int) -> np.ndarray:
    """RGB (H, W, 3) uint8 for TensorBoard: :func:`expert_load_figure` rendered, or the raw
    :func:`expert_load_heatmap` pixels when matplotlib is not installed."""
    try:
        fig = expert_load_figure(load_LE, step)
    except MatplotlibMissing:
        return expert_load_heatmap(load_LE)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


MEMORY_LOG_STEPS = 3
"""``memory/peak_bytes`` is logged on the first steps: the peak is reached by then (weights, optimizer state,
one step's activations and buffers) and later steps only repeat it."""


def rank_peak_bytes(device: torch.device) -> float:
    """This rank's peak memory so far: ``torch.cuda.max_memory_allocated`` on GPU (tensor bytes), the process's
    resident-set high-water mark on CPU (the interpreter and libraries included; ``train.profile_step`` counts
    live tensors only)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def log_peak_memory(metrics: "MetricsLogger", step: int, device: torch.device, group=None) -> list[float] | None:
    """On the first ``MEMORY_LOG_STEPS`` steps of this process (a collective then, on every rank): gather each
    rank's :func:`rank_peak_bytes`; rank 0 logs ``memory/peak_bytes`` (the max over ranks: the rank that runs out
    first) and ``memory/peak_rank`` (which). Returns the per-rank list, None on later steps."""
    import torch.distributed as dist

    if metrics.memory_logged >= MEMORY_LOG_STEPS:
        return None
    metrics.memory_logged += 1
    mine = torch.tensor([rank_peak_bytes(device)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
    else:
        parts = [mine]
    peaks = [float(p) for p in parts]
    busiest = max(range(len(peaks)), key=peaks.__getitem__)
    metrics.log_scalar("memory/peak_bytes", peaks[busiest], step)
    metrics.log_scalar("memory/peak_rank", busiest, step)
    return peaks


def log_memory_split(metrics: "MetricsLogger", step: int, profile: dict) -> None:
    """The profiled step's live-tensor peak and split (``pretrain.profiling``) as ``memory/profile/*`` (rank 0's)."""
    metrics.log_scalar("memory/profile/peak_bytes", profile["peak_bytes"], step)
    for part, value in profile["memory"].items():
        metrics.log_scalar(f"memory/profile/{part}_bytes", value, step)


class MetricsLogger:
    """TensorBoard + console metrics for the training loop (rank 0 only; disabled ranks write nothing).

    Args:
        output_dir: run directory; event files go to ``output_dir/tensorboard/``.
        enabled: False on every rank but 0.
        flops_per_token: training FLOPs per token (forward + backward), from ``pretrain.info``.
        peak_flops: one device's peak FLOP/s; None = :func:`default_peak_flops`.
        total_steps: run length in steps, for the ETA (None = no ETA).
        num_devices: devices that processed ``tokens_in_step`` (the MFU denominator is peak x devices).
        initial_tokens: tokens already seen (resume), the start of the cumulative ``train/tokens``.
        log_interval: write and print every N steps; tokens/s is averaged over the interval.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, flops_per_token: float, peak_flops: float | None,
                 total_steps: int | None = None, num_devices: int = 1, initial_tokens: int = 0,
                 log_interval: int = 1, print_fn=print):
        self.enabled = enabled
        self.flops_per_token = float(flops_per_token)
        self.total_steps = total_steps
        self.num_devices = num_devices
        self.log_interval = max(1, int(log_interval))
        self.tokens = int(initial_tokens)
        self.print_fn = print_fn
        self._pending_tokens, self._pending_time = 0, 0.0
        self._recent_step_times: deque[float] = deque(maxlen=50)
        self.writer = None
        self.peak_flops = None
        self.memory_logged = 0  # steps whose memory/peak_bytes was logged (log_peak_memory)
        if enabled:
            # Imported lazily: non-zero ranks never pay for tensorboard's import.
            from torch.utils.tensorboard import SummaryWriter
            self.peak_flops = float(peak_flops) if peak_flops else default_peak_flops()
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), flush_secs=10)

    def log_step(self, step: int, scalars: dict[str, float], tokens_in_step: int, step_time_s: float) -> dict | None:
        """Record one optimizer step. ``scalars`` are full tags (``train/loss``, ``train/lr``, ...);
        ``tokens_in_step`` counts all data-parallel ranks. Returns the logged values on a log step, else None."""
        self.tokens += int(tokens_in_step)
        self._pending_tokens += int(tokens_in_step)
        self._pending_time += float(step_time_s)
        self._recent_step_times.append(float(step_time_s))
        if not self.enabled or step % self.log_interval != 0:
            return None
        tokens_per_sec = self._pending_tokens / self._pending_time if self._pending_time > 0 else 0.0
        self._pending_tokens, self._pending_time = 0, 0.0
        mfu = tokens_per_sec * self.flops_per_token / (self.peak_flops * self.num_devices)
        values = {k: float(v) for k, v in scalars.items()}
        values.update({"train/tokens": float(self.tokens), "train/tokens_per_sec": tokens_per_sec, "train/mfu": mfu})
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        self.print_fn(self._console_line(step, values))
        return values

    def _console_line(self, step: int, v: dict[str, float]) -> str:
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        for tag, label, fmt in (("train/loss", "loss", "{:.4f}"), ("train/lr", "lr", "{:.3e}"),
                                ("train/grad_norm", "grad_norm", "{:.3f}")):
            if tag in v:
                parts.append(f"{label} " + fmt.format(v[tag]))
        parts.append(f"tokens/s {v['train/tokens_per_sec']:,.0f}")
        parts.append(f"MFU {100 * v['train/mfu']:.2f}%")
        if self.total_steps and self._recent_step_times:
            per_step = sum(self._recent_step_times) / len(self._recent_step_times)
            parts.append(f"ETA {_fmt_duration(per_step * max(0, self.total_steps - step))}")
        return " | ".join(parts)

    def log_expert_load(self, step: int, load_LE: torch.Tensor) -> float:
        """Write ``moe/load_max_violation`` and the (layer x expert) heatmap image ``moe/expert_load`` (a labelled
        matplotlib figure; the raw pixel heatmap without matplotlib).

        load_LE: (num_moe_layers, n_routed_experts) tokens per expert (summed over data-parallel ranks).
        Returns the violation (computed on every rank, so callers may use it anywhere)."""
        violation = load_max_violation(load_LE)
        if self.enabled:
            self.writer.add_scalar("moe/load_max_violation", violation, step)
            self.writer.add_image("moe/expert_load", expert_load_image(load_LE, step), step, dataformats="HWC")
            self.writer.flush()
        return violation

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """Any other scalar (eval loss, ...)."""
        if self.enabled:
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

"""Building blocks: RMSNorm, rotary embeddings with YaRN, SwiGLU MLP.

Numerics follow transformers' DeepseekV3 / Llama so that exported checkpoints give the same logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then cast back and scaled (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------------ RoPE

def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> torch.Tensor:
    """Inverse frequencies blended between interpolation and extrapolation over a linear ramp (YaRN)."""
    factor = float(scaling["factor"])
    original_max = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight


def rope_attention_factor(scaling: dict | None) -> float:
    """Multiplier on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for V2/V3 presets)."""
    if not scaling:
        return 1.0
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary embeddings, with optional YaRN scaling.

    Holds no tensors: the (dim/2,) frequencies are recomputed per forward on the input's device, so a model
    built on the meta device needs no special handling when materialised.
    """

    def __init__(self, dim: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.dim, self.base, self.scaling = dim, base, scaling
        self.attention_factor = rope_attention_factor(scaling)

    def inv_freq(self) -> torch.Tensor:
        if self.scaling:
            return _yarn_inv_freq(self.dim, self.base, self.scaling)
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin each (B, T, dim/2) in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq().to(position_ids.device)
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek (MLA) convention: rotate pairs (x0, x1), (x2, x3), ...

    x (B, heads, T, D), cos/sin (B, T, D/2). The result holds the rotated even parts then the rotated odd parts
    (the layout transformers' DeepseekV3 uses); attention only needs q and k permuted alike.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama convention: rotate the first half against the second half. x (B, heads, T, D), cos/sin (B, T, D/2)."""
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin

"""Causal self-attention: multi-head / grouped-query (Llama layout) and multi-head latent attention (DeepSeek MLA).

Both attend through ``_causal_sdpa``: ``F.scaled_dot_product_attention`` with a causal mask (GPU, and large
shapes on CPU) or, on CPU, the blocked GEMM attention below. ``self.recompute_core`` (set by
``DeepSeekModel.set_activation_checkpointing("selective")``) recomputes the attention core in backward: for MLA
the expansion of the KV latent into per-head keys/values plus attention, for mha/gqa the attention call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.layers import RMSNorm, apply_rope_half, apply_rope_interleaved, yarn_mscale


CHUNK_ROWS = 64
"""Query rows per block of the CPU blocked attention (64 measured fastest at T=512, fp32 and bf16)."""
CHUNK_ELEMENTS = 1 << 24
"""Largest (B, H, CHUNK_ROWS, T) score block it materialises (64 MiB fp32); larger shapes take SDPA's kernel."""


def _blocked_ok(q: torch.Tensor, k: torch.Tensor, enable_gqa: bool) -> bool:
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and not enable_gqa and k.shape[1] == H and T >= 2 * CHUNK_ROWS
            and B * H * CHUNK_ROWS * T <= CHUNK_ELEMENTS)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:
    """q (B, Hq, T, Dqk), k (B, Hkv, T, Dqk), v (B, Hkv, T, Dv) -> (B, T, Hq * Dv).

    On CPU, when the score block fits ``CHUNK_ELEMENTS``, ``BlockedCausalAttention`` (below); otherwise
    ``F.scaled_dot_product_attention``. There, on CPU, a value head narrower than the query/key head (MLA: 64 vs
    96 in the reference bench) is zero-padded to the key width and the extra columns dropped: the CPU flash kernel
    needs equal widths, and without it SDPA falls back to the math path (materialised T x T scores, masked half
    computed too). CUDA's flash / memory-efficient kernels take unequal widths as they are.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _blocked_ok(q, k, enable_gqa):
        out = BlockedCausalAttention.apply(q, k, v, scale)
    else:
        dv = v.shape[-1]
        if q.device.type == "cpu" and dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)[..., :dv]
    return out.transpose(1, 2).flatten(2)


class BlockedCausalAttention(torch.autograd.Function):
    """Causal attention over blocks of ``CHUNK_ROWS`` query rows, as batched GEMMs (the FlashAttention algorithm at
    block granularity, for CPU).

    Block i's rows attend to keys ``[0, end_i)`` only, so the masked upper triangle beyond the block is never
    computed; scores and softmax are fp32 (bf16 inputs: the GEMMs run in bf16). Forward keeps only the output and
    the per-row log-sum-exp; backward recomputes each block's probabilities from them (no (T, T) tensor is ever
    saved). Why not SDPA on CPU: its flash kernel's backward runs well below the GEMM rate on these shapes, and its
    value head must be padded to the key width for MLA: fwd+bwd of the reference bench's attention (4 x 4 heads x
    512, qk 96, v 64) 43 ms -> 32 ms fp32, 43 -> 36 ms bf16 (bench/results.md has the whole-step effect).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, T, _ = q.shape
        out = q.new_empty(B, H, T, v.shape[-1])
        lse = q.new_empty(B, H, T, 1, dtype=torch.float32)
        for start, end, scores in _block_scores(q, k, scale):
            row_lse = scores.logsumexp(dim=-1, keepdim=True)
            probs = scores.sub_(row_lse).exp_()
            out[:, :, start:end] = torch.matmul(probs.to(v.dtype), v[:, :, :end])  # (no out=: torch.compile traces it)
            lse[:, :, start:end] = row_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        acc = torch.float32
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        for start, end, scores in _block_scores(q, k, ctx.scale):
            probs = scores.sub_(lse[:, :, start:end]).exp_()
            d_o = dout[:, :, start:end]
            dv[:, :, :end] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), d_o)
            dp = torch.matmul(d_o, v[:, :, :end].transpose(-1, -2)).to(acc)
            ds = dp.sub_(delta[:, :, start:end]).mul_(probs).mul_(ctx.scale).to(q.dtype)
            dq[:, :, start:end] = torch.matmul(ds, k[:, :, :end])
            dk[:, :, :end] += torch.matmul(ds.transpose(-1, -2), q[:, :, start:end])
        return dq, dk.to(k.dtype), dv.to(v.dtype), None


def _block_scores(q: torch.Tensor, k: torch.Tensor, scale: float):
    """Yield (start, end, fp32 scaled scores (B, H, end - start, end) with the causal mask applied) per block."""
    T = q.shape[2]
    upper = torch.ones(CHUNK_ROWS, CHUNK_ROWS, dtype=torch.bool, device=q.device).triu_(1)
    for start in range(0, T, CHUNK_ROWS):
        end = min(start + CHUNK_ROWS, T)
        scores = torch.matmul(q[:, :, start:end], k[:, :, :end].transpose(-1, -2)).to(torch.float32).mul_(scale)
        scores[..., start:end].masked_fill_(upper[:end - start, :end - start], float("-inf"))
        yield start, end, scores


class Attention(nn.Module):
    """mha / gqa with Llama's projection names (q_proj, k_proj, v_proj, o_proj) and half-rotation RoPE."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.attn_head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.recompute_core = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, T, head_dim/2) -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(_causal_sdpa, q, k, v, None, gqa, use_reentrant=False)
        else:
            out = _causal_sdpa(q, k, v, None, gqa)
        return self.o_proj(out)


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Queries: ``q_proj`` or the low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj``. Keys/values come from one
    compressed latent (``kv_a_proj_with_mqa`` emits the latent plus the decoupled RoPE key, which is shared by all
    heads), normed by ``kv_a_layernorm`` and expanded per head by ``kv_b_proj``. Softmax scale is
    (qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN, as DeepSeek defines it.
    """

    def __init__(self, cfg):
        super().__init__()
        h, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=False)
        self.scale = qk_dim ** -0.5
        rs = cfg.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            self.scale *= yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"])) ** 2
        self.recompute_core = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, T, qk_rope_head_dim/2) -> (B, T, H)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, -1).transpose(1, 2)  # (B, nh, T, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, kv_lora_rank)
        q_rope = apply_rope_interleaved(q_rope, cos, sin)
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, rope): one key for all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, latent, k_rope, use_reentrant=False)
        else:
            out = self._core(q, latent, k_rope)
        return self.o_proj(out)

    def _core(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Expand the latent to per-head keys/values and attend. q (B, nh, T, qk), latent (B, T, r) -> (B, T, nh*v)."""
        B, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # (B, nh, T, qk)
        return _causal_sdpa(q, k, v, self.scale)


def build_attention(cfg) -> nn.Module:
    return MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)

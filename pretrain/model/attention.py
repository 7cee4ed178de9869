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


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> boolean (B, 1, T, T): query i may attend key j iff j <= i and both are in the same
    document (True = attend), the mask SDPA takes."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril_()
    return (causal & (document_ids.unsqueeze(2) == document_ids.unsqueeze(1))).unsqueeze(1)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 enable_gqa: bool = False, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, T, Dqk), k (B, Hkv, T, Dqk), v (B, Hkv, T, Dv), document_ids (B, T) or None -> (B, T, Hq * Dv).

    With ``document_ids`` a token attends only to earlier tokens of its own document.

    On CPU, when the score block fits ``CHUNK_ELEMENTS``, ``BlockedCausalAttention`` (below, documents as key ranges
    plus an exact mask on the blocks that straddle a boundary); otherwise
    ``F.scaled_dot_product_attention``. There, on CPU, a value head narrower than the query/key head (MLA: 64 vs
    96 in the reference bench) is zero-padded to the key width and the extra columns dropped: the CPU flash kernel
    needs equal widths, and without it SDPA falls back to the math path (materialised T x T scores, masked half
    computed too). CUDA's flash / memory-efficient kernels take unequal widths as they are.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _blocked_ok(q, k, enable_gqa):
        if document_ids is None:
            out = BlockedCausalAttention.apply(q, k, v, scale, block_plan(q.shape[2]), None)
        else:
            out = _blocked_documents(q, k, v, scale, document_ids)
    else:
        # Documents: a dense (B, 1, T, T) boolean mask. On CUDA SDPA's memory-efficient kernel takes it; flex_attention
        # would skip masked blocks but has no CPU backward in torch 2.13 and needs torch.compile to be fast on CUDA.
        mask = None if document_ids is None else document_mask(document_ids)
        dv = v.shape[-1]
        if q.device.type == "cpu" and dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             enable_gqa=enable_gqa)[..., :dv]
    return out.transpose(1, 2).flatten(2)


@torch.compiler.disable
def _blocked_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       document_ids: torch.Tensor) -> torch.Tensor:
    """``BlockedCausalAttention`` with documents, run eagerly under torch.compile: its block plan is read from the
    data (a host sync), and compiled each new set of boundaries would recompile the block."""
    doc_start = document_starts(document_ids)
    return BlockedCausalAttention.apply(q, k, v, scale, block_plan(q.shape[2], doc_start), doc_start)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T), documents contiguous -> (B, T) long: the index of the first token of each token's
    document (a token attends to keys [start, i])."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new_doc, index, torch.zeros_like(index)).cummax(dim=1).values


def block_plan(T: int, doc_start: torch.Tensor | None = None) -> tuple[tuple[int, int, int, bool], ...]:
    """The blocks of ``BlockedCausalAttention``: (start, end, kstart, exact) per ``CHUNK_ROWS`` query rows.

    Rows ``[start, end)`` attend to keys ``[kstart, end)``: 0 without documents; with ``doc_start`` (B, T) the
    earliest document start among the block's rows over the batch (the first row's: starts never decrease along
    T), so key blocks before it, fully masked, are never computed. exact: some row's document starts after
    ``kstart`` (a boundary inside the block, or batch elements that differ), so a per-element mask is needed beyond
    the causal triangle.
    """
    starts = list(range(0, T, CHUNK_ROWS))
    ends = [min(start + CHUNK_ROWS, T) for start in starts]
    if doc_start is None:
        return tuple((start, end, 0, False) for start, end in zip(starts, ends))
    kstarts = doc_start[:, starts].amin(dim=0).tolist()  # one host sync per attention call
    latest = doc_start[:, [end - 1 for end in ends]].amax(dim=0).tolist()
    return tuple((s, e, ks, last > ks) for s, e, ks, last in zip(starts, ends, kstarts, latest))


class BlockedCausalAttention(torch.autograd.Function):
    """Causal attention over blocks of ``CHUNK_ROWS`` query rows, as batched GEMMs (the FlashAttention algorithm at
    block granularity, for CPU).

    Block i's rows attend to keys ``[0, end_i)`` only, so the masked upper triangle beyond the block is never
    computed; with documents (``block_plan``) keys ``[kstart_i, end_i)``, so neither are the key blocks before the
    block's first document start (packed sequences: the cost falls with the documents' lengths). Scores and softmax
    are fp32 (bf16 inputs: the GEMMs run in bf16). Forward keeps only the output and the per-row log-sum-exp;
    backward recomputes each block's probabilities from them (no (T, T) tensor is ever saved). Why not SDPA on CPU:
    at the reference length (512) its flash kernel's backward runs well below the GEMM rate and its value head must
    be padded to the key width for MLA; at 2048 its causal kernel is as fast or slightly faster, but with documents
    it takes a dense mask and computes every block (bench/results.md, "Attention with document masks").
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                plan: tuple[tuple[int, int, int, bool], ...], doc_start: torch.Tensor | None) -> torch.Tensor:
        """q, k (B, H, T, Dqk), v (B, H, T, Dv), plan from ``block_plan``, doc_start (B, T) or None -> (B, H, T, Dv)."""
        B, H, T, _ = q.shape
        out = q.new_empty(B, H, T, v.shape[-1])
        lse = q.new_empty(B, H, T, 1, dtype=torch.float32)
        for start, end, kstart, scores in _block_scores(q, k, scale, plan, doc_start):
            row_lse = scores.logsumexp(dim=-1, keepdim=True)
            if doc_start is not None:
                row_lse.nan_to_num_(neginf=0.0)  # a fully masked row (none: a token sees itself) gives 0, not NaN
            probs = scores.sub_(row_lse).exp_()
            out[:, :, start:end] = torch.matmul(probs.to(v.dtype), v[:, :, kstart:end])  # (no out=: compile traces it)
            lse[:, :, start:end] = row_lse
        ctx.save_for_backward(q, k, v, out, lse, doc_start)
        ctx.scale, ctx.plan = scale, plan
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, doc_start = ctx.saved_tensors
        dout = dout.contiguous()
        acc = torch.float32
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        for start, end, kstart, scores in _block_scores(q, k, ctx.scale, ctx.plan, doc_start):
            probs = scores.sub_(lse[:, :, start:end]).exp_()
            d_o = dout[:, :, start:end]
            dv[:, :, kstart:end] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), d_o)
            dp = torch.matmul(d_o, v[:, :, kstart:end].transpose(-1, -2)).to(acc)
            ds = dp.sub_(delta[:, :, start:end]).mul_(probs).mul_(ctx.scale).to(q.dtype)
            dq[:, :, start:end] = torch.matmul(ds, k[:, :, kstart:end])
            dk[:, :, kstart:end] += torch.matmul(ds.transpose(-1, -2), q[:, :, start:end])
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, plan, doc_start: torch.Tensor | None):
    """Yield (start, end, kstart, fp32 scaled scores (B, H, end - start, end - kstart), masked) per block of
    ``plan``: the causal triangle, and on exact blocks also the keys before each row's document start."""
    upper = torch.ones(CHUNK_ROWS, CHUNK_ROWS, dtype=torch.bool, device=q.device).triu_(1)
    index = torch.arange(q.shape[2], device=q.device)
    for start, end, kstart, exact in plan:
        scores = torch.matmul(q[:, :, start:end], k[:, :, kstart:end].transpose(-1, -2)).to(torch.float32).mul_(scale)
        if exact:
            rows, cols = index[start:end, None], index[kstart:end]
            masked = (cols > rows) | (cols < doc_start[:, start:end, None])  # (B, rows, keys)
            scores.masked_fill_(masked.unsqueeze(1), float("-inf"))
        else:
            scores[..., start - kstart:].masked_fill_(upper[:end - start, :end - start], float("-inf"))
        yield start, end, kstart, scores


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, T, head_dim/2), document_ids (B, T) or None -> (B, T, H)."""
        if cache is not None:  # decoding: pretrain/model/kv_cache.py
            return cache.attend(self, x, cos, sin)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(_causal_sdpa, q, k, v, None, gqa, document_ids, use_reentrant=False)
        else:
            out = _causal_sdpa(q, k, v, None, gqa, document_ids)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x (B, T, H), cos/sin (B, T, qk_rope_head_dim/2), document_ids (B, T) or None -> (B, T, H)."""
        if cache is not None:  # decoding: pretrain/model/kv_cache.py
            return cache.attend(self, x, cos, sin)
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
            out = checkpoint(self._core, q, latent, k_rope, document_ids, use_reentrant=False)
        else:
            out = self._core(q, latent, k_rope, document_ids)
        return self.o_proj(out)

    def _core(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Expand the latent to per-head keys/values and attend. q (B, nh, T, qk), latent (B, T, r) -> (B, T, nh*v)."""
        B, T, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # (B, nh, T, qk)
        return _causal_sdpa(q, k, v, self.scale, document_ids=document_ids)


def build_attention(cfg) -> nn.Module:
    return MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)

"""KV caches for decoding: pre-allocated per-layer buffers written in place, one shared slot bookkeeping.

Layout: a batch of B sequences, each row its own slots ``[0, capacity)``; slot = position (prompts are
right-padded, so row b's token at position p lives in slot p and its position id is p). ``DecodeState.lengths``
(B,) counts the filled slots of each row. A forward of T new tokens writes row b's slots
``[lengths[b], lengths[b] + T)`` in every layer; a query in slot s attends to the keys in slots ``<= s`` of its own
row. That is all the masking there is: the padding after a short prompt sits in slots that decoding overwrites
before any query reaches them, and a speculative step that is rejected simply does not advance ``lengths``
(``DecodeState.advance`` per row), so its slots are overwritten next time. Rows advance by different amounts,
which is what MTP speculative decoding needs (each row accepts its own number of drafts).

MLA caches only what DeepSeek-V2 (section 2.1.3) caches: the normalised latent c_KV (kv_lora_rank) and the shared
RoPE key (qk_rope_head_dim) per token and layer. ``kv_b_proj``'s key half W_UK is absorbed into the query
(q_nope W_UK attends to c_KV directly) and its value half W_UV is applied after attention (the weighted sum of
latents), so no per-head key or value is ever materialised for the past (DeepSeek-V3 inference/model.py's
"absorb" mode). mha/gqa cache the rotated keys and the values per kv head.

Under tensor parallelism the attention modules hold their local heads (``num_heads`` already divided,
``kv_b_proj.weight`` this rank's rows), so the same code runs on every TP rank; ``o_proj`` reduces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.attention import MLAttention
from pretrain.model.layers import apply_rope_half, apply_rope_interleaved


class DecodeState:
    """Filled slots per row, shared by every layer cache of one batch (main model and MTP blocks alike)."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self._step: tuple | None = None

    def slots(self, num_new: int) -> torch.Tensor:
        """(B, T) slots (= position ids) of the next ``num_new`` tokens of each row."""
        return self.lengths.unsqueeze(1) + torch.arange(num_new, device=self.lengths.device)

    def step(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """(rows (B, T), slots (B, T), span S, mask (B, 1, T, S) bool) for a forward of ``num_new`` tokens.

        Computed once per forward (memoised until ``advance``) and shared by all layers; S = the slots any row
        may read, max(lengths) + T, so attention never touches the unwritten tail of the buffers."""
        if self._step is None or self._step[1].shape[1] != num_new:
            slots = self.slots(num_new)
            span = int(slots.max()) + 1  # one host sync per forward
            if span > self.capacity:
                raise ValueError(f"KV cache full: {span} slots needed, {self.capacity} allocated")
            rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1).expand_as(slots)
            keys = torch.arange(span, device=slots.device)
            mask = (keys.view(1, 1, -1) <= slots.unsqueeze(-1)).unsqueeze(1)  # query in slot s sees keys <= s
            self._step = (rows, slots, span, mask)
        return self._step

    def advance(self, num_tokens: torch.Tensor | int) -> None:
        """Keep the first ``num_tokens`` (int or (B,) per row) of the slots just written; the rest are free."""
        self.lengths += num_tokens
        self._step = None


class MLACache:
    """One MLA layer: ``latent`` (B, capacity, kv_lora_rank) normalised c_KV and ``k_rope`` (B, capacity, rope)."""

    def __init__(self, state: DecodeState, attn: MLAttention, batch: int, dtype: torch.dtype,
                 device: torch.device):
        self.state = state
        self.latent = torch.zeros(batch, state.capacity, attn.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, state.capacity, attn.rope_dim, dtype=dtype, device=device)

    def values_per_token(self) -> int:
        return self.latent.shape[-1] + self.k_rope.shape[-1]

    def attend(self, attn: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``MLAttention.forward`` with this cache: x (B, T, H) new tokens, cos/sin (B, T, rope/2) -> (B, T, H)."""
        B, T, _ = x.shape
        nh, nope, r = attn.num_heads, attn.nope_dim, attn.kv_lora_rank
        q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, nh, -1).split([nope, attn.rope_dim], dim=-1)
        latent, k_rope = attn.kv_a_proj_with_mqa(x).split([r, attn.rope_dim], dim=-1)
        q_rope = apply_rope_interleaved(q_rope.transpose(1, 2), cos, sin)  # (B, nh, T, rope)
        k_rope = apply_rope_interleaved(k_rope.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, rope)
        rows, slots, span, mask = self.state.step(T)
        self.latent[rows, slots] = attn.kv_a_layernorm(latent)
        self.k_rope[rows, slots] = k_rope
        c_kv, k_pe = self.latent[:, :span].unsqueeze(1), self.k_rope[:, :span].unsqueeze(1)  # (B, 1, S, r|rope)

        w_kv = attn.kv_b_proj.weight.view(nh, nope + attn.v_dim, r)  # this rank's heads
        q_latent = q_nope.transpose(1, 2) @ w_kv[:, :nope]  # W_UK absorbed: (B, nh, T, r) (matmul: einsum's
        # dispatch costs more than the product at decoding sizes)
        scores = (q_latent @ c_kv.transpose(-1, -2) + q_rope @ k_pe.transpose(-1, -2)).float() * attn.scale
        probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1).to(c_kv.dtype)  # (B, nh, T, S)
        out_latent = probs @ c_kv  # (B, nh, T, r): attention over latents
        out = (out_latent @ w_kv[:, nope:].transpose(-1, -2)).transpose(1, 2)  # W_UV absorbed: (B, T, nh, v)
        return attn.o_proj(out.reshape(B, T, nh * attn.v_dim))


class KVHeadCache:
    """One mha/gqa layer: rotated keys and values, each (B, capacity, kv_heads, head_dim)."""

    def __init__(self, state: DecodeState, attn: nn.Module, batch: int, dtype: torch.dtype, device: torch.device):
        self.state = state
        shape = (batch, state.capacity, attn.num_kv_heads, attn.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def values_per_token(self) -> int:
        return 2 * self.k.shape[-2] * self.k.shape[-1]

    def attend(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``Attention.forward`` with this cache: x (B, T, H), cos/sin (B, T, head_dim/2) -> (B, T, H)."""
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = attn.k_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)
        rows, slots, span, mask = self.state.step(T)
        self.k[rows, slots] = k.transpose(1, 2)
        self.v[rows, slots] = attn.v_proj(x).view(B, T, attn.num_kv_heads, attn.head_dim)
        keys, values = self.k[:, :span].transpose(1, 2), self.v[:, :span].transpose(1, 2)  # (B, Hkv, S, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=attn.num_kv_heads != attn.num_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, attn.num_heads * attn.head_dim))


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The model's weights' dtype and device (a pipeline stage may hold no embedding)."""
    weight = next(model.parameters())
    return weight.dtype, weight.device


def layer_cache(state: DecodeState, attn: nn.Module, batch: int, dtype: torch.dtype, device: torch.device):
    """The cache for one attention module: latent (MLA) or per-head keys/values (mha/gqa)."""
    cls = MLACache if isinstance(attn, MLAttention) else KVHeadCache
    return cls(state, attn, batch, dtype, device)


class KVCache:
    """Per-layer caches of a model, indexable by global layer index (``cache[i]``), plus the shared state.

    ``KVCache.for_model(model, batch, capacity)`` allocates one for every transformer layer the model holds
    (a pipeline stage: its own layers); ``mtp_caches`` one per MTP module's block, on the same state, so a
    speculative step writes and keeps the same slots in the main model and the MTP modules.
    """

    def __init__(self, state: DecodeState, layers: dict):
        self.state, self.layers = state, layers

    def __getitem__(self, index: int):
        return self.layers[index]

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, capacity: int, state: DecodeState | None = None) -> "KVCache":
        dtype, device = _dtype_device(model)
        state = state or DecodeState(batch, capacity, device)
        return cls(state, {i: layer_cache(state, block.self_attn, batch, dtype, device)
                           for i, block in model.blocks()})

    def mtp_caches(self, model: nn.Module) -> list:
        """One layer cache per MTP module (its block's attention), sharing this cache's state."""
        dtype, device = _dtype_device(model)
        batch = self.state.lengths.shape[0]
        return [layer_cache(self.state, module.block.self_attn, batch, dtype, device) for module in model.mtp]

    def values_per_token(self) -> int:
        """Cached values per token summed over the layers (this rank's heads under tensor parallelism)."""
        return sum(c.values_per_token() for c in self.layers.values())

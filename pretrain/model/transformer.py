"""The DeepSeek transformer: pre-norm blocks, ``first_k_dense_replace`` dense layers, MoE layers, MTP modules.

Module names follow transformers' DeepseekV3 (``embed_tokens``, ``layers[i].{input_layernorm, self_attn,
post_attention_layernorm, mlp}``, ``norm``, ``lm_head``) so export is mostly a copy; MTP modules live in
``mtp[k].{enorm, hnorm, eh_proj, block, norm}`` and share ``embed_tokens`` and ``lm_head``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.attention import build_attention, document_starts
from pretrain.model.head import IGNORE_INDEX, LMHead
from pretrain.model.layers import MLP, RMSNorm, RotaryEmbedding
from pretrain.model.moe import MoE, GroupedExperts, Router, exempt_sequences


@dataclass
class ModelOutput:
    """Training outputs (labels given), or a pipeline stage's outputs. ``pretrain.loss.total_loss`` forms the loss:
    lm_loss + lambda * mean(mtp_losses) + sum over balance terms of alpha_term * moe_terms[term]."""

    lm_loss: torch.Tensor | None = None
    """Scalar: mean cross-entropy of the main head over non-ignored labels (None on a stage without the head)."""
    mtp_losses: list = field(default_factory=list)
    """D scalars (training only): depth k predicts the labels shifted left by k (its last k positions, and
    positions whose target lies in another document, ignored)."""
    moe_terms: dict = field(default_factory=dict)
    """Unweighted balance terms summed over this model's MoE layers: name -> scalar (``"seq_aux"``,
    ``"expert_aux"``, ...), plus counts such as ``"dropped"``; see ``pretrain.loss.BALANCE_TERMS``."""
    expert_load: torch.Tensor | None = None
    """(num_moe_layers, n_routed_experts) float: tokens routed to each expert (main layers first, then MTP)."""
    logits: torch.Tensor | None = None
    """(B, T, V) main-head logits; None when the fused head loss ran (``DeepSeekModel.head_loss``)."""
    hidden_states: torch.Tensor | None = None
    """(B, T, H): the output of a pipeline stage that has no head (``norm is None``)."""

    @property
    def seq_aux_loss(self) -> torch.Tensor:
        return self.moe_terms["seq_aux"]

    @property
    def expert_aux_loss(self) -> torch.Tensor:
        return self.moe_terms["expert_aux"]


def token_mean(total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A summed per-token loss over the non-ignored labels -> their mean. Every layout normalises here: a fully
    masked micro-batch (every label -100) gives 0 with zero gradients, never 0 / 0 = NaN."""
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) with -100 = ignore -> scalar mean over the non-ignored positions (fp32)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return token_mean(total, labels)


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) (equal = same document, documents contiguous) -> position_ids (B, T) restarting at 0 at
    each document's first token."""
    return torch.arange(document_ids.shape[1], device=document_ids.device) - document_starts(document_ids)


def mtp_labels(labels: torch.Tensor, k: int, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets of MTP depth k: labels (B, T) shifted left by k. Position i sees the embedding of token i+k and
    predicts labels[i+k]; its last k positions wrap around and are ignored, and so are positions whose token i+k
    lies in another document than token i (a target never crosses a document end)."""
    T = labels.shape[1]
    labels_k = torch.roll(labels, -k, dims=1)
    labels_k[:, T - k:] = IGNORE_INDEX
    if document_ids is not None:
        crosses = document_ids != torch.roll(document_ids, -k, dims=1)
        labels_k = labels_k.masked_fill(crosses, IGNORE_INDEX)
    return labels_k


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then h + mlp(norm(h)) with a dense or MoE FFN."""

    def __init__(self, cfg, use_moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if use_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None, cache=None, exempt: torch.Tensor | None = None):
        """h (B, T, H), document_ids (B, T) or None, cache: this layer's KV cache or None (decoding), exempt (B,)
        sequences never token-dropped (``moe.exempt_sequences``) -> (h (B, T, H), MoE stats dict or None: None for
        a dense layer and when decoding)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, document_ids=document_ids, cache=cache)
        x = self.post_attention_layernorm(h)
        out = self.mlp(x, exempt, stats=cache is None) if isinstance(self.mlp, MoE) else self.mlp(x)
        stats = None
        if isinstance(out, tuple):
            out, stats = out
        return h + out, stats


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3): h_k = block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})])).

    The concatenation order (embedding first) follows DeepSeek's released inference code.
    """

    def __init__(self, cfg):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, use_moe=cfg.is_moe)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                document_ids: torch.Tensor | None = None, cache=None, exempt: torch.Tensor | None = None):
        """h_prev, emb (B, T, H), cache: this module's KV cache or None (MTP drafts while decoding)
        -> (h (B, T, H) before the output norm, MoE stats or None)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, document_ids, cache, exempt)


class DeepSeekModel(nn.Module):
    """Decoder-only LM. ``model(input_ids)`` -> logits; ``model(input_ids, labels=labels)`` -> ModelOutput."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg, use_moe=cfg.is_moe and i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers))
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.attn_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.loss_fn = cross_entropy_loss
        self.activation_checkpointing = "none"
        self.init_weights()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, initializer_range) for linear, embedding, router and expert weights; ones for norms; zero bias."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, GroupedExperts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(p, 0.0, std)
            if isinstance(m, Router):
                m.e_score_correction_bias.zero_()
            if isinstance(m, RMSNorm):
                m.reset_parameters()

    def set_activation_checkpointing(self, mode: str) -> None:
        """none | full (recompute each block in backward) | selective (recompute only the attention core)."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation checkpointing {mode!r}: use none, full or selective")
        self.activation_checkpointing = mode
        for m in self.modules():
            if hasattr(m, "recompute_core"):
                m.recompute_core = mode == "selective"

    def compile_blocks(self, **kwargs) -> None:
        """``torch.compile`` each transformer block (main layers and MTP blocks) in place: regional compilation.

        Identical blocks share one compiled graph, so compiling costs about one block, not the model. Fuses the
        elementwise work around the GEMMs (RMSNorm, RoPE, SwiGLU, routing); the grouped expert GEMMs stay eager
        (``moe._grouped_swiglu``). Numbers change only by float reassociation. Measured in bench/results.md.
        """
        for block in [*self.layers, *(m.block for m in self.mtp)]:
            block.compile(**kwargs)

    def _run(self, module: nn.Module, *args):
        if self.activation_checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def blocks(self) -> list[tuple[int, nn.Module]]:
        """(global layer index, block) of the transformer layers this model holds: all of them, or a pipeline
        stage's slice (``parallel.pipeline`` keeps ``layers`` as a ModuleDict keyed by the global index, so the
        state-dict names stay the plain model's)."""
        if isinstance(self.layers, nn.ModuleDict):
            return [(int(i), block) for i, block in self.layers.items()]
        return list(enumerate(self.layers))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, cache=None):
        """input_ids (B, T); labels (B, T) or None (-100 = ignore); position_ids (B, T) or None; document_ids (B, T)
        or None: equal = same document, tokens attend only within their document and positions restart at each
        (unless position_ids are given); hidden_states (B, T, H): a pipeline stage's input instead of the
        embedding; cache: per-layer KV caches indexed by layer (decoding, ``pretrain.generate``).

        Returns logits (B, T, V) when labels is None (MTP never runs), else a ModelOutput (MTP in training mode
        only). A pipeline stage without the head (``norm is None``) returns a ModelOutput with ``hidden_states``.
        """
        if position_ids is None:
            position_ids = (positions_in_documents(document_ids) if document_ids is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0))
        h = self.embed_tokens(input_ids) if hidden_states is None else hidden_states
        cos, sin = self.rotary(position_ids, h.dtype)
        exempt = exempt_sequences(input_ids) if self.training else None  # token dropping (V2), training only
        stats = []
        for i, layer in self.blocks():
            if cache is not None:  # decoding: no checkpointing, the layer's cache is updated in place
                h, s = layer(h, cos, sin, document_ids, cache[i])
            else:
                h, s = self._run(layer, h, cos, sin, document_ids, None, exempt)
            stats.append(s)
        if self.norm is None:  # a pipeline stage before the last
            return self._collect_moe_stats(ModelOutput(hidden_states=h), stats, h)
        if labels is None:
            return self.lm_head(self.norm(h))
        lm_loss, logits = self.head_loss(self.norm(h), labels)
        out = ModelOutput(lm_loss=lm_loss, logits=logits)
        for k, module in enumerate(self.mtp if self.training else (), start=1):
            # Depth k sees the embedding of token i+k and predicts token i+k+1 = labels[i+k]. Rolling wraps the
            # last k positions; causal attention keeps them from the others and their labels are ignored.
            emb = self.embed_tokens(torch.roll(input_ids, -k, dims=1))
            h, s = self._run(module, h, emb, cos, sin, document_ids, None, exempt)
            stats.append(s)
            out.mtp_losses.append(self.head_loss(module.norm(h), mtp_labels(labels, k, document_ids))[0])
        return self._collect_moe_stats(out, stats, h)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normed hidden states (B, T, H), labels (B, T) -> (mean CE over non-ignored labels, logits or None).

        With the plain head and loss (``LMHead``, ``loss_fn`` = ``cross_entropy_loss``) the fused chunked
        linear-cross-entropy runs and no logits exist (pretrain/model/head.py); a replaced head or loss (tensor
        parallelism's vocab-parallel pair, a test's probe) gets the logits through ``loss_fn`` as before."""
        if self.loss_fn is cross_entropy_loss and type(self.lm_head) is LMHead:
            return token_mean(self.lm_head(h, labels=labels), labels), None
        logits = self.lm_head(h)
        return self.loss_fn(logits, labels), logits

    def _collect_moe_stats(self, out: ModelOutput, stats: list, h: torch.Tensor) -> ModelOutput:
        """Stack the MoE layers' loads into ``out.expert_load`` (L, E) and sum each term over the layers."""
        stats = [s for s in stats if s is not None]
        if not stats:
            out.expert_load = h.new_zeros(0, self.config.n_routed_experts, dtype=torch.float32)
            out.moe_terms = {"seq_aux": h.new_zeros((), dtype=torch.float32),
                             "expert_aux": h.new_zeros((), dtype=torch.float32)}
            return out
        out.expert_load = torch.stack([s["load"] for s in stats])
        out.moe_terms = {name: torch.stack([s[name] for s in stats]).sum() for name in stats[0] if name != "load"}
        return out


def build_model(cfg) -> DeepSeekModel:
    """Build the model for a ``ModelConfig`` (plain nn.Module, fp32, on the current default device)."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is null: it is resolved from the training shards' tokenizer by "
                         "pretrain.preflight (pretrain.train); set model.vocab_size to build the model directly")
    return DeepSeekModel(cfg)

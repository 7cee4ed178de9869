"""Model size, training FLOPs per token and per-rank memory: ``python -m pretrain.info``.

    python -m pretrain.info --config deepseek-v3 [--tp N --pp N --ep N --dp N] [--json] [--schedule] [--plot FILE.png]
                            [section.key=value ...]

Conventions (the table and the JSON say the same):

* **Parameters** are counted on the real model built on the meta device (no memory, seconds for 671B),
  classified by module path; ``analytic_inventory`` computes the same inventory from ``ModelConfig`` alone
  and a test keeps the two equal. ``total_params`` is the main model (the published 671B for V3);
  ``mtp_params`` are the MTP modules' *unique* parameters, i.e. without the embedding and output head
  they share with the main model (DeepSeek's "11.5B unique MTP parameters" for V3).
  ``active_params`` (per token) follow the papers: every non-expert parameter of the main model except
  the input-embedding lookup, the output head included, plus ``top_k / n_routed`` of the routed experts
  (V3: 36.6B, DeepSeek's README_WEIGHTS figure "including 0.9B for the output head"). ``mtp_active_params``
  counts the shared head once per depth, as DeepSeek does ("1.5B including 0.9B for the output head";
  ours is 1.6B: DeepSeek's figure seems to leave out the 0.1B ``eh_proj``).
* **FLOPs per token** follow Megatron-LM's ``num_floating_point_operations`` (training.py): 2 FLOPs per
  multiply-add, every GEMM run 3 times (forward, data gradient, weight gradient), causal attention counted
  as half the ``s x s`` score and value products, the logits GEMM counted, the embedding lookup, norms and
  router GEMM not counted (except the few norm terms Megatron keeps for MLA/MTP). MTP depth k costs one
  more transformer block, its ``2h -> h`` projection and one more logits GEMM; it is reported separately.
* **Memory per rank** (see ``memory_per_rank``): weights, gradients and AdamW states under ZeRO over the
  data-parallel group (dense) / expert-data-parallel group of size dp/ep (routed experts), plus an
  activation estimate for one stage of a 1F1B pipeline; the reported figure is the max over stages.
* **The recipe** (``--schedule``, ``--plot FILE.png``): ``pretrain.schedule.schedule_phases`` cut wherever the LR
  shape, the batch ramp, MTP lambda or the bias gamma change, for the layout's dp (the ramp's increment).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from pretrain.config import Config, ConfigError, ModelConfig, load_config

# A parameter inventory maps (group, kind) -> number of parameters.
#   group: "embed", "layer.<i>", "norm" (final), "head", "mtp.<k>"
#   kind:  "tp" (split by tensor parallelism), "replicated" (norms, router, MLA down-projections),
#          "expert" (routed experts: split by expert parallelism only)
Inventory = Counter

# Module-path components whose parameters stay whole on every tensor-parallel rank: norms, the router,
# and MLA's low-rank down-projections (megatron-core builds those "duplicated").
_REPLICATED = {"input_layernorm", "post_attention_layernorm", "q_a_layernorm", "kv_a_layernorm", "norm",
               "enorm", "hnorm", "gate", "q_a_proj", "kv_a_proj_with_mqa"}


# ------------------------------------------------------------------------------------ parameter inventory

def _attention_inventory(m: ModelConfig) -> Counter:
    """Parameters of one attention block by kind (no biases, as in the DeepSeek/LLaMA models)."""
    h, n = m.hidden_size, m.num_attention_heads
    inv = Counter()
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            inv["tp"] += h * n * qk                                   # q_proj
        else:
            inv["replicated"] += h * m.q_lora_rank + m.q_lora_rank    # q_a_proj, q_a_layernorm
            inv["tp"] += m.q_lora_rank * n * qk                       # q_b_proj
        inv["replicated"] += h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # kv_a_proj_with_mqa, norm
        inv["tp"] += m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)          # kv_b_proj
        inv["tp"] += n * m.v_head_dim * h                                               # o_proj
    else:
        d = m.attn_head_dim
        inv["tp"] += h * d * (n + 2 * m.kv_heads) + n * d * h        # q, k, v, o
    return inv


def _block_inventory(m: ModelConfig, moe: bool) -> Counter:
    """Parameters of one transformer block (norms, attention, dense FFN or MoE) by kind."""
    h = m.hidden_size
    inv = _attention_inventory(m)
    inv["replicated"] += 2 * h                                        # input/post-attention RMSNorm
    if moe:
        inv["replicated"] += m.n_routed_experts * h                   # router weight (E, H)
        inv["expert"] += m.n_routed_experts * 3 * h * m.moe_intermediate_size
        inv["tp"] += m.n_shared_experts * 3 * h * m.moe_intermediate_size
    else:
        inv["tp"] += 3 * h * m.intermediate_size                      # SwiGLU gate, up, down
    return inv


def _layer_is_moe(m: ModelConfig, i: int) -> bool:
    return m.is_moe and i >= m.first_k_dense_replace


def analytic_inventory(m: ModelConfig) -> Inventory:
    """The parameter inventory computed from the config alone (must equal ``meta_inventory``)."""
    inv = Counter()
    inv["embed", "tp"] = m.vocab_size * m.hidden_size
    for i in range(m.num_hidden_layers):
        for kind, count in _block_inventory(m, _layer_is_moe(m, i)).items():
            inv[f"layer.{i}", kind] = count
    inv["norm", "replicated"] = m.hidden_size
    if not m.tie_word_embeddings:
        inv["head", "tp"] = m.vocab_size * m.hidden_size
    h = m.hidden_size
    mtp_moe = _layer_is_moe(m, m.num_hidden_layers - 1)               # MTP blocks follow the last layer's kind
    for k in range(m.num_nextn_predict_layers):
        block = _block_inventory(m, mtp_moe)
        block["replicated"] += 3 * h                                  # enorm, hnorm, final norm
        block["tp"] += 2 * h * h                                      # eh_proj
        for kind, count in block.items():
            inv[f"mtp.{k}", kind] = count
    return +inv


def classify(name: str) -> tuple[str, str]:
    """(group, kind) of a parameter from its module path, e.g. ``layers.3.mlp.experts.gate_proj``."""
    parts = name.split(".")
    if parts[0] in ("model", "module"):                               # tolerate a wrapper prefix
        parts = parts[1:]
    if parts[0] == "embed_tokens":
        group = "embed"
    elif parts[0] == "lm_head":
        group = "head"
    elif parts[0] in ("layers", "mtp"):
        group = f"{parts[0].rstrip('s')}.{parts[1]}"
    elif parts[0] == "norm":
        group = "norm"
    else:
        raise ValueError(f"pretrain.info: cannot place parameter {name!r}; update pretrain.info.classify")
    if "experts" in parts[:-1]:
        kind = "expert"
    elif group == "embed" or group == "head":
        kind = "tp"
    elif _REPLICATED.intersection(parts[2:-1]) or (group == "norm"):
        kind = "replicated"
    else:
        kind = "tp"
    return group, kind


def meta_inventory(m: ModelConfig) -> Inventory:
    """The parameter inventory of the real model built on the meta device (no memory is allocated)."""
    import torch
    from pretrain.model import build_model

    with torch.device("meta"):
        model = build_model(m)
    inv = Counter()
    for name, p in model.named_parameters():                          # shared embed/head appear once
        inv[classify(name)] += p.numel()
    return inv


def inventory(m: ModelConfig, source: str = "meta") -> tuple[Inventory, str]:
    """(inventory, source used): ``meta`` counts the model built on the meta device, ``analytic`` the formulas
    (tests check that both agree)."""
    if source not in ("meta", "analytic"):
        raise ValueError(f"source={source!r}: use meta or analytic")
    if source == "meta":
        return meta_inventory(m), "meta"
    return analytic_inventory(m), "analytic"


def summarize(m: ModelConfig, inv: Inventory) -> dict:
    """Totals from an inventory: main model, activated per token, MTP (unique), embedding, head."""
    frac = m.num_experts_per_tok / m.n_routed_experts if m.is_moe else 0.0
    main = {k: v for k, v in inv.items() if not k[0].startswith("mtp.")}
    mtp = {k: v for k, v in inv.items() if k[0].startswith("mtp.")}

    def active(items: dict) -> float:
        return sum(v * (frac if kind == "expert" else 1.0) for (g, kind), v in items.items() if g != "embed")

    embed = inv.get(("embed", "tp"), 0)
    head = inv.get(("head", "tp"), 0)
    tied_head = embed if m.tie_word_embeddings else 0                 # a tied head is used as a GEMM too
    depth = m.num_nextn_predict_layers
    return {
        "total_params": sum(main.values()),
        "active_params": int(round(active(main))) + tied_head,
        "mtp_params": sum(mtp.values()),
        "mtp_active_params": int(round(active(mtp))) + depth * (head or embed),  # each depth runs the shared head
        "total_params_with_mtp": sum(inv.values()),
        "embedding_params": embed,
        "head_params": head,
        "routed_expert_params": sum(v for (g, kind), v in main.items() if kind == "expert"),
    }


def count_params(model_cfg: ModelConfig, source: str = "meta") -> dict:
    """Parameter counts of ``model_cfg``: ``total_params`` (main model), ``active_params`` (per token,
    input embedding excluded, head included), ``mtp_params`` (unique MTP parameters, shared
    embedding/head excluded), ``mtp_active_params`` (per token, the shared head included once per depth),
    ``total_params_with_mtp``, ``embedding_params``, ``head_params``, ``routed_expert_params`` and
    ``param_source`` (meta or analytic)."""
    inv, used = inventory(model_cfg, source)
    return {**summarize(model_cfg, inv), "param_source": used}


# ------------------------------------------------------------------------------------------ FLOPs

def _attention_flops_fwd(m: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one attention block, as Megatron counts them (2 per multiply-add;
    causal: half of the QK^T and attention-times-V products)."""
    h, n, s = m.hidden_size, m.num_attention_heads, seq_length
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            q_term = h * n * qk
        else:
            q_term = m.q_lora_rank * (h + n * qk + 1)                 # q_a, q_b (+ q norm)
        macs = (q_term
                + m.kv_lora_rank * (h + n * (m.qk_nope_head_dim + m.v_head_dim) + 1)  # kv_a latent, kv_b, norm
                + h * m.qk_rope_head_dim                              # shared rope key
                + n * m.v_head_dim * h                                # o_proj
                + s * n * qk / 2 + s * n * m.v_head_dim / 2)          # causal core attention
    else:
        d = m.attn_head_dim
        q, kv = n * d, m.kv_heads * d
        macs = h * (q + 2 * kv) + q * s / 2 * 2 + q * h
    return 2.0 * macs


def _ffn_flops_fwd(m: ModelConfig, moe: bool) -> float:
    """Forward FLOPs per token of one SwiGLU FFN or MoE layer (top-k routed + shared experts; the
    router GEMM is not counted, as in Megatron)."""
    width = (m.num_experts_per_tok + m.n_shared_experts) * m.moe_intermediate_size if moe else m.intermediate_size
    return 2.0 * 3 * m.hidden_size * width


def flops_breakdown(model_cfg: ModelConfig, seq_length: int) -> dict:
    """Training FLOPs per token (forward + backward = 3x forward): ``main`` and ``mtp`` (all D depths)."""
    m, h = model_cfg, model_cfg.hidden_size
    attn = _attention_flops_fwd(m, seq_length)
    layers = sum(attn + _ffn_flops_fwd(m, _layer_is_moe(m, i)) for i in range(m.num_hidden_layers))
    logits = 2.0 * h * m.vocab_size
    mtp_block = attn + _ffn_flops_fwd(m, _layer_is_moe(m, m.num_hidden_layers - 1))
    mtp_depth = mtp_block + 2.0 * (3 * h + 2 * h * h) + logits       # block, (norms +) eh_proj, logits
    return {"main": 3.0 * (layers + logits), "mtp": 3.0 * m.num_nextn_predict_layers * mtp_depth}


def flops_per_token(model_cfg: ModelConfig, seq_length: int, include_mtp: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at ``seq_length``, Megatron's convention; for MFU
    multiply by tokens per second and divide by the device peak."""
    f = flops_breakdown(model_cfg, seq_length)
    return f["main"] + (f["mtp"] if include_mtp else 0.0)


# ----------------------------------------------------------------------------------- memory per rank

def validate_layout(m: ModelConfig, tp: int, pp: int, ep: int, dp: int, pipeline_layout=None) -> None:
    """One-line ``ConfigError`` naming every degree and the key, for a layout the model cannot be cut into: the
    trainer's own checks (``parallel.topology``: ``Topology`` for the degrees, ``check_layout`` for the model)."""
    from parallel.topology import Topology, check_layout

    for key, v in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--dp", dp)):
        if v < 1:
            raise ConfigError(f"{key}={v}: must be >= 1")
    topo = Topology(world_size=tp * pp * dp, tp=tp, pp=pp, ep=ep)
    check_layout(m, topo)
    if pipeline_layout is not None and (len(pipeline_layout) != pp or sum(pipeline_layout) != m.num_hidden_layers):
        topo.fail(f"parallel.pipeline_layout={list(pipeline_layout)} needs pp={pp} entries summing to "
                  f"model.num_hidden_layers={m.num_hidden_layers}", "fix parallel.pipeline_layout or set it to null")


def stage_of_layers(num_layers: int, pp: int, pipeline_layout=None) -> list[int]:
    """Pipeline stage of each layer: ``pipeline_layout`` if given, else an even split with the
    remainder on the first stages."""
    sizes = list(pipeline_layout) if pipeline_layout else [num_layers // pp + (s < num_layers % pp)
                                                           for s in range(pp)]
    return [s for s, size in enumerate(sizes) for _ in range(size)]


def partition_balanced(weights: list[float], num_parts: int) -> list[int]:
    """DeepSpeed's ``runtime.utils.partition_balanced`` (the linear partition problem: contiguous parts whose
    largest minus smallest weight is least, ties to the later cut), vectorised over the cut position; without
    DeepSpeed's ~4 s import. Returns the num_parts + 1 part bounds over the items."""
    import numpy as np

    n, m = len(weights), num_parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    dp_max, dp_min, dp_cost = (np.full((n + 1, m + 1), np.inf) for _ in range(3))
    position = np.zeros((n + 1, m + 1), dtype=int)
    dp_max[0, 0] = dp_cost[0, 0] = 0
    for i in range(1, n + 1):
        last = prefix[i] - prefix[:i]  # weight of items k..i-1 for every cut k < i
        for j in range(1, min(i, m) + 1):
            hi, lo = np.maximum(dp_max[:i, j - 1], last), np.minimum(dp_min[:i, j - 1], last)
            cost = hi - lo
            k = i - 1 - int(np.argmin(cost[::-1]))  # the last k reaching the least cost (DeepSpeed's >=)
            dp_cost[i, j], dp_max[i, j], dp_min[i, j], position[i, j] = cost[k], hi[k], lo[k], k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(int(position[parts[-1], j]))
    return parts[::-1]


def pipeline_stages(cfg: Config, inv: Inventory, pp: int, tp: int = 1, ep: int = 1) -> list[int]:
    """Pipeline stage of each layer as the trainer cuts it (``parallel.pipeline.stage_bounds``):
    ``parallel.pipeline_layout`` if set for ``pp``, else DeepSpeed's balanced partition of this rank's parameter
    counts over [embedding, each block, final norm + head + MTP]."""
    m, layout = cfg.model, _pipeline_layout(cfg, pp)
    if layout is not None or pp == 1:
        return stage_of_layers(m.num_hidden_layers, pp, layout)
    local = Counter()
    for (group, kind), v in inv.items():
        local[group if group.startswith("layer.") or group == "embed" else "tail"] += v / {
            "tp": tp, "expert": ep}.get(kind, 1)
    weights = [local["embed"]] + [local[f"layer.{i}"] for i in range(m.num_hidden_layers)] + [local["tail"]]
    bounds = [min(max(p - 1, 0), m.num_hidden_layers) for p in partition_balanced(weights, pp)]
    bounds[0], bounds[-1] = 0, m.num_hidden_layers
    return [s for s in range(pp) for _ in range(bounds[s], bounds[s + 1])]


def _pipeline_layout(cfg: Config, pp: int) -> list | None:
    """``parallel.pipeline_layout`` when it is for ``pp`` stages (``--pp`` may override it), else None."""
    layout = cfg.parallel.pipeline_layout
    return layout if layout is not None and len(layout) == pp else None


def _group_stage(group: str, layer_stage: list[int], pp: int) -> int:
    """Embedding on the first stage; final norm, head and MTP modules on the last (as Megatron)."""
    if group == "embed":
        return 0
    if group.startswith("layer."):
        return layer_stage[int(group.split(".")[1])]
    return pp - 1


def _layer_activation_elems(m: ModelConfig, moe: bool, tp: int, selective: bool) -> tuple[float, float]:
    """(activation-dtype elements, fp32 elements) autograd saves per token for one block of
    ``pretrain.model`` without full recomputation (checked against the saved tensors in the tests).

    RMSNorm of width w keeps its input upcast to fp32, the normalised and the scaled output (w fp32 +
    2w); the block's two norms are whole on every tensor-parallel rank (no sequence parallelism). MLA
    keeps its query/latent norms (replicated); attention keeps q, k, v (split by tp; SDPA stores no
    s x s matrix with flash-style kernels, only an fp32 log-sum-exp per head; CPU bf16 falls back to the
    math kernel, which does), SDPA's output and o_proj's input (2 x n*v).
    SwiGLU keeps gate, up, silu(gate) and their product (4 x width, split by tp). MoE keeps the fp32
    router input and scores (the router runs on every row), 3 k*h (dispatched tokens, expert output, weighted
    output) and the routed experts' 4 k*I, for 1/tp of the token rows (``parallel.expert`` splits them over TP).
    ``selective`` recomputes MLA's per-head key/value
    expansion with the core (as ``pretrain.model`` does): k and v are not kept; mha/gqa are unchanged."""
    h, n = m.hidden_size, m.num_attention_heads
    elems, fp32 = 4.0 * h, 2.0 * h + n / tp                           # two block norms; log-sum-exp
    if m.attention == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q_rank = m.q_lora_rank or 0
        elems += 2 * q_rank + 2 * m.kv_lora_rank
        fp32 += q_rank + m.kv_lora_rank + m.qk_rope_head_dim          # norm inputs (the kv one with its rope key)
        elems += (n * qk + 2 * n * v + (0 if selective else n * qk + n * v)) / tp
    else:
        d = m.attn_head_dim
        elems += (n * d + 2 * m.kv_heads * d + 2 * n * d) / tp
    if moe:
        k, inter = m.num_experts_per_tok, m.moe_intermediate_size
        fp32 += h + m.n_routed_experts
        elems += (3 * k * h + 4 * k * inter + 4 * m.n_shared_experts * inter) / tp  # routed: 1/tp of the rows
    else:
        elems += 4 * m.intermediate_size / tp
    return elems, fp32


def _stage_activation_bytes(cfg: Config, stage: int, layers: list[int], tp: int, pp: int, dp: int) -> dict:
    """Activation bytes of one pipeline stage at its peak: ``saved`` (kept for backward by all
    micro-batches in flight; 1F1B: stage s holds pp - s of them) and ``transient`` (alive once: the
    block being recomputed under full checkpointing, the head's largest temporaries).

    Full checkpointing keeps each block's input only (an MTP block: its embedding; its hidden is counted). The
    last stage keeps, for its one micro-batch, the final norms (3h each), per head (main and MTP) either
    the fused head's dL/dh and weight-sized dL/dW (tp = pp = 1; transient: the fp32 dL/dW accumulator and
    one fp32 logits chunk with its softmax) or the fp32 log-probabilities (vocab split by tp), and per
    MTP depth its two input norms, the 2h concatenation and the block."""
    m, t = cfg.model, cfg.train
    tokens, h = t.micro_batch_size * cfg.data.seq_length, m.hidden_size
    act = 2 if t.precision == "bf16" else 4
    full, selective = t.activation_checkpointing == "full", t.activation_checkpointing == "selective"
    in_flight = min(pp - stage, max(1, t.global_batch_size // (t.micro_batch_size * dp)))

    def block_bytes(i: int) -> float:
        e, e32 = _layer_activation_elems(m, _layer_is_moe(m, i), tp, selective)
        return tokens * (e * act + e32 * 4)

    norm = tokens * h * (2 * act + 4)                                 # one h-wide RMSNorm
    kept = [tokens * h * act if full else block_bytes(i) for i in layers]
    saved, transient = in_flight * sum(kept), (max(map(block_bytes, layers), default=0.0) if full else 0.0)
    if stage == pp - 1:
        depth, last = m.num_nextn_predict_layers, m.num_hidden_layers - 1
        if tp == 1 and pp == 1:  # fused head (pretrain/model/head.py): dL/dh and a weight-sized dL/dW per head
            from pretrain.model.head import chunk_tokens
            saved += (1 + depth) * (norm + tokens * h * act + m.vocab_size * h * act)
            head = m.vocab_size * h * 4 + 2 * min(tokens, chunk_tokens(m.vocab_size)) * m.vocab_size * 4
        else:  # logits through loss_fn: fp32 log-probabilities kept, the logits alive before the upcast
            saved += (1 + depth) * (norm + tokens * m.vocab_size / tp * 4)
            head = tokens * m.vocab_size / tp * act
        # full: an MTP block keeps its embedding input (its hidden input is the head norm's input, counted above)
        saved += depth * (tokens * h * act if full else block_bytes(last) + 2 * norm + 2 * tokens * h * act)
        transient = max(transient, head, block_bytes(last) if full and depth else 0.0)
    return {"saved": saved, "transient": transient}


def stage_param_counts(inv: Inventory, layer_stage: list[int], pp: int) -> list[Counter]:
    """Parameters of each pipeline stage by kind (``tp``, ``replicated``, ``expert``)."""
    counts = [Counter() for _ in range(pp)]
    for (group, kind), v in inv.items():
        counts[_group_stage(group, layer_stage, pp)][kind] += v
    return counts


def _deepspeed_zero(cfg: Config) -> dict:
    """The ``zero_optimization`` settings DeepSpeed will use (pretrain.engine sets the stage and reduce-to-owner)."""
    zero = dict((cfg.deepspeed or {}).get("zero_optimization") or {})
    return {"reduce_bucket_size": int(float(zero.get("reduce_bucket_size", 5e8))),
            "overlap_comm": bool(zero.get("overlap_comm", False)),
            "contiguous_gradients": bool(zero.get("contiguous_gradients", True)),
            "use_multi_rank_bucket_allreduce": bool(zero.get("use_multi_rank_bucket_allreduce", False))}


def _bytes_per_value(cfg: Config) -> tuple[int, int, int]:
    """(weight, gradient, optimizer-state) bytes per parameter: bf16 2/2 (or fp32 accumulation 4)/12, fp32 4/4/8."""
    wbytes = 2 if cfg.train.precision == "bf16" else 4
    accum = (cfg.deepspeed.get("data_types") or {}).get("grad_accum_dtype")
    gbytes = 4 if accum in ("fp32", "float32", "float") else wbytes
    return wbytes, gbytes, 12 if wbytes == 2 else 8


def stage_memory(cfg: Config, counts: Counter, stage: int, layers: list[int], tp: int, pp: int, ep: int,
                 dp: int) -> dict:
    """Bytes of one pipeline stage on one rank (see :func:`memory_per_rank`); ``counts`` from ``stage_param_counts``."""
    z = cfg.parallel.zero_stage
    wbytes, gbytes, obytes = _bytes_per_value(cfg)
    dense = counts["tp"] / tp + counts["replicated"]
    expert = counts["expert"] / ep
    edp = dp // ep
    row = {
        "stage": stage,
        "params_bytes": (dense + expert) * wbytes,
        "grads_bytes": (dense / (dp if z >= 2 else 1) + expert / (edp if z >= 2 else 1)) * gbytes,
        "optimizer_bytes": (dense / (dp if z >= 1 else 1) + expert / (edp if z >= 1 else 1)) * obytes,
        # ZeRO 1/2 reduce each rank's gradient partition into an fp32 copy the optimizer steps with
        "grad_partition_bytes": (dense / dp + expert / edp) * 4 if z >= 1 else 0,
        # ZeRO-2 under TP: the TP-split experts' deferred gradients wait in an fp32 shard (parallel.expert)
        "grad_shard_bytes": expert / tp * 4 if z >= 2 and tp > 1 else 0,
        "comm_buffers_bytes": _comm_buffer_bytes(cfg, dense + expert, gbytes, dp, pp),
    }
    acts = _stage_activation_bytes(cfg, stage, layers, tp, pp, dp)
    row["activations_bytes"] = acts["saved"] + acts["transient"]
    row["total_bytes"] = sum(v for k, v in row.items() if k.endswith("_bytes"))
    return {k: (int(v) if k != "stage" else v) for k, v in row.items()}


def _comm_buffer_bytes(cfg: Config, params: float, gbytes: int, dp: int, pp: int) -> float:
    """DeepSpeed's gradient-reduction buffers: ZeRO 1/2 allocates ``reduce_bucket_size`` elements whatever the model
    size (5e8 by default: 2 GB in fp32, 1 GB in bf16), twice with ``overlap_comm`` and twice under the pipeline
    engine (its ``reduce_gradients`` adds a second one while the backward hooks' is alive); ZeRO 0 flattens up to
    ``reduce_bucket_size`` gradients into one all-reduce buffer at the step (data parallelism only)."""
    zero = _deepspeed_zero(cfg)
    if cfg.parallel.zero_stage >= 1:
        copies = (2 if zero["overlap_comm"] else 1) + (1 if pp > 1 else 0)
        return zero["reduce_bucket_size"] * gbytes * copies * zero["contiguous_gradients"]
    return min(zero["reduce_bucket_size"], params) * gbytes if dp > 1 else 0.0


def memory_per_rank(cfg: Config, inv: Inventory, tp: int, pp: int, ep: int, dp: int) -> dict:
    """Bytes per rank for the layout, max over pipeline stages, with its breakdown.

    Weights: 2 B (bf16) or 4 B (fp32) per parameter. Gradients: in DeepSpeed's gradient-accumulation
    dtype (``deepspeed.data_types.grad_accum_dtype``, default the weight dtype). AdamW: fp32 master
    copy (bf16 only) and two fp32 moments, sharded (ZeRO >= 1) over the data-parallel group for dense
    parameters and over the expert-data-parallel group (dp / ep ranks) for routed experts; ZeRO-2 shards
    the gradients the same way. Dense parameters are split by tp (norms, router and MLA down-projections
    replicated); routed experts by ep only. Communication buffers: DeepSpeed's gradient-reduction buckets."""
    layer_stage = pipeline_stages(cfg, inv, pp, tp, ep)
    counts = stage_param_counts(inv, layer_stage, pp)
    stages = [stage_memory(cfg, counts[s], s, [i for i, st in enumerate(layer_stage) if st == s], tp, pp, ep, dp)
              for s in range(pp)]
    worst = max(stages, key=lambda r: r["total_bytes"])
    return {"memory_per_rank_bytes": worst["total_bytes"], "memory_breakdown": worst, "memory_per_stage": stages,
            "layout": {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "world": tp * pp * dp,
                       "zero_stage": cfg.parallel.zero_stage}}


# ------------------------------------------------------------------------------------- bytes per rank

def _ring(kind: str, p: int) -> float:
    """Bytes on the wire per byte of payload for one rank, bandwidth-optimal (ring) algorithms."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p if kind == "all_reduce" else (p - 1) / p


_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "p2p")


def comm_bytes_per_rank(cfg: Config, inv: Inventory, tp: int, pp: int, ep: int, dp: int,
                        minimum: bool = False) -> dict:
    """Collective bytes one rank of the busiest pipeline stage sends in one training step, by kind (what
    ``pretrain.profiling`` counts), plus ``total``; :func:`comm_bytes_by_group` says over which group."""
    groups = comm_bytes_by_group(cfg, inv, tp, pp, ep, dp, minimum)
    out = {k: sum(g.get(k, 0.0) for g in groups.values()) for k in _KINDS}
    out["total"] = sum(out.values())
    return out


def comm_bytes_by_group(cfg: Config, inv: Inventory, tp: int, pp: int, ep: int, dp: int,
                        minimum: bool = False, layer_stage: list[int] | None = None) -> dict:
    """{"tp"|"ep"|"dp"|"pp": {kind: bytes}} one rank of the busiest stage sends in one step, ring algorithms
    (``_ring``). As implemented (``minimum=False``), or the layout's analytic minimum:

    - TP, per micro-batch and block: the forward all-reduces of o_proj and the FFN/shared-expert output and the
      backward all-reduces of each column-parallel layer's input gradient (MLA: the query and key/value latents
      and the shared RoPE key); the routed experts' rows all-gathered after the combine and their gradient
      all-gathered in backward; the embedding's forward and each head's backward all-reduce. Full recomputation
      repeats the forward ones. As implemented, the replicated experts' weight gradients are also summed over TP
      (``parallel.expert``: once per step; under ZeRO-2 a reduce-scatter per micro-batch and one all-gather);
      the minimum folds that sum into the expert-data-parallel reduction (over TP x dp / ep ranks).
    - EP, per MoE layer and micro-batch: dispatch and combine, forward and backward, of this rank's rows' k copies,
      the (ep - 1) / ep sent to other ranks under balanced routing.
    - DP/ZeRO: ZeRO 0 all-reduces the gradients; ZeRO 1/2 reduce each partition to its owner (pretrain.engine sets
      ``use_multi_rank_bucket_allreduce`` false), the minimum: a reduce-scatter, then the parameter all-gather;
      with DeepSpeed's default (true) they all-reduce the whole gradient instead. ZeRO-2 reduces every micro-batch's gradients (it keeps only
      its partition). Experts over the expert-data-parallel group (dp / ep).
    - PP: one activation per micro-batch per stage boundary forward and its gradient backward; with MTP (or a tied
      head) the embedding's gradient all-reduced between the first and the last stage.
    """
    layer_stage = layer_stage or pipeline_stages(cfg, inv, pp, tp, ep)  # ``pipeline_stages`` (the planner caches it)
    counts = stage_param_counts(inv, layer_stage, pp)
    rows = [_stage_comm(cfg, counts[s], s, [i for i, st in enumerate(layer_stage) if st == s], (tp, pp, ep, dp),
                        minimum) for s in range(pp)]
    return max(rows, key=lambda r: sum(sum(g.values()) for g in r.values()))


def _stage_comm(cfg: Config, counts: Counter, s: int, layers: list[int], layout: tuple, minimum: bool) -> dict:
    m, t = cfg.model, cfg.train
    tp, pp, ep, dp = layout
    h, tokens = m.hidden_size, t.micro_batch_size * cfg.data.seq_length
    act = 2 if t.precision == "bf16" else 4
    wbytes, gbytes, _ = _bytes_per_value(cfg)
    micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    fwd_repeat = 2 if t.activation_checkpointing == "full" else 1
    blocks = [_layer_is_moe(m, i) for i in layers]
    if s == pp - 1:
        blocks += [_layer_is_moe(m, m.num_hidden_layers - 1)] * m.num_nextn_predict_layers
    moe_blocks = sum(blocks)
    dense, expert = counts["tp"] / tp + counts["replicated"], counts["expert"] / ep
    row = {"tp": {}, "ep": {}, "dp": {}, "pp": {}}
    if tp > 1:
        ar = sum(fwd_repeat * 2 * tokens * h + _column_input_elems(m, moe, tokens) for moe in blocks)
        heads = 1 + m.num_nextn_predict_layers if s == pp - 1 else 0
        ar += (tokens * h if s == 0 else 0) + heads * (tokens * h + 3 * tokens)  # embedding; head + CE
        # the replicated experts' weight gradients: summed over TP at the accumulation boundary (the pipeline's last
        # backward); under ZeRO-2, which takes the gradients away each micro-batch, each micro-batch's are
        # reduce-scattered over TP into a per-rank shard and the total all-gathered once (parallel.expert)
        shard_sync = not minimum and cfg.parallel.zero_stage >= 2
        syncs = 0 if minimum or shard_sync else 1
        row["tp"]["all_reduce"] = _ring("all_reduce", tp) * (micro * ar * act + syncs * expert * gbytes)
        row["tp"]["all_gather"] = micro * _ring("all_gather", tp) * moe_blocks * (
            (fwd_repeat + 1) * tokens * h * act + tokens * m.num_experts_per_tok * 4)
        if shard_sync:
            row["tp"]["reduce_scatter"] = micro * _ring("reduce_scatter", tp) * expert * gbytes
            row["tp"]["all_gather"] += _ring("all_gather", tp) * expert * gbytes
    if ep > 1:
        copies = tokens / tp * m.num_experts_per_tok * moe_blocks
        row["ep"]["all_to_all"] = micro * (2 * fwd_repeat + 2) * copies * h * act * (ep - 1) / ep
    expert_group = dp // ep * (tp if minimum else 1)  # the minimum folds the TP sum into the expert reduction
    reductions = micro if cfg.parallel.zero_stage == 2 else 1  # ZeRO-2 keeps no full gradient: every micro-batch
    zero_all_reduces = _deepspeed_zero(cfg)["use_multi_rank_bucket_allreduce"] and not minimum
    if cfg.parallel.zero_stage == 0 or zero_all_reduces:
        row["dp"]["all_reduce"] = reductions * (_ring("all_reduce", dp) * dense
                                                + _ring("all_reduce", expert_group) * expert) * gbytes
    else:
        row["dp"]["reduce_scatter"] = reductions * (_ring("reduce_scatter", dp) * dense
                                                    + _ring("reduce_scatter", expert_group) * expert) * gbytes
    if cfg.parallel.zero_stage >= 1:
        row["dp"]["all_gather"] = (_ring("all_gather", dp) * dense
                                   + _ring("all_gather", expert_group) * expert) * wbytes
    if pp > 1:  # an activation forward and its gradient backward per micro-batch and boundary
        row["pp"]["p2p"] = ((s > 0) + (s < pp - 1)) * micro * tokens * h * act
        if (m.num_nextn_predict_layers or m.tie_word_embeddings) and s in (0, pp - 1):
            row["pp"]["all_reduce"] = _ring("all_reduce", 2) * m.vocab_size / tp * h * gbytes
    return row


def _column_input_elems(m: ModelConfig, moe: bool, tokens: int) -> float:
    """Elements of the input gradients the column-parallel layers of one block all-reduce in backward."""
    if m.attention == "mla":
        attn = (m.q_lora_rank or m.hidden_size) + m.kv_lora_rank + m.qk_rope_head_dim
    else:
        attn = 3 * m.hidden_size  # q, k and v each all-reduce their (shared) input's gradient
    ffn = 2 * m.hidden_size if (not moe or m.n_shared_experts > 0) else 0  # gate and up
    return tokens * (attn + ffn)


# ------------------------------------------------------------------------------------------- report

def kv_cache_per_token(m: ModelConfig, bytes_per_value: int = 2) -> dict:
    """Decoding cache per token, summed over the layers (pretrain/model/kv_cache.py holds exactly this).

    MLA caches the normalised latent and the shared RoPE key, (kv_lora_rank + qk_rope_head_dim) per layer; mha/gqa
    keys and values of the kv heads, 2 x kv_heads x head_dim. "MHA of the same heads" is DeepSeek-V2's Table 1
    baseline 2 n_h d_h per layer (MLA: keys of qk_nope_head_dim and values of v_head_dim per head). MLA models are
    also compared with DeepSeek 67B's GQA cache (95 layers x 2 x 8 kv heads x 128), V2's baseline: -82.2% for V2.
    """
    layers = m.num_hidden_layers
    if m.attention == "mla":
        per_layer = m.kv_lora_rank + m.qk_rope_head_dim
        mha_per_layer = m.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
    else:
        per_layer = 2 * m.kv_heads * m.attn_head_dim
        mha_per_layer = 2 * m.num_attention_heads * m.attn_head_dim
    out = {"kv_cache_values_per_token": layers * per_layer,
           "kv_cache_bytes_per_token": layers * per_layer * bytes_per_value,
           "kv_cache_mha_values_per_token": layers * mha_per_layer,
           "kv_cache_vs_mha": per_layer / mha_per_layer}
    if m.attention == "mla":
        gqa_67b = 95 * 2 * 8 * 128
        out["kv_cache_vs_deepseek_67b_gqa"] = layers * per_layer / gqa_67b - 1
    return out


def model_info(cfg: Config, tp: int | None = None, pp: int | None = None, ep: int | None = None,
               dp: int | None = None, source: str = "meta") -> dict:
    """Everything ``python -m pretrain.info --json`` prints. Unset degrees come from ``cfg.parallel``;
    ``dp`` defaults to ``ep`` (the smallest data-parallel size the layout allows)."""
    p = cfg.parallel
    tp, pp, ep = tp or p.tp, pp or p.pp, ep or p.ep
    dp = dp or ep
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is null (the trainer takes it from the shards' tokenizer): give "
                          "model.vocab_size=N to size the model here")
    validate_layout(cfg.model, tp, pp, ep, dp, _pipeline_layout(cfg, pp))
    inv, used = inventory(cfg.model, source)
    seq = cfg.data.seq_length
    flops = flops_breakdown(cfg.model, seq)
    return {
        **summarize(cfg.model, inv),
        "param_source": used,
        "seq_length": seq,
        "flops_per_token": flops["main"] + flops["mtp"],
        "flops_per_token_main": flops["main"],
        "mtp_flops_per_token": flops["mtp"],
        "micro_batch_size": cfg.train.micro_batch_size,
        "precision": cfg.train.precision,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        **memory_per_rank(cfg, inv, tp, pp, ep, dp),
        "comm_bytes_per_rank": comm_bytes_per_rank(cfg, inv, tp, pp, ep, dp),  # one step, busiest stage
        "comm_bytes_minimum": comm_bytes_per_rank(cfg, inv, tp, pp, ep, dp, minimum=True),
        **kv_cache_per_token(cfg.model, 4 if cfg.train.precision == "fp32" else 2),
    }


def _fmt_count(n: float) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n / 1e6:,.2f} M"


def format_table(info: dict) -> str:
    """The human-readable report."""
    gib = 2 ** 30
    lay, br = info["layout"], info["memory_breakdown"]
    rows = [
        ("total parameters (main model)", _fmt_count(info["total_params"])),
        ("  embedding / output head", f"{_fmt_count(info['embedding_params'])} / {_fmt_count(info['head_params'])}"),
        ("  routed experts", _fmt_count(info["routed_expert_params"])),
        ("activated per token (no input embedding)", _fmt_count(info["active_params"])),
        ("MTP parameters (unique; shared embed/head excluded)", _fmt_count(info["mtp_params"])),
        ("MTP activated per token (with the shared head)", _fmt_count(info["mtp_active_params"])),
        (f"training GFLOP/token @ seq {info['seq_length']} (3x fwd, causal)", f"{info['flops_per_token'] / 1e9:,.2f}"),
        ("  main model", f"{info['flops_per_token_main'] / 1e9:,.2f}"),
        ("  MTP", f"{info['mtp_flops_per_token'] / 1e9:,.2f}"),
        (f"layout tp x pp x dp (ep) = world, ZeRO-{lay['zero_stage']}",
         f"{lay['tp']} x {lay['pp']} x {lay['dp']} ({lay['ep']}) = {lay['world']}"),
        (f"memory per rank, worst stage {br['stage']} ({info['precision']}, micro batch "
         f"{info['micro_batch_size']}, ckpt {info['activation_checkpointing']})",
         f"{info['memory_per_rank_bytes'] / gib:,.2f} GiB"),
    ]
    rows += [(f"  {k[:-6]}", f"{br[k] / gib:,.2f} GiB")
             for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")]
    rows += [("KV cache per token (values, all layers)", f"{info['kv_cache_values_per_token']:,}"),
             (f"  bytes ({info['precision']})", f"{info['kv_cache_bytes_per_token']:,}"),
             ("  MHA of the same heads (values)", f"{info['kv_cache_mha_values_per_token']:,}"),
             ("  vs MHA of the same heads", f"{info['kv_cache_vs_mha']:.2%}")]
    if "kv_cache_vs_deepseek_67b_gqa" in info:
        rows.append(("  vs DeepSeek 67B GQA (194,560 values)", f"{info['kv_cache_vs_deepseek_67b_gqa']:+.1%}"))
    width = max(len(r[0]) for r in rows)
    table = "\n".join(f"{a:<{width}}  {b:>16}" for a, b in rows)
    return f"{table}\n(parameters counted from the {info['param_source']} model)"


# ------------------------------------------------------------------------------------ the recipe (--schedule)

def _fmt_tokens(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:g}"


def _span(a: float, b: float, fmt: str) -> str:
    return fmt.format(a) if a == b else f"{fmt.format(a)} -> {fmt.format(b)}"


def format_schedule(cfg: Config, dp: int) -> str:
    """One line per phase of the run: tokens -> LR, batch, lambda, gamma (``schedule_phases``)."""
    from pretrain.schedule import schedule_phases, validate_schedule

    validate_schedule(cfg, dp)  # the ramp increment: micro batch x dp unless set
    m, moe = cfg.model, cfg.moe
    show_mtp, show_gamma = m.num_nextn_predict_layers > 0, m.is_moe and m.scoring_func == "sigmoid"
    header = ["tokens", "steps", "LR", "shape", "global batch"] + ["λ"] * show_mtp + ["γ"] * show_gamma
    rows = []
    for ph in schedule_phases(cfg):
        rows.append([f"{_fmt_tokens(ph['tokens_start'])} - {_fmt_tokens(ph['tokens_end'])}",
                     f"{ph['first_step']:,} - {ph['last_step']:,}", _span(ph["lr_start"], ph["lr_end"], "{:.3g}"),
                     ph["lr_shape"], _span(ph["batch_start"], ph["batch_end"], "{:,}")]
                    + [f"{ph['mtp_weight']:g}"] * show_mtp + [f"{ph['bias_update_speed']:g}"] * show_gamma)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    t = cfg.train
    notes = [f"schedule {cfg.schedule.name}, peak LR {cfg.optim.lr:g}, warmup {cfg.schedule.warmup_steps} steps, "
             f"sequence {cfg.data.seq_length}"]
    if t.batch_ramp_start is not None:
        notes.append(f"batch ramp {t.batch_ramp_start} -> {t.global_batch_size} over {_fmt_tokens(t.batch_ramp_tokens)}"
                     f" tokens in steps of {t.batch_ramp_increment} (micro batch {t.micro_batch_size} x dp {dp})")
    if m.is_moe:
        notes.append(f"balancing: sequence-wise alpha {moe.seq_aux_alpha:g}; expert-level alpha1 {moe.aux_loss_alpha:g},"
                     f" device-level alpha2 {moe.device_aux_alpha:g}, communication alpha3 {moe.comm_aux_alpha:g} "
                     f"over {m.n_group} devices, M = {m.topk_group}; token dropping: "
                     + ("none" if moe.capacity_factor is None else f"capacity factor {moe.capacity_factor:g}"))
    if m.rope_scaling:
        notes.append(f"YaRN factor {m.rope_scaling['factor']:g} from "
                     f"{m.rope_scaling['original_max_position_embeddings']} positions")
    return "\n".join(lines + notes)


def plot_schedule(cfg: Config, dp: int, path: str, name: str) -> None:
    """Draw LR, global batch, lambda and gamma against tokens seen into ``path`` (PNG; matplotlib needed);
    ``name`` (the preset or file) heads the title."""
    from pretrain.metrics import new_figure
    from pretrain.schedule import schedule_samples, validate_schedule

    validate_schedule(cfg, dp)
    fig = new_figure("python -m pretrain.info --plot")
    s, m = schedule_samples(cfg), cfg.model
    panels = [("lr", "learning rate"), ("batch", "global batch (sequences)")]
    if m.num_nextn_predict_layers > 0:
        panels.append(("mtp_weight", "MTP weight λ"))
    if m.is_moe and m.scoring_func == "sigmoid":
        panels.append(("bias_update_speed", "bias update speed γ"))
    fig.set_size_inches(8, 1.9 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    x = [t / 1e9 for t in s["tokens"]]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(x, s[key], drawstyle="steps-post", color="tab:blue")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("tokens seen (billions)")
    fig.suptitle(f"{name}: {cfg.schedule.name} schedule, "
                 f"{_fmt_tokens(s['tokens'][-1])} tokens, {s['step'][-1]:,} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from pretrain.metrics import MatplotlibMissing

    ap = argparse.ArgumentParser(prog="python -m pretrain.info", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="preset name or YAML path")
    for deg in ("tp", "pp", "ep", "dp"):
        ap.add_argument(f"--{deg}", type=int, default=None, help=f"{deg} degree (default: the config's"
                        + (", or ep for dp)" if deg == "dp" else ")"))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--schedule", action="store_true",
                    help="print the recipe phase by phase: tokens -> LR, global batch, MTP λ, bias γ")
    ap.add_argument("--plot", metavar="FILE.png", default=None,
                    help="draw LR, batch, λ and γ against tokens (needs matplotlib: pip install .[plot])")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        info = model_info(cfg, args.tp, args.pp, args.ep, args.dp)
        if args.schedule or args.plot:
            dp = info["layout"]["dp"]
            recipe = format_schedule(cfg, dp)
            if args.json and args.schedule:
                from pretrain.schedule import schedule_phases
                info["schedule"] = schedule_phases(cfg)
            if args.plot:
                plot_schedule(cfg, dp, args.plot, str(args.config))
    except (ConfigError, MatplotlibMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info) if args.json else format_table(info))
    if args.schedule and not args.json:
        print(f"\n{recipe}")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

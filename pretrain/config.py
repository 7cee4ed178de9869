"""Typed configuration: one dataclass per concern, YAML files, packaged presets, CLI overrides.

A config is a YAML mapping with the sections ``model``, ``parallel``, ``data``, ``train``, ``optim``,
``schedule``, ``moe``, ``mtp`` and a free-form ``deepspeed`` section passed through to DeepSpeed.
``load_config("tiny", ["train.steps=10", "model.n_group=2"])`` loads a packaged preset (or a YAML path)
and applies ``section.key=value`` overrides. Unknown keys are an error; every validation error is one
line naming the key and the fix (``ConfigError``).

Model keys use the names of ``transformers``' ``DeepseekV3Config`` / ``LlamaConfig`` so export is a copy.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message is one actionable line."""


# A value that is either constant or changes at token counts: ``0.3`` or ``[[0, 0.3], [1.0e12, 0.1]]``
# (from that many tokens seen on, the value is the second element).
StepValue = Any


def step_value_at(spec: StepValue, tokens_seen: float) -> float:
    """Evaluate a constant-or-step-change value at ``tokens_seen``."""
    if isinstance(spec, (int, float)):
        return float(spec)
    value = float(spec[0][1])
    for start, v in spec:
        if tokens_seen >= float(start):
            value = float(v)
    return value


@dataclass
class ModelConfig:
    """Architecture. Names follow transformers' DeepseekV3Config / LlamaConfig."""

    vocab_size: int | None = None
    """Vocabulary size (rows of the embedding and output head); null = the vocabulary of the tokenizer the training
    shards were built with, padded to a multiple of 128 x tp (resolved by pretrain.preflight)."""
    hidden_size: int = 256
    """Model width h."""
    num_hidden_layers: int = 2
    """Number of transformer blocks (MTP modules not included)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads for gqa (None = num_attention_heads). Ignored by mla."""
    head_dim: int | None = None
    """Per-head size for mha/gqa (None = hidden_size // num_attention_heads)."""
    intermediate_size: int = 1024
    """SwiGLU width of dense FFN layers."""
    max_position_embeddings: int = 4096
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict | None = None
    """YaRN scaling as in the official configs: {type: yarn, factor, original_max_position_embeddings,
    beta_fast, beta_slow, mscale, mscale_all_dim}; null = none."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    attention: str = "mla"
    """Attention kind: mha, gqa or mla."""
    q_lora_rank: int | None = None
    """MLA query compression rank; null = no query compression (V2-Lite)."""
    kv_lora_rank: int = 64
    """MLA compressed key/value latent size."""
    qk_rope_head_dim: int = 16
    """MLA decoupled RoPE key/query dim (the rope key is shared by all heads)."""
    qk_nope_head_dim: int = 32
    """MLA per-head non-rotary query/key dim."""
    v_head_dim: int = 32
    """MLA per-head value dim."""
    n_routed_experts: int = 0
    """Routed experts per MoE layer; 0 = dense model."""
    n_shared_experts: int = 0
    """Always-on shared experts per MoE layer."""
    num_experts_per_tok: int = 1
    """Routed experts selected per token (top-k)."""
    moe_intermediate_size: int = 256
    """SwiGLU width of each expert."""
    first_k_dense_replace: int = 0
    """The first k layers use a dense FFN instead of MoE."""
    n_group: int = 1
    """Expert groups for group-limited routing."""
    topk_group: int = 1
    """Groups a token may route to."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed experts' output."""
    norm_topk_prob: bool = False
    """Renormalise the selected gating weights to sum to 1."""
    scoring_func: str = "softmax"
    """Router scores: softmax (V2) or sigmoid (V3, with the aux-loss-free correction bias)."""
    num_nextn_predict_layers: int = 0
    """Multi-token prediction depth D (0 = none). MTP is used in training only and dropped at export."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head."""

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads. MLA expands its shared latent into one key and one value per query head, so there
        they ARE the attention heads and ``num_key_value_heads`` (kept in the presets for export) is ignored."""
        if self.attention == "mla":
            return self.num_attention_heads
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Parallel layout. Data-parallel size is derived: world / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel degree (megatron-core column/row parallel layers)."""
    pp: int = 1
    """Pipeline-parallel degree (DeepSpeed PipelineModule stages)."""
    ep: int = 1
    """Expert-parallel degree; divides the data-parallel size."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    pipeline_layout: list | None = None
    """Optional number of transformer layers per pipeline stage (sums to num_hidden_layers)."""


@dataclass
class DataConfig:
    """Training data."""

    paths: list = field(default_factory=list)
    """Shard prefixes or directories written by data_pipeline.build."""
    weights: list | None = None
    """Blend weights, one per path (null = proportional to size)."""
    seq_length: int = 128
    """Tokens per training sample (each window holds seq_length + 1 tokens)."""
    eval_paths: list = field(default_factory=list)
    """Held-out shard prefixes or directories for eval/loss."""
    tokenizer: str | None = None
    """Path of the sentencepiece model; defaults to the one named in the shards' manifest."""
    reset_attention_at_eos: bool = False
    """Mask attention and reset positions across document boundaries inside a window."""


@dataclass
class TrainConfig:
    """The run."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints (step_NNNNNNN/, latest), tensorboard/."""
    seed: int = 1234
    """Base seed; rank r seeds its RNGs with seed + r (dropout-free models need no more)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation is derived)."""
    total_tokens: int | None = None
    """Training length in tokens; fixes the LR schedule and data order. Alternative: steps."""
    steps: int | None = None
    """Training length in optimizer steps (used when total_tokens is null)."""
    exit_at_step: int | None = None
    """Checkpoint and stop at this step without changing the schedule or data order."""
    save_interval: int = 1000
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept in output_dir (older ones are deleted)."""
    log_interval: int = 10
    """Console and TensorBoard scalars every N steps."""
    eval_interval: int = 0
    """Held-out evaluation every N steps (0 = never)."""
    eval_iters: int = 4
    """Micro-batches per evaluation."""
    heatmap_interval: int = 100
    """Expert-load heatmap image every N steps (MoE models)."""
    activation_checkpointing: str = "none"
    """none, full (recompute each block) or selective (recompute attention core only)."""
    precision: str = "bf16"
    """bf16 or fp32."""
    compile: str = "none"
    """torch.compile: none, blocks (each transformer block, regional) or model (the whole model; pp=1 only).
    Measured on CPU in bench/results.md; the first steps include the compilation."""
    peak_flops: float | None = None
    """Device peak FLOP/s for MFU (null = measured GEMM rate on CPU, 989e12 on GPU)."""
    profile_step: int = 0
    """Count one step's FLOPs, collective bytes per kind and peak live-tensor bytes on every rank into
    profile_step_N_rank_R.json in the run directory (pretrain/profiling.py; the step runs slower); 0 = never."""
    preemption_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank checkpoint at the next step boundary and exit 0 (pretrain.preemption)."""
    batch_size_rampup: list | None = None
    """Optional [[tokens, global_batch_size], ...]: the batch size in force from each token count on (step changes;
    for a gradual ramp use batch_ramp_start / batch_ramp_tokens)."""
    batch_ramp_start: int | None = None
    """Gradual batch ramp (Megatron's rampup_batch_size): the global batch at 0 tokens, growing to
    train.global_batch_size over train.batch_ramp_tokens as start + floor((end - start) * t / T / u) * u,
    u = train.batch_ramp_increment. null = no gradual ramp (V2: 2304 -> 9216, V3: 3072 -> 15360)."""
    batch_ramp_tokens: int | None = None
    """Gradual batch ramp: tokens T over which the batch grows to train.global_batch_size (V2: 225e9, V3: 469e9)."""
    batch_ramp_increment: int | None = None
    """Gradual batch ramp: the step u of each increase; null = micro_batch_size x data-parallel size, filled in
    when the run starts (the smallest step every rank can split into whole micro-batches)."""
    checkpoint_fallback: bool = False
    """On resume, a corrupt checkpoint (sha256 manifest mismatch) or a bad `latest` falls back to the newest older
    complete checkpoint instead of stopping with an error naming the file (docs/RELIABILITY.md)."""
    async_save: bool | None = None
    """Checkpoint in the background: the step pays for a copy of the state to host memory, a thread writes the
    files and `latest` moves once every rank's files are complete. It writes only the layout-free state (no
    DeepSpeed engine files: zero_to_fp32 and pretrain.generate's tp/ep shard loading need async_save=false).
    null = on when training on CUDA, off on CPU (docs/RELIABILITY.md)."""
    dist_timeout_s: float = 1800.0
    """Process-group timeout for start-up and the first step: a rank stuck in a collective ends the job."""
    step_timeout_s: float | None = None
    """Process-group timeout from step 2 on (null = dist_timeout_s); shorter catches a hung rank sooner."""
    max_skipped_steps: int = 10
    """Abort after this many consecutive skipped optimizer steps (non-finite loss/gradients or loss spikes)."""
    loss_spike_sigma: float = 0.0
    """Skip the optimizer step when loss > mean + k * std of the last loss_spike_window steps (0 = off)."""
    loss_spike_window: int = 50
    """Steps in the loss-spike window (saved in checkpoints); spike skipping starts once it is full."""
    init_from: str | None = None
    """Start a new run from these weights: a run directory (its `latest`), a step_NNNNNNN directory or a HuggingFace
    folder. Expert bias and MTP come along where present; optimizer, schedule and data stream start fresh. Model
    shapes must match (sequence length and RoPE scaling may change). Ignored once output_dir holds a checkpoint."""
    loss_on: str = "assistant"
    """posttrain.sft: assistant (loss only on assistant turns and their end-of-turn token) or all (every token)."""
    epochs: float | None = None
    """posttrain.*: passes over the data; with train.steps and train.total_tokens null the run length follows
    from it (whole global batches)."""


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases and the expert correction bias)."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""


@dataclass
class ScheduleConfig:
    """Learning-rate schedule as a function of (step, tokens seen)."""

    name: str = "multi_step"
    """multi_step (DeepSeek LLM, V2), cosine, wsd (warmup-stable-decay), piecewise (V3: schedule.phases) or
    constant (optim.lr after the warmup: context-extension phases)."""
    warmup_steps: int = 2000
    """Linear warmup steps from 0 to optim.lr."""
    decay_points: list = field(default_factory=lambda: [0.8, 0.9])
    """multi_step: fractions of the training tokens where the LR steps down."""
    decay_factors: list = field(default_factory=lambda: [0.316, 0.1])
    """multi_step: LR multipliers in force from each decay point."""
    min_lr_ratio: float = 0.1
    """cosine / wsd: final LR as a fraction of the peak."""
    wsd_decay_fraction: float = 0.2
    """wsd: fraction of the training tokens spent in the final linear decay."""
    phases: list = field(default_factory=list)
    """piecewise: consecutive phases after the warmup, each {until_tokens, shape, lr_end}. A phase runs from the
    previous phase's end (the first from the end of the warmup) until `until_tokens` tokens seen (absolute; null
    only on the last = the end of the run). shape: constant (holds lr_end, default the LR the phase starts at),
    cosine or linear (from the LR the phase starts at, the peak for the first, to lr_end, required). After the
    last phase the LR stays at its lr_end. V3: [{until_tokens: 10e12, shape: constant}, {until_tokens: 14.3e12,
    shape: cosine, lr_end: 2.2e-5}, {until_tokens: 14.633e12, shape: constant, lr_end: 2.2e-5},
    {shape: constant, lr_end: 7.3e-6}]."""


@dataclass
class MoEConfig:
    """Load balancing."""

    bias_update_speed: StepValue = 0.001
    """gamma of the aux-loss-free bias update (sigmoid routers); constant or [[tokens, value], ...]."""
    seq_aux_alpha: float = 0.0001
    """alpha of the sequence-wise balance loss (V3); 0 = off."""
    aux_loss_alpha: float = 0.0
    """alpha1 of the V2 expert-level balance loss, per sequence (V2: 0.003, V2-Lite: 0.001); 0 = off."""
    device_aux_alpha: float = 0.0
    """alpha2 of the V2 device-level balance loss; the devices are the model.n_group expert groups (V2: 0.05)."""
    comm_aux_alpha: float = 0.0
    """alpha3 of the V2 communication balance loss over the n_group devices, M = model.topk_group (V2: 0.02)."""
    capacity_factor: float | None = None
    """V2 device-level token dropping, in training only: each of the model.n_group expert groups (devices) takes at
    most capacity_factor x its average share of a micro-batch's token copies; the lowest-affinity copies beyond are
    dropped (moe/dropped_tokens), ~10% of sequences never (V2: 1.0). null = dropless."""


@dataclass
class MTPConfig:
    """Multi-token prediction."""

    loss_weight: StepValue = 0.3
    """lambda on the mean MTP loss; constant or [[tokens, value], ...] (V3: 0.3, then 0.1)."""


@dataclass
class DPOConfig:
    """Direct preference optimisation (posttrain.dpo)."""

    beta: float = 0.1
    """beta: scale of the implicit reward beta * (log pi - log pi_ref)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (IPO, Azar et al.)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed probability that a preference label is flipped (sigmoid loss only), in [0, 0.5)."""
    precompute_reference: bool = False
    """Compute the frozen reference's log-probs once before training (one pass, stored with the data position)
    instead of holding a second copy of the model in the same layout."""


@dataclass
class RMConfig:
    """Reward model (posttrain.rm)."""

    margin: float = 0.0
    """Bradley-Terry with a margin: -log sigmoid(r_chosen - r_rejected - margin) (0 = plain)."""


@dataclass
class RLConfig:
    """Reinforcement learning on on-policy rollouts (posttrain.grpo; issue 18). A rollout is prompts_per_step x
    group_size outputs; it is split into mini-batches of train.global_batch_size sequences, one optimizer step
    each, and passed over updates_per_rollout times (pi_old kept)."""

    rewards: list = field(default_factory=list)
    """[{fn: "module:function" or a built-in (accuracy, format, language_consistency), weight: w, name: optional}];
    fn(prompt, completion, sample) -> float, the total is sum weight * value."""
    group_size: int = 16
    """G: samples per prompt; the group's mean reward is GRPO's baseline (>= 2; PPO: any)."""
    prompts_per_step: int = 32
    """Prompts per rollout (split over the data-parallel ranks)."""
    max_new_tokens: int = 256
    """Generation budget per output; prompt + budget must fit data.seq_length (longer prompts are skipped)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout; the log-probs of the loss are taken at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling of the rollout (the loss's log-probs are of the unfiltered tempered distribution)."""
    kl_coef: float = 0.001
    """beta: weight of the KL to the reference (DeepSeekMath 0.04, R1 0.001); 0 = no reference model."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (Schulman's estimators; GRPO uses k3)."""
    kl_in_reward: bool = False
    """Subtract beta * sum_t KL_t from each output's reward (before the group advantage) instead of adding it to
    the loss."""
    kl_importance_correction: bool = False
    """Multiply the in-loss KL by the ratio pi/pi_old (unbiased once pi != pi_old; DeepSeek-V3.2)."""
    clip_eps_low: float = 0.2
    """epsilon: the ratio is clipped below at 1 - clip_eps_low."""
    clip_eps_high: float | None = None
    """Upper clip 1 + clip_eps_high; null = clip_eps_low (symmetric); larger = DAPO's clip-higher."""
    loss_agg: str = "seq-mean-token-mean"
    """seq-mean-token-mean (GRPO), token-mean (DAPO) or seq-mean-token-sum-norm (Dr. GRPO: / max_new_tokens)."""
    normalize_std: bool = True
    """Divide the group-centred reward by the group's std (false: Dr. GRPO); PPO: whiten the GAE advantages."""
    eps_std: float = 1.0e-6
    """epsilon_std in (r - mean) / (std + epsilon_std)."""
    updates_per_rollout: int = 1
    """mu: passes over each rollout (pi_old kept from the rollout)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the rollout is full."""
    dynamic_sampling_max_rounds: int = 4
    """Generation rounds per rollout with dynamic_sampling; then uniform groups fill the rest (advantage 0)."""
    overlong_cache_length: int = 0
    """DAPO's soft overlong punishment over the last this-many tokens of max_new_tokens (0 = off)."""
    overlong_filter: bool = False
    """DAPO's overlong filtering: outputs cut at max_new_tokens leave the loss."""
    ref_reset_interval: int = 0
    """Copy the policy into the reference every this-many rollouts (R1: 400 steps); 0 = never."""
    routing_replay: bool = False
    """MoE: replay the experts routed at the pi_old forward in the training forward (under parallel.pp > 1 not with
    train.activation_checkpointing)."""
    bias_update_speed: float = 0.0
    """MoE aux-loss-free bias speed during RL (replaces moe.bias_update_speed; 0 = the bias is frozen)."""
    critic_init: str | None = None
    """PPO: the critic's weights (a posttrain.rm run or step directory: its value head too); null = the policy's."""
    critic_lr: float | None = None
    """PPO: the critic's constant learning rate; null = optim.lr."""
    gamma: float = 1.0
    """PPO: GAE discount."""
    lam: float = 0.95
    """PPO: GAE lambda."""
    value_clip: float = 0.2
    """PPO: the value loss's clip range around the rollout's values."""


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "moe": MoEConfig,
    "mtp": MTPConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "rl": RLConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    deepspeed: dict = field(default_factory=dict)
    """Passed through to the generated DeepSpeed config (deep-merged over it)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- loading

def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type hint, converting ints to floats where a float is wanted."""
    hint_s = str(hint)
    if value is None:
        if "None" in hint_s or hint is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed here; give a value")
    if hint is Any or hint_s.startswith("typing.Any"):
        return value
    if hint is bool or hint_s.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is float or hint_s.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int or hint_s.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is str or hint_s.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is list or hint_s.startswith("list"):
        if isinstance(value, str):  # a single path given where a list is expected
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if hint is dict or hint_s.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _build_section(name: str, cls: type, raw: dict) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key; valid keys are {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested mapping."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(SECTIONS) - {"deepspeed"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; valid sections are {', '.join(list(SECTIONS) + ['deepspeed'])}")
    if isinstance(raw.get("parallel"), dict) and "capacity_factor" in raw["parallel"]:
        raise ConfigError("parallel.capacity_factor was replaced by moe.capacity_factor (DeepSeek-V2's device-level "
                          "token dropping, in training only); move the value there")
    sections = {name: _build_section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items()}
    ds = raw.get("deepspeed") or {}
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: expected a mapping, got {ds!r}")
    cfg = Config(**sections, deepspeed=ds)
    validate(cfg)
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(preset_or_path: str | os.PathLike) -> dict:
    path = Path(preset_or_path)
    if not path.suffix and (PRESET_DIR / f"{preset_or_path}.yaml").exists():
        path = PRESET_DIR / f"{preset_or_path}.yaml"
    if not path.exists():
        raise ConfigError(
            f"config {str(preset_or_path)!r}: no such file or preset; presets are {', '.join(list_presets())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)  # a YAML may extend a preset: `base: tiny`
    if base:
        merged = _read_yaml(base)
        for sec, vals in data.items():
            if isinstance(vals, dict) and isinstance(merged.get(sec), dict):
                merged[sec] = {**merged[sec], **vals}
            else:
                merged[sec] = vals
        data = merged
    return data


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (ints, floats, bools, null, lists)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if parts[0] not in SECTIONS and parts[0] != "deepspeed":
            raise ConfigError(f"override {key}: unknown section {parts[0]!r}; valid sections are "
                              f"{', '.join(list(SECTIONS) + ['deepspeed'])}")
        node = raw.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def load_config(preset_or_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a packaged preset name or a YAML path, apply ``section.key=value`` overrides, validate."""
    return config_from_dict(apply_overrides(_read_yaml(preset_or_path), list(overrides)))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------ validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_model(m: ModelConfig) -> None:
    _check(m.attention in ("mha", "gqa", "mla"), f"model.attention={m.attention!r}: use mha, gqa or mla")
    _check(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size={m.vocab_size}: must be positive or null")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        _check(getattr(m, k) > 0, f"model.{k}={getattr(m, k)}: must be positive")
    _check(m.num_attention_heads % m.kv_heads == 0,
           f"model.num_key_value_heads={m.kv_heads} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.attention == "mha":
        _check(m.kv_heads == m.num_attention_heads,
               f"model.num_key_value_heads={m.kv_heads}: mha needs it equal to num_attention_heads "
               f"({m.num_attention_heads}); use model.attention=gqa for grouped heads")
    if m.attention in ("mha", "gqa") and m.head_dim is None:
        _check(m.hidden_size % m.num_attention_heads == 0,
               f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
               f"{m.num_attention_heads}; set model.head_dim")
    if m.attention == "mla":
        for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            _check(getattr(m, k) > 0, f"model.{k}={getattr(m, k)}: must be positive for mla")
        _check(m.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim={m.qk_rope_head_dim}: must be even")
        _check(m.q_lora_rank is None or m.q_lora_rank > 0,
               f"model.q_lora_rank={m.q_lora_rank}: must be positive, or null for no query compression")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type"))
        _check(kind == "yarn", f"model.rope_scaling.type={kind!r}: only yarn is supported (or null)")
        _check(float(m.rope_scaling.get("factor", 0)) >= 1.0, "model.rope_scaling.factor: must be >= 1")
    if m.is_moe:
        _check(m.n_routed_experts > 0 and m.num_experts_per_tok > 0,
               f"model.num_experts_per_tok={m.num_experts_per_tok}: must be positive")
        _check(m.num_experts_per_tok <= m.n_routed_experts,
               f"model.num_experts_per_tok={m.num_experts_per_tok} exceeds model.n_routed_experts={m.n_routed_experts}")
        _check(m.n_group >= 1 and m.n_routed_experts % m.n_group == 0,
               f"model.n_group={m.n_group} must divide model.n_routed_experts={m.n_routed_experts}")
        _check(1 <= m.topk_group <= m.n_group,
               f"model.topk_group={m.topk_group} must be between 1 and model.n_group={m.n_group}")
        per_group = m.n_routed_experts // m.n_group
        _check(m.num_experts_per_tok <= m.topk_group * per_group,
               f"model.num_experts_per_tok={m.num_experts_per_tok} exceeds the experts in model.topk_group="
               f"{m.topk_group} groups ({m.topk_group * per_group})")
        if m.scoring_func == "sigmoid" and m.n_group > 1:
            _check(per_group >= 2, f"model.n_group={m.n_group}: sigmoid group scores sum the top-2 experts of a "
                                   f"group, so each group needs >= 2 experts")
        _check(m.scoring_func in ("softmax", "sigmoid"), f"model.scoring_func={m.scoring_func!r}: use softmax or sigmoid")
        _check(m.moe_intermediate_size > 0, f"model.moe_intermediate_size={m.moe_intermediate_size}: must be positive")
        _check(0 <= m.first_k_dense_replace <= m.num_hidden_layers,
               f"model.first_k_dense_replace={m.first_k_dense_replace} must be in [0, num_hidden_layers="
               f"{m.num_hidden_layers}]")
    _check(m.num_nextn_predict_layers >= 0,
           f"model.num_nextn_predict_layers={m.num_nextn_predict_layers}: must be >= 0")


def _check_step_value(key: str, spec: StepValue) -> None:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return
    ok = isinstance(spec, list) and len(spec) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p) for p in spec)
    _check(ok, f"{key}={spec!r}: expected a number or a list of [tokens, value] pairs")


SCHEDULES = ("multi_step", "cosine", "wsd", "piecewise", "constant")
PHASE_SHAPES = ("constant", "cosine", "linear")


def _number(key: str, value: Any, kind: type) -> Any:
    """A phase's number; YAML 1.1 reads ``1.0e12`` (no exponent sign) as a string, so numeric strings count."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    _check(ok and (kind is float or float(value).is_integer()),
           f"{key}={value!r}: expected a non-negative {'number' if kind is float else 'token count'}")
    return kind(value)


def _checked_phases(phases: list) -> list[dict]:
    """schedule.phases validated, numbers converted: [{until_tokens: int | None, shape: str, lr_end: float}]."""
    _check(isinstance(phases, list) and len(phases) > 0,
           "schedule.phases is empty: schedule.name=piecewise needs [{until_tokens, shape, lr_end}, ...]")
    out, prev = [], 0
    for i, ph in enumerate(phases):
        key = f"schedule.phases[{i}]"
        _check(isinstance(ph, dict), f"{key}={ph!r}: expected a mapping {{until_tokens, shape, lr_end}}")
        extra = sorted(set(ph) - {"until_tokens", "shape", "lr_end"})
        _check(not extra, f"{key}.{extra[0] if extra else ''}: unknown key; valid keys are lr_end, shape, until_tokens")
        shape = ph.get("shape", "constant")
        _check(shape in PHASE_SHAPES, f"{key}.shape={shape!r}: use {', '.join(PHASE_SHAPES)}")
        _check(shape == "constant" or ph.get("lr_end") is not None,
               f"{key}.lr_end: a {shape} phase needs the LR it ends at")
        until = ph.get("until_tokens")
        _check(until is not None or i == len(phases) - 1,
               f"{key}.until_tokens is null: only the last phase may run to the end of training")
        until = None if until is None else _number(f"{key}.until_tokens", until, int)
        _check(until is None or until > prev,
               f"{key}.until_tokens={until}: phases must end at increasing token counts (previous: {prev})")
        lr_end = ph.get("lr_end")
        out.append({"until_tokens": until, "shape": shape,
                    "lr_end": None if lr_end is None else _number(f"{key}.lr_end", lr_end, float)})
        prev = until or prev
    return out


def _check_batch_ramp(t: "TrainConfig") -> None:
    """The gradual ramp's static checks (the increment against micro-batch x dp: pretrain.schedule.validate_schedule)."""
    if t.batch_ramp_start is None and t.batch_ramp_tokens is None:
        return
    _check(t.batch_ramp_start is not None and t.batch_ramp_tokens is not None,
           "train.batch_ramp_start and train.batch_ramp_tokens: set both for a gradual batch ramp, or neither")
    _check(not t.batch_size_rampup, "train.batch_size_rampup and train.batch_ramp_start are both set: use one ramp")
    _check(0 < t.batch_ramp_start <= t.global_batch_size,
           f"train.batch_ramp_start={t.batch_ramp_start}: must be in (0, train.global_batch_size="
           f"{t.global_batch_size}]")
    _check(t.batch_ramp_tokens > 0, f"train.batch_ramp_tokens={t.batch_ramp_tokens}: must be positive")
    _check(t.batch_ramp_increment is None or t.batch_ramp_increment > 0,
           f"train.batch_ramp_increment={t.batch_ramp_increment}: must be positive (or null = micro batch x dp)")


def validate(cfg: Config) -> None:
    """Validate everything that does not depend on the world size (parallel.topology checks that)."""
    validate_model(cfg.model)
    t, p, o, s = cfg.train, cfg.parallel, cfg.optim, cfg.schedule
    for k in ("tp", "pp", "ep"):
        _check(getattr(p, k) >= 1, f"parallel.{k}={getattr(p, k)}: must be >= 1")
    _check(p.zero_stage in (0, 1, 2), f"parallel.zero_stage={p.zero_stage}: use 0, 1 or 2")
    _check(t.precision in ("bf16", "fp32"), f"train.precision={t.precision!r}: use bf16 or fp32")
    _check(t.activation_checkpointing in ("none", "full", "selective"),
           f"train.activation_checkpointing={t.activation_checkpointing!r}: use none, full or selective")
    _check(t.compile in ("none", "blocks", "model"),
           f"train.compile={t.compile!r}: use none, blocks or model")
    _check(not (t.compile == "model" and p.pp > 1),
           f"train.compile=model with parallel.pp={p.pp}: pipeline stages are not one model; use train.compile=blocks")
    _check(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size}: must be >= 1")
    _check(t.global_batch_size % t.micro_batch_size == 0,
           f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
           f"{t.micro_batch_size}")
    _check(t.total_tokens is not None or t.steps is not None or t.epochs is not None,
           "train.total_tokens and train.steps are both null: set one to fix the run's length (posttrain.*: or "
           "train.epochs)")
    _check(t.total_tokens is None or t.total_tokens > 0, f"train.total_tokens={t.total_tokens}: must be positive")
    _check(t.steps is None or t.steps > 0, f"train.steps={t.steps}: must be positive")
    _check(t.save_interval >= 1, f"train.save_interval={t.save_interval}: must be >= 1")
    _check(t.log_interval >= 1, f"train.log_interval={t.log_interval}: must be >= 1")
    _check(t.keep_last >= 1, f"train.keep_last={t.keep_last}: must be >= 1")
    _check(t.profile_step >= 0, f"train.profile_step={t.profile_step}: must be >= 0 (0 = never)")
    _check(o.lr > 0, f"optim.lr={o.lr}: must be positive")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two numbers in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 = off)")
    _check(s.name in SCHEDULES, f"schedule.name={s.name!r}: use {', '.join(SCHEDULES)}")
    if s.name == "piecewise":
        s.phases = _checked_phases(s.phases)
    _check_batch_ramp(t)
    _check(s.warmup_steps >= 0, f"schedule.warmup_steps={s.warmup_steps}: must be >= 0")
    _check(len(s.decay_points) == len(s.decay_factors),
           f"schedule.decay_points has {len(s.decay_points)} entries but schedule.decay_factors has "
           f"{len(s.decay_factors)}; give one factor per point")
    _check(list(s.decay_points) == sorted(s.decay_points) and all(0 < x <= 1 for x in s.decay_points),
           f"schedule.decay_points={s.decay_points}: increasing fractions in (0, 1]")
    _check(0 < s.wsd_decay_fraction <= 1, f"schedule.wsd_decay_fraction={s.wsd_decay_fraction}: must be in (0, 1]")
    _check(cfg.data.seq_length >= 2, f"data.seq_length={cfg.data.seq_length}: must be >= 2")
    _check(cfg.data.weights is None or len(cfg.data.weights) == len(cfg.data.paths),
           f"data.weights has {len(cfg.data.weights or [])} entries for {len(cfg.data.paths)} data.paths; "
           f"give one weight per path")
    _check_step_value("moe.bias_update_speed", cfg.moe.bias_update_speed)
    for k in ("seq_aux_alpha", "aux_loss_alpha", "device_aux_alpha", "comm_aux_alpha"):
        _check(getattr(cfg.moe, k) >= 0, f"moe.{k}={getattr(cfg.moe, k)}: must be >= 0 (0 = off)")
    _check(cfg.moe.capacity_factor is None or cfg.moe.capacity_factor > 0,
           f"moe.capacity_factor={cfg.moe.capacity_factor}: must be positive, or null for no token dropping")
    _check_step_value("mtp.loss_weight", cfg.mtp.loss_weight)
    _check(t.loss_on in ("assistant", "all"), f"train.loss_on={t.loss_on!r}: use assistant or all")
    _check(t.epochs is None or t.epochs > 0, f"train.epochs={t.epochs}: must be positive")
    _check(cfg.dpo.loss_type in ("sigmoid", "ipo"), f"dpo.loss_type={cfg.dpo.loss_type!r}: use sigmoid or ipo")
    _check(cfg.dpo.beta > 0, f"dpo.beta={cfg.dpo.beta}: must be positive")
    _check(0 <= cfg.dpo.label_smoothing < 0.5, f"dpo.label_smoothing={cfg.dpo.label_smoothing}: must be in [0, 0.5)")
    if p.pipeline_layout is not None:
        _check(len(p.pipeline_layout) == p.pp and sum(p.pipeline_layout) == cfg.model.num_hidden_layers,
               f"parallel.pipeline_layout={p.pipeline_layout}: needs parallel.pp={p.pp} entries summing to "
               f"model.num_hidden_layers={cfg.model.num_hidden_layers}")
    validate_rl(cfg.rl)


def validate_rl(r: RLConfig) -> None:
    for k in ("group_size", "prompts_per_step", "max_new_tokens", "updates_per_rollout", "dynamic_sampling_max_rounds"):
        _check(getattr(r, k) >= 1, f"rl.{k}={getattr(r, k)}: must be >= 1")
    _check(0 <= r.gamma <= 1 and 0 <= r.lam <= 1, f"rl.gamma={r.gamma}, rl.lam={r.lam}: both must be in [0, 1]")
    _check(r.value_clip > 0 and (r.critic_lr is None or r.critic_lr > 0),
           f"rl.value_clip={r.value_clip}, rl.critic_lr={r.critic_lr}: must be positive")
    _check(r.temperature > 0, f"rl.temperature={r.temperature}: must be > 0 (G samples of a greedy policy are equal)")
    _check(0 < r.top_p <= 1, f"rl.top_p={r.top_p}: must be in (0, 1]")
    for k in ("kl_coef", "clip_eps_low", "ref_reset_interval", "bias_update_speed"):
        _check(getattr(r, k) >= 0, f"rl.{k}={getattr(r, k)}: must be >= 0")
    _check(r.clip_eps_high is None or r.clip_eps_high >= 0, f"rl.clip_eps_high={r.clip_eps_high}: must be >= 0")
    _check(r.eps_std > 0, f"rl.eps_std={r.eps_std}: must be > 0")
    _check(r.kl_estimator in ("k1", "k2", "k3"), f"rl.kl_estimator={r.kl_estimator!r}: use k1, k2 or k3")
    _check(r.loss_agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"),
           f"rl.loss_agg={r.loss_agg!r}: use seq-mean-token-mean, token-mean or seq-mean-token-sum-norm")
    _check(0 <= r.overlong_cache_length <= r.max_new_tokens, f"rl.overlong_cache_length={r.overlong_cache_length}: "
           f"must be in [0, rl.max_new_tokens={r.max_new_tokens}]")

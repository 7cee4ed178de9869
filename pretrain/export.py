"""Export to and import from HuggingFace ``transformers`` checkpoints.

``to_hf(model, model_cfg, out_dir, tokenizer=None)`` writes ``config.json``, (sharded) safetensors with an index,
and the sentencepiece tokenizer; MTP modules are training-only and never exported. The family follows the
architecture: ``DeepseekV3ForCausalLM`` (MLA with sigmoid routing, or dense MLA), ``DeepseekV2ForCausalLM``
(MLA with softmax routing), ``LlamaForCausalLM`` (dense mha/gqa). Experts are written one tensor per expert
(``mlp.experts.{e}.gate_proj.weight``), the layout of DeepSeek's released checkpoints, which transformers fuses
on load. ``from_hf(path)`` reads such a folder (per-expert or fused expert layout) back into our model.

CLI: ``python -m pretrain.export --checkpoint RUN_DIR_OR_STEP_DIR --output HF_DIR``.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from pretrain.config import ConfigError, ModelConfig, validate_model

# The one name-mapping table: (our state-dict name regex, HF name template, layout). Templates use the regex
# groups {0}, {1}, ... and {e} for the expert index. First match wins.
NAME_TABLE = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight", "copy"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", "model.layers.{0}.mlp.experts.{e}.{1}.weight",
     "unstack"),  # (E, out, in) -> E tensors (out, in)
    (r"layers\.(\d+)\.(.+)", "model.layers.{0}.{1}", "copy"),  # attention, norms, dense MLP, router, shared experts
    (r"norm\.weight", "model.norm.weight", "copy"),
    (r"lm_head\.weight", "lm_head.weight", "copy"),
    (r"mtp\..+", None, "drop"),  # MTP is used in training only
]

# The reverse direction reads the same table backwards; transformers' own fused expert layout is also accepted.
_HF_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_HF_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def hf_family(cfg: ModelConfig) -> str:
    """deepseek_v3 | deepseek_v2 | llama, or a ValueError naming what transformers cannot represent."""
    if cfg.attention in ("mha", "gqa"):
        if cfg.is_moe:
            raise ValueError(f"model.attention={cfg.attention} with model.n_routed_experts={cfg.n_routed_experts}: "
                             "no transformers class holds an MoE with mha/gqa; export supports dense mha/gqa (Llama)")
        return "llama"
    if cfg.is_moe and cfg.scoring_func == "softmax":
        if cfg.norm_topk_prob:
            raise ValueError("model.norm_topk_prob=true with scoring_func=softmax: transformers' DeepseekV2 ignores "
                             "it, so the export would not match; train softmax routers with norm_topk_prob=false")
        return "deepseek_v2"
    return "deepseek_v3"


def _rope_parameters(cfg: ModelConfig) -> dict:
    if not cfg.rope_scaling:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
    return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **rs}


def hf_config(cfg: ModelConfig):
    """The transformers config object equivalent to ``cfg``."""
    import transformers

    family = hf_family(cfg)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_parameters=_rope_parameters(cfg), hidden_act="silu", attention_bias=False)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim,
                                        architectures=["LlamaForCausalLM"])
    moe = dict(n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
               n_group=cfg.n_group, topk_group=cfg.topk_group, first_k_dense_replace=cfg.first_k_dense_replace)
    if not cfg.is_moe:  # dense MLA: every layer is a "first dense" layer
        moe = dict(n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
                   first_k_dense_replace=cfg.num_hidden_layers)
    mla = dict(num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
               kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
               qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
               n_shared_experts=cfg.n_shared_experts, moe_intermediate_size=cfg.moe_intermediate_size,
               routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob, **moe)
    if family == "deepseek_v2":
        method = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
        return transformers.DeepseekV2Config(**common, **mla, topk_method=method,
                                             architectures=["DeepseekV2ForCausalLM"])
    # rope_interleave: our MLA rotates interleaved pairs, as DeepSeek's released weights expect.
    return transformers.DeepseekV3Config(**common, **mla, rope_interleave=True, num_nextn_predict_layers=0,
                                         architectures=["DeepseekV3ForCausalLM"])


def to_hf_state_dict(state_dict: dict) -> dict:
    """Our state dict -> HF names (MTP dropped, experts unstacked), contiguous tensors ready for safetensors."""
    out = {}
    for name, tensor in state_dict.items():
        for pattern, template, layout in NAME_TABLE:
            m = re.fullmatch(pattern, name)
            if not m:
                continue
            if layout == "copy":
                out[template.format(*m.groups())] = tensor.detach().contiguous()
            elif layout == "unstack":
                for e in range(tensor.shape[0]):
                    out[template.format(*m.groups(), e=e)] = tensor[e].detach().clone()  # own storage for safetensors
            break
        else:
            raise KeyError(f"{name}: no entry in pretrain.export.NAME_TABLE")
    return out


def from_hf_state_dict(hf_sd: dict, num_hidden_layers: int) -> dict:
    """HF names -> our state dict (experts stacked). Layers beyond ``num_hidden_layers`` (MTP in DeepSeek's
    released V3 weights) are skipped."""
    ours, experts = {}, {}
    for name, tensor in hf_sd.items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= num_hidden_layers:
            continue
        if m := _HF_PER_EXPERT.fullmatch(name):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
        elif m := _HF_FUSED.fullmatch(name):
            prefix = f"layers.{m.group(1)}.mlp.experts."
            if m.group(2) == "down_proj":
                ours[prefix + "down_proj"] = tensor
            else:  # transformers' fused layout: gate_up_proj (E, 2I, H), gate rows first
                ours[prefix + "gate_proj"], ours[prefix + "up_proj"] = tensor.chunk(2, dim=1)
        elif name.startswith("model."):
            ours[name[len("model."):]] = tensor
        elif name == "lm_head.weight":
            ours[name] = tensor
        else:
            raise KeyError(f"{name}: not a weight of a DeepseekV3/DeepseekV2/Llama causal LM")
    for (layer, proj), by_expert in experts.items():
        ours[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    return ours


def _tokenizer_path(tokenizer) -> Path:
    path = Path(getattr(tokenizer, "path", tokenizer))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such sentencepiece .model file")
    return path


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Copy the sentencepiece model as tokenizer.model and write the files ``AutoTokenizer`` loads.

    transformers converts the model into its fast (``tokenizers``) Llama form; we keep sentencepiece's choices:
    no dummy prefix, ``user_defined`` pieces (e.g. "\\n") atomic, ``control`` pieces (bos/eos/pad/FIM) special and
    never produced from text (``split_special_tokens``), so ids match ``data_pipeline``'s tokenizer.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken

    from data_pipeline.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS
    from transformers import AutoTokenizer

    src = _tokenizer_path(tokenizer)
    shutil.copyfile(src, out_dir / "tokenizer.model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(src.read_bytes())
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece
    trainer = proto.trainer_spec

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": piece(trainer.bos_id), "eos_token": piece(trainer.eos_id),
        "unk_token": piece(trainer.unk_id), "pad_token": piece(trainer.pad_id), "add_bos_token": False,
        "add_eos_token": False, "legacy": False, "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix)}))
    hf_tok = AutoTokenizer.from_pretrained(str(out_dir))
    hf_tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                       for p in proto.pieces if p.type == kind.USER_DEFINED])
    named = {hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token}
    extra = [p.piece for p in proto.pieces if p.type == kind.CONTROL and p.piece not in named]
    if extra:
        hf_tok.add_special_tokens({"additional_special_tokens": extra})
    if all(p in {q.piece for q in proto.pieces} for p in CHAT_TOKENS):  # posttrain's chat pieces: its template
        hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    # save_pretrained does not persist split_special_tokens (nor should it write where it was loaded from)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    config_path.write_text(json.dumps({**tok_config, "split_special_tokens": True}, indent=2))


def to_hf(model: torch.nn.Module, model_cfg: ModelConfig, output_dir, tokenizer=None,
          max_shard_size: int | str = "5GB") -> Path:
    """Write a HuggingFace folder for ``model``: config.json, safetensors (+ index when sharded), tokenizer.

    tokenizer: a path to a sentencepiece ``.model`` file, an object with ``.path``, or None.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(model_cfg)
    state = dict(model.state_dict())
    if model_cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it to the embedding
    if hf_family(model_cfg) != "deepseek_v3":
        biases = {k: v for k, v in state.items() if k.endswith("e_score_correction_bias")}
        if any(bool(v.any()) for v in biases.values()):
            raise ValueError("non-zero e_score_correction_bias in a softmax-routed model: DeepseekV2 has no "
                             "correction bias; use scoring_func=sigmoid (DeepseekV3) to export it")
        state = {k: v for k, v in state.items() if k not in biases}
    hf_state = to_hf_state_dict(state)
    for v in hf_state.values():  # DeepSeek keeps the router in fp32; weights go out as they are trained
        assert v.device.type != "meta", "cannot export a model on the meta device"
    save_torch_state_dict({k: v.cpu() for k, v in hf_state.items()}, out, max_shard_size=max_shard_size)
    config.dtype = next(iter(hf_state.values())).dtype
    config.save_pretrained(str(out))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def model_config_from_hf(hf: dict) -> ModelConfig:
    """A ``config.json`` mapping (deepseek_v3, deepseek_v2 or llama) -> our ModelConfig."""
    kind = hf.get("model_type")
    if kind not in ("deepseek_v3", "deepseek_v2", "llama"):
        raise ValueError(f"config.json model_type={kind!r}: from_hf reads deepseek_v3, deepseek_v2 or llama")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json rope type {rope_type!r}: only default and yarn RoPE are supported")
    names = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings"]
    kw = {k: hf[k] for k in names if k in hf}
    kw.update(rope_theta=theta, rope_scaling={"type": "yarn", **rope} if rope_type == "yarn" else None)
    if kind == "llama":
        heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
        kw.update(attention="mha" if kv == heads else "gqa", num_key_value_heads=kv, head_dim=hf.get("head_dim"))
        return ModelConfig(**kw)
    for k in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
              "n_shared_experts", "moe_intermediate_size", "routed_scaling_factor", "norm_topk_prob",
              "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace"):
        if k in hf:
            kw[k] = hf[k]
    kw.update(attention="mla", n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
              scoring_func="sigmoid" if kind == "deepseek_v3" else "softmax")
    if kw.get("first_k_dense_replace", 0) >= kw["num_hidden_layers"]:
        kw.update(n_routed_experts=0, first_k_dense_replace=0)  # a dense MLA model: routing keys stay default
        for k in ("scoring_func", "n_group", "topk_group", "num_experts_per_tok"):
            kw.pop(k, None)
    if kind == "deepseek_v2" and hf.get("topk_method", "greedy") == "greedy":
        kw.update(n_group=1, topk_group=1)
    return ModelConfig(**kw)


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for f in files:
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f}: missing safetensors file")
        state.update(load_file(str(path / f)))
    return state


def from_hf(path) -> tuple[torch.nn.Module, ModelConfig]:
    """Load a HuggingFace DeepseekV3 / DeepseekV2 / Llama folder into our model -> (model, model_cfg).

    MTP modules start from their fresh initialisation (exports carry none).
    """
    from pretrain.model import build_model

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}/config.json: not a HuggingFace model folder")
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    validate_model(cfg)
    model = build_model(cfg)
    state = from_hf_state_dict(_read_safetensors(path), cfg.num_hidden_layers)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("mtp.") and not k.endswith("e_score_correction_bias")
               and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model, cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export",
                                     description="Write a HuggingFace checkpoint (no MTP) from a training run.")
    parser.add_argument("--checkpoint", required=True, help="run directory (uses `latest`) or a step_NNNNNNN dir")
    parser.add_argument("--output", required=True, help="output folder for the HuggingFace checkpoint")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--trust-unverified", action="store_true",
                        help="load a checkpoint without (or failing) its checksums.json; only for checkpoints you "
                             "produced (DeepSpeed's files are unpickled)")
    args = parser.parse_args(argv)
    try:
        from pretrain.checkpoint import load_model_from_checkpoint

        model, cfg, tokenizer = load_model_from_checkpoint(args.checkpoint, trust_unverified=args.trust_unverified)
        model_cfg = getattr(cfg, "model", cfg)
        out = to_hf(model, model_cfg, args.output, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, ImportError) as e:
        print(f"pretrain.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {hf_family(model_cfg)} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

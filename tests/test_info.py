"""pretrain.info: parameter counts vs the published sizes, FLOPs vs Megatron's convention, memory per rank."""
import json
import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.info import (_stage_activation_bytes, analytic_inventory, count_params, flops_breakdown,
                           flops_per_token, main, memory_per_rank, meta_inventory, model_info)
from pretrain.model import build_model

# Published sizes (papers / model cards): total, activated per token (None = dense, not reported).
PUBLISHED = {
    "deepseek-llm-7b": (6.9e9, None),
    "deepseek-llm-67b": (67e9, None),
    "deepseek-v2-lite": (15.7e9, 2.4e9),
    "deepseek-v2": (236e9, 21e9),
    "deepseek-v3": (671e9, 37e9),
}

# Small variants covering every branch of the inventory: MLA with/without query compression, GQA, MHA,
# dense, several dense-first layers, MTP depth 2, tied embeddings, softmax routing.
VARIANTS = [
    [],
    ["model.q_lora_rank=null"],
    ["model.attention=gqa", "model.num_key_value_heads=2"],
    ["model.attention=mha", "model.n_routed_experts=0", "model.num_nextn_predict_layers=0"],
    ["model.first_k_dense_replace=2", "model.num_hidden_layers=3", "model.num_nextn_predict_layers=2"],
    ["model.tie_word_embeddings=true", "model.scoring_func=softmax", "model.n_shared_experts=2"],
]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_sizes(preset):
    total, active = PUBLISHED[preset]
    c = count_params(load_config(preset).model)
    assert c["param_source"] == "meta"
    assert abs(c["total_params"] / total - 1) < 0.02, c
    if active is not None:
        assert abs(c["active_params"] / active - 1) < 0.06, c
    else:  # dense: everything but the input embedding is active
        assert c["active_params"] == c["total_params"] - c["embedding_params"]
    if preset == "deepseek-v3":
        # DeepSeek's README_WEIGHTS: "MTP modules: 11.5B unique parameters, excluding the shared 0.9B
        # embedding and 0.9B output head"; ours counts the same (unique) way.
        assert abs(c["mtp_params"] / 11.5e9 - 1) < 0.02, c
        assert abs(c["embedding_params"] / 0.9e9 - 1) < 0.05 and c["head_params"] == c["embedding_params"]
        # README_WEIGHTS: "Activation parameters: 36.6B (including 0.9B for the output head)" -- the
        # convention of active_params (input embedding excluded, head included), to the rounding.
        assert abs(c["active_params"] / 36.6e9 - 1) < 0.002, c
    else:
        assert c["mtp_params"] == 0


@pytest.mark.parametrize("preset", ["tiny", "small-moe", "deepseek-v3"])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_analytic_matches_meta_model(preset, overrides):
    m = load_config(preset, overrides).model
    assert analytic_inventory(m) == meta_inventory(m)


def test_meta_count_equals_materialised_model():
    m = load_config("tiny").model
    real = sum(p.numel() for p in build_model(m).parameters())
    c = count_params(m)
    assert real == c["total_params_with_mtp"] == c["total_params"] + c["mtp_params"]


def _non_gemm_params(m, layers: int, moe_layers: int) -> int:
    """Parameters Megatron's FLOP count leaves out: block norms and router weights."""
    return layers * 2 * m.hidden_size + moe_layers * m.n_routed_experts * m.hidden_size


def _core_attention_macs(m, seq: int) -> float:
    if m.attention == "mla":
        return seq * m.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) / 2
    return seq * m.num_attention_heads * m.attn_head_dim  # causal: half of 2 s x d products


@pytest.mark.parametrize("preset, overrides", [("tiny", v) for v in VARIANTS] + [("deepseek-v3", []),
                                                                                   ("deepseek-llm-67b", [])])
def test_flops_are_six_times_gemm_params_plus_causal_attention(preset, overrides):
    """Independent of the FLOP formula: 6 x (GEMM parameters used per token, from the meta model's
    classification) + 6 x the causal attention products, per layer."""
    m = load_config(preset, overrides).model
    c, seq = count_params(m), 4096
    n_moe = sum(m.is_moe and i >= m.first_k_dense_replace for i in range(m.num_hidden_layers))
    gemm = c["active_params"] - m.hidden_size - _non_gemm_params(m, m.num_hidden_layers, n_moe)  # - final norm
    f = flops_breakdown(m, seq)
    assert f["main"] == pytest.approx(6 * gemm + 6 * m.num_hidden_layers * _core_attention_macs(m, seq), rel=1e-12)
    D = m.num_nextn_predict_layers
    mtp_moe = int(m.is_moe and m.num_hidden_layers - 1 >= m.first_k_dense_replace)
    mtp_gemm = c["mtp_active_params"] - D * _non_gemm_params(m, 1, mtp_moe)  # includes the shared head
    assert f["mtp"] == pytest.approx(6 * mtp_gemm + 6 * D * _core_attention_macs(m, seq), rel=1e-12)
    assert flops_per_token(m, seq) == f["main"] + f["mtp"] and flops_per_token(m, seq, include_mtp=False) == f["main"]


def test_v3_flops_per_token():
    """Megatron's DeepSeek-V3 figure is ~250 GFLOP/token at seq 4096 without MTP. The band follows from
    the parts: 6 x 36.6B activated GEMM parameters ~ 219.8 GFLOP plus causal attention 6 x 61 layers x
    4096 x 128 x (192 + 128) / 2 ~ 30.7 GFLOP; +-2% covers rounding in the published figure, not a
    different convention (non-causal attention would add ~31 GFLOP, dropping the head ~5.6)."""
    m = load_config("deepseek-v3").model
    main_only = flops_per_token(m, 4096, include_mtp=False)
    assert 245e9 < main_only < 255e9, main_only
    mtp = flops_per_token(m, 4096) - main_only  # one more MoE block, 2h->h projection and logits
    assert 9e9 < mtp < 11e9, mtp


V3_BASE = dict(tp=1, pp=4, ep=8, dp=16)


@pytest.mark.parametrize("degree", ["tp", "pp", "ep", "dp"])
@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_memory_decreases_with_each_degree(degree, ckpt):
    cfg = load_config("deepseek-v3", [f"train.activation_checkpointing={ckpt}"])
    inv = analytic_inventory(cfg.model)
    more = {**V3_BASE, degree: V3_BASE[degree] * 2}
    base_b = memory_per_rank(cfg, inv, **V3_BASE)["memory_per_rank_bytes"]
    more_b = memory_per_rank(cfg, inv, **more)["memory_per_rank_bytes"]
    assert more_b < base_b, (degree, more_b, base_b)


def test_memory_bytes_per_parameter():
    """Exact weight/gradient/Adam bytes: fp32 = 4 + 4 + 8; bf16 = 2 + 2 + 12/dp (ZeRO-1); ZeRO-2 shards
    gradients; fp32 gradient accumulation makes gradients 4 B; stages partition the parameters."""
    cfg = load_config("tiny")
    inv, n = analytic_inventory(cfg.model), count_params(cfg.model)["total_params_with_mtp"]
    br = memory_per_rank(cfg, inv, 1, 1, 1, 1)["memory_breakdown"]
    assert (br["params_bytes"], br["grads_bytes"], br["optimizer_bytes"]) == (4 * n, 4 * n, 8 * n)
    cfg = load_config("tiny", ["train.precision=bf16", "model.n_routed_experts=0"])
    inv, n = analytic_inventory(cfg.model), count_params(cfg.model)["total_params_with_mtp"]
    br = memory_per_rank(cfg, inv, 1, 1, 1, 4)["memory_breakdown"]
    assert (br["params_bytes"], br["grads_bytes"], br["optimizer_bytes"]) == (2 * n, 2 * n, 12 * n // 4)
    cfg = load_config("tiny", ["train.precision=bf16", "model.n_routed_experts=0", "parallel.zero_stage=2"])
    cfg.deepspeed = {"data_types": {"grad_accum_dtype": "fp32"}}
    assert memory_per_rank(cfg, inv, 1, 1, 1, 4)["memory_breakdown"]["grads_bytes"] == 4 * n // 4
    stages = memory_per_rank(load_config("tiny"), analytic_inventory(load_config("tiny").model), 1, 2, 1, 1)
    assert sum(s["params_bytes"] for s in stages["memory_per_stage"]) == 4 * count_params(
        load_config("tiny").model)["total_params_with_mtp"]


def _saved_activation_bytes(cfg) -> int:
    """Bytes autograd saves for backward in one training forward of the real model (storages counted once)."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return sum(seen.values())


# bf16 only where the attention core is recomputed: on CPU, bf16 SDPA falls back to the math kernel, which
# keeps the s x s probabilities (in fp32); the estimate assumes flash-style kernels (fp32 CPU, GPU) that do not.
@pytest.mark.parametrize("precision, overrides, ckpt", [("fp32", v, c) for v in VARIANTS[:4]
                                                        for c in ("none", "selective", "full")]
                         + [("bf16", VARIANTS[0], "selective"), ("bf16", VARIANTS[0], "full")])
def test_activation_estimate_matches_saved_tensors(precision, overrides, ckpt):
    """Within 12% of what autograd really keeps for the model's training forward (pp = tp = 1)."""
    cfg = load_config("tiny", overrides + [f"train.activation_checkpointing={ckpt}", f"train.precision={precision}",
                                                "data.seq_length=64", "train.micro_batch_size=2"])
    layers = list(range(cfg.model.num_hidden_layers))
    estimate = _stage_activation_bytes(cfg, 0, layers, 1, 1, 1)["saved"]
    assert estimate == pytest.approx(_saved_activation_bytes(cfg), rel=0.12)


def test_cli_json(capsys):
    assert main(["--config", "deepseek-v3", "--pp", "16", "--ep", "64", "--dp", "128", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("total_params", "active_params", "mtp_params", "flops_per_token", "memory_per_rank_bytes"):
        assert key in info
    assert info["layout"] == {"tp": 1, "pp": 16, "ep": 64, "dp": 128, "world": 2048, "zero_stage": 1}
    assert info["flops_per_token"] == flops_per_token(load_config("deepseek-v3").model, 4096)
    assert info["memory_per_rank_bytes"] == max(s["total_bytes"] for s in info["memory_per_stage"])


def test_cli_table_and_overrides(capsys):
    assert main(["--config", "tiny", "train.activation_checkpointing=full"]) == 0
    out = capsys.readouterr().out
    assert "activated per token" in out and "ckpt full" in out and "meta model" in out


@pytest.mark.parametrize("args, key", [
    (["--tp", "3"], "model.num_attention_heads=128 is not divisible by tp=3"),
    (["--ep", "3"], "model.n_routed_experts=256 is not divisible by ep=3"),
    (["--ep", "8", "--dp", "12"], "ep=8 does not divide dp=12"),
    (["--pp", "100"], "model.num_hidden_layers=61 < pp=100"),
    (["--dp", "-2"], "--dp=-2: must be >= 1"),
])
def test_bad_layout_one_line(args, key, capsys):
    assert main(["--config", "deepseek-v3", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and key in err and "Traceback" not in err


def test_bad_layout_as_module_exits_2():
    r = subprocess.run([sys.executable, "-m", "pretrain.info", "--config", "deepseek-v2", "--tp", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.strip()
    assert err.startswith("error: parallel layout tp=3 ") and "\n" not in err
    assert err.endswith("model.num_attention_heads=128 is not divisible by tp=3; choose parallel.tp dividing the "
                        "number of heads")


def test_model_info_rejects_dense_ep():
    with pytest.raises(ConfigError, match="parallel.ep"):
        model_info(load_config("deepseek-llm-7b"), ep=2, dp=2)


def test_mla_preset_scales_down_its_heads(capsys):
    """MLA's key/value heads are its query heads: the preset's num_key_value_heads=128 (kept for export) must not
    refuse num_attention_heads=4 (regression: 'num_key_value_heads=128 must divide num_attention_heads=4')."""
    cfg = load_config("deepseek-v3", ["model.num_attention_heads=4"])
    assert cfg.model.kv_heads == 4
    m, full = cfg.model, load_config("deepseek-v3").model
    # 124 heads fewer in q_b (q_lora_rank x 192), kv_b (kv_lora_rank x 256) and o_proj (128 x h) of each of the
    # 61 layers (total_params leaves the MTP module out, as the published 671B does).
    per_head = m.q_lora_rank * 192 + m.kv_lora_rank * 256 + 128 * m.hidden_size
    assert count_params(full)["total_params"] - count_params(m)["total_params"] == 124 * 61 * per_head
    assert analytic_inventory(m) == meta_inventory(m)
    assert main(["--config", "deepseek-v3", "model.num_attention_heads=4", "--tp", "4", "--pp", "16", "--ep", "8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["tp"] == 4
    with pytest.raises(ConfigError, match="model.num_attention_heads=4"):
        model_info(cfg, tp=8)

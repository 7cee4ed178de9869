"""The presets carry the papers' pretraining and context-extension recipes (issue 13's table): LR and batch at
interior points of every phase, lambda/gamma, init std, plain RoPE for pretraining and YaRN for extension."""
import math

import pytest

from pretrain.config import load_config
from pretrain.model.layers import yarn_mscale
from pretrain.schedule import global_batch_at, loss_weights_at, lr_at, total_steps, validate_schedule

T = 10 ** 12  # one trillion tokens
PRETRAINING = ["deepseek-llm-7b", "deepseek-llm-67b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"]
EXTENSION = ["deepseek-v2-ext32k", "deepseek-v2-lite-ext32k", "deepseek-v3-ext32k", "deepseek-v3-ext128k"]

# preset, peak LR, total tokens, fractions of the tokens at the peak / after the first decay / after the second,
# the constant batch (None: ramped)
MULTI_STEP = [
    ("deepseek-llm-7b", 4.2e-4, 2 * T, [0.1, 0.5, 0.79], [0.85], [0.95], 2304),
    ("deepseek-llm-67b", 3.2e-4, 2 * T, [0.1, 0.5, 0.79], [0.85], [0.95], 4608),
    ("deepseek-v2-lite", 4.2e-4, 5.7 * T, [0.1, 0.5, 0.79], [0.85], [0.95], 4608),
    ("deepseek-v2", 2.4e-4, 8.1 * T, [0.1, 0.3, 0.59], [0.61, 0.75, 0.89], [0.91, 0.99], None),
]


def lr(cfg, tokens, step=10 ** 6):
    return lr_at(step, tokens, cfg)


@pytest.mark.parametrize("preset", PRETRAINING)
def test_pretraining_presets_use_plain_rope_at_4k_with_init_std_0006(preset):
    cfg = load_config(preset)
    assert cfg.model.rope_scaling is None
    assert cfg.data.seq_length == 4096 and cfg.model.max_position_embeddings == 4096
    assert cfg.model.initializer_range == 0.006
    assert cfg.schedule.warmup_steps == 2000
    assert lr_at(1000, 1000 * 2304 * 4096, cfg) == pytest.approx(cfg.optim.lr / 2, rel=1e-12)  # mid-warmup


@pytest.mark.parametrize("preset, peak, total, plateau, first, second, batch", MULTI_STEP)
def test_multi_step_presets(preset, peak, total, plateau, first, second, batch):
    cfg = load_config(preset)
    assert cfg.optim.lr == peak and cfg.train.total_tokens == total
    for f in plateau:
        assert lr(cfg, f * total) == peak
    for f in first:
        assert lr(cfg, f * total) == pytest.approx(0.316 * peak, rel=1e-12)
    # DeepSeek LLM: x0.1 of the peak at 90%; V2 and V2-Lite: x0.316 again (0.316^2 = 0.0999 to 0.1%).
    final = 0.1 if preset.startswith("deepseek-llm") else 0.316 ** 2
    for f in second:
        assert lr(cfg, f * total) == pytest.approx(final * peak, rel=1e-3)
    if batch is not None:
        assert {global_batch_at(f * total, cfg) for f in (0, 0.01, 0.5, 0.99)} == {batch}


@pytest.mark.parametrize("dp", [1, 8])
def test_v2_batch_ramps_gradually_from_2304_to_9216_over_225b_tokens(dp):
    cfg = load_config("deepseek-v2")
    validate_schedule(cfg, dp)  # u = micro batch 1 x dp
    assert cfg.train.batch_ramp_increment == dp
    assert global_batch_at(0, cfg) == 2304
    # 2304 + floor(6912 t / 225e9 / u) u
    assert global_batch_at(0.25 * 225e9, cfg) == 2304 + 1728
    assert global_batch_at(0.5 * 225e9, cfg) == 2304 + 3456
    assert global_batch_at(100e9, cfg) == 2304 + math.floor(6912 * 100 / 225 / dp) * dp
    assert global_batch_at(225e9, cfg) == global_batch_at(5 * T, cfg) == 9216


@pytest.mark.parametrize("dp", [1, 64])
def test_v3_recipe(dp):
    cfg = load_config("deepseek-v3")
    validate_schedule(cfg, dp)
    peak = 2.2e-4
    # LR: constant to 10T, cosine to 2.2e-5 over the next 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B.
    assert lr(cfg, 1e9) == lr(cfg, 5 * T) == lr(cfg, 9.99 * T) == peak
    assert lr(cfg, 10 * T) == pytest.approx(peak, rel=1e-12)
    assert lr(cfg, 12.15 * T) == pytest.approx((peak + 2.2e-5) / 2, rel=1e-9)  # cosine half way
    third = 10 * T + 4.3 * T / 3
    assert lr(cfg, third) == pytest.approx(2.2e-5 + (peak - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 3)), rel=1e-9)
    assert lr(cfg, 14.3 * T) == lr(cfg, 14.5 * T) == lr(cfg, 14.632 * T) == 2.2e-5
    assert lr(cfg, 14.633 * T) == lr(cfg, 14.7 * T) == lr(cfg, 14.8 * T - 1) == 7.3e-6
    # Batch: 3072 -> 15360 gradually over the first 469B tokens: 3072 + floor(12288 t / 469e9 / u) u.
    assert global_batch_at(0, cfg) == 3072
    assert global_batch_at(0.5 * 469e9, cfg) == 3072 + 6144
    assert global_batch_at(100e9, cfg) == 3072 + math.floor(12288 * 100 / 469 / dp) * dp
    assert global_batch_at(469e9, cfg) == global_batch_at(10 * T, cfg) == 15360
    # lambda 0.3 for 10T then 0.1; gamma 0.001 for 14.3T then 0.
    assert loss_weights_at(5 * T, cfg) == (0.3, 0.001)
    assert loss_weights_at(12 * T, cfg) == (0.1, 0.001)
    assert loss_weights_at(14.5 * T, cfg) == (0.1, 0.0)
    assert cfg.moe.seq_aux_alpha == 0.0001 and cfg.model.topk_group == 4 and cfg.mtp.loss_weight[0] == [0, 0.3]


def test_v2_family_balancing():
    assert load_config("deepseek-v2-lite").moe.aux_loss_alpha == 0.001
    v2 = load_config("deepseek-v2")
    assert v2.moe.aux_loss_alpha == 0.003 and v2.model.topk_group == 3 and v2.model.n_group == 8


# preset, sequence length, batch, constant LR, sqrt(t) = 0.1 mscale ln s + 1 with mscale
EXTENSIONS = [
    ("deepseek-v2-ext32k", 32768, 576, 2.4e-5, 0.707),
    ("deepseek-v2-lite-ext32k", 32768, 576, 4.2e-5, 0.707),
    ("deepseek-v3-ext32k", 32768, 1920, 7.3e-6, 1.0),
    ("deepseek-v3-ext128k", 131072, 480, 7.3e-6, 1.0),
]


@pytest.mark.parametrize("preset, seq, batch, lr_value, mscale", EXTENSIONS)
def test_extension_presets(preset, seq, batch, lr_value, mscale):
    cfg = load_config(preset)
    rs = cfg.model.rope_scaling
    assert rs["type"] == "yarn" and rs["factor"] == 40 and rs["beta_fast"] == 32 and rs["beta_slow"] == 1
    assert rs["original_max_position_embeddings"] == 4096 and rs["mscale"] == rs["mscale_all_dim"] == mscale
    assert yarn_mscale(40, mscale) == pytest.approx((0.0707 if mscale < 1 else 0.1) * math.log(40) + 1, rel=1e-3)
    assert cfg.data.seq_length == seq and total_steps(cfg) == 1000
    tokens_per_step = batch * seq
    for step in (1, 500, 1000):
        assert lr_at(step, (step - 1) * tokens_per_step, cfg) == lr_value
        assert global_batch_at((step - 1) * tokens_per_step, cfg) == batch
    assert cfg.model.initializer_range == 0.006
    if cfg.model.num_nextn_predict_layers:  # V3: lambda and gamma at their final pretraining values
        assert loss_weights_at(0, cfg) == (0.1, 0.0)


@pytest.mark.parametrize("preset", PRETRAINING[2:] + EXTENSION)
def test_export_writes_the_released_rope_config(preset):
    """An extended model exports YaRN as in DeepSeek's released config.json; a pretraining one plain RoPE."""
    from pretrain.export import hf_config

    cfg = load_config(preset).model
    rope = hf_config(cfg).to_dict()["rope_parameters"]
    if preset in EXTENSION:
        mscale = 1.0 if "v3" in preset else 0.707
        assert rope == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "beta_fast": 32, "beta_slow": 1,
                        "original_max_position_embeddings": 4096, "mscale": mscale, "mscale_all_dim": mscale}
        assert cfg.max_position_embeddings == 163840
    else:
        assert rope == {"rope_type": "default", "rope_theta": 10000.0}


def test_info_prints_the_recipe_phase_by_phase(capsys):
    from pretrain.info import main

    assert main(["--config", "deepseek-v3", "--dp", "64", "--schedule"]) == 0
    out = capsys.readouterr().out.split("tokens  ")[1]  # the schedule table, after the model table
    rows = [line.split() for line in out.splitlines()[1:7]]
    # tokens, steps, LR, shape, batch, lambda, gamma per phase: warmup, ramp, plateau, cosine, 2.2e-5, 7.3e-6
    assert [r[-1] for r in rows] == ["0.001"] * 4 + ["0", "0"]
    assert [r[-2] for r in rows] == ["0.3"] * 3 + ["0.1"] * 3
    assert rows[0][:3] == ["0", "-", "27.78B"] and "warmup" in rows[0] and rows[0][-5:-2] == ["3,072", "->", "3,776"]
    assert rows[2][:3] == ["469B", "-", "10T"] and rows[2][-3] == "15,360"
    assert rows[3][:3] == ["10T", "-", "14.3T"] and rows[3][6:10] == ["0.00022", "->", "2.2e-05", "cosine"]
    assert rows[5][:3] == ["14.63T", "-", "14.8T"] and rows[5][6] == "7.3e-06"
    assert "batch ramp 3072 -> 15360 over 469B tokens in steps of 64 (micro batch 1 x dp 64)" in out


def test_info_plot_writes_a_png_or_says_what_is_missing(tmp_path, capsys, monkeypatch):
    from pretrain.info import main

    path = tmp_path / "v2.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert main(["--config", "deepseek-v2", "--plot", str(path)]) == 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    assert main(["--config", "deepseek-v2", "--plot", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m pretrain.info --plot needs matplotlib") and err.count("\n") == 1

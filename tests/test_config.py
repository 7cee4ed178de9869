"""Config loading, overrides and one-line validation errors."""
import pytest

from pretrain.config import ConfigError, load_config, list_presets, step_value_at


def test_presets_load():
    names = list_presets()
    for want in ("tiny", "small-moe", "deepseek-llm-7b", "deepseek-llm-67b", "deepseek-v2-lite", "deepseek-v2",
                 "deepseek-v3"):
        assert want in names
        load_config(want)


def test_overrides_types():
    cfg = load_config("tiny", ["train.steps=7", "optim.lr=1e-4", "model.q_lora_rank=null",
                               "schedule.decay_points=[0.5, 0.75]", "model.norm_topk_prob=false"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-4 and cfg.model.q_lora_rank is None
    assert cfg.schedule.decay_points == [0.5, 0.75] and cfg.model.norm_topk_prob is False


@pytest.mark.parametrize("override, key", [
    (["model.n_group=3"], "model.n_group"),
    (["model.topk_group=5"], "model.topk_group"),
    (["model.num_experts_per_tok=9"], "model.num_experts_per_tok"),
    (["model.attention=gqa", "model.num_key_value_heads=3"], "model.num_key_value_heads"),
    (["model.bogus=1"], "model.bogus"),
    (["bogus.key=1"], "bogus"),
    (["train.precision=fp16"], "train.precision"),
    (["train.global_batch_size=7"], "train.global_batch_size"),
    (["schedule.decay_factors=[0.5]"], "schedule.decay_points"),
    (["train.steps=abc"], "train.steps"),
    (["train.compile=inductor"], "train.compile"),
    (["train.compile=model", "parallel.pp=2"], "train.compile=model with parallel.pp=2"),
])
def test_bad_config_one_line(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override)
    msg = str(e.value)
    assert "\n" not in msg and key in msg


def test_missing_preset():
    with pytest.raises(ConfigError, match="no such file or preset"):
        load_config("no-such-preset")


def test_step_value():
    spec = [[0, 0.3], [100, 0.1]]
    assert step_value_at(spec, 0) == 0.3 and step_value_at(spec, 99.9) == 0.3 and step_value_at(spec, 100) == 0.1
    assert step_value_at(0.25, 1e9) == 0.25

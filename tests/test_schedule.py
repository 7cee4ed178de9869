"""LR schedules and batch-size ramp-up: exact values at warmup, inside plateaus and at boundaries."""
import math

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.schedule import (global_batch_at, loss_weights_at, lr_at, steps_for_tokens, tokens_at_step,
                               total_samples, total_steps, total_tokens, validate_schedule)

SEQ, GBS = 32, 8
TOK_PER_STEP = SEQ * GBS  # 256


def cfg_for(*overrides):
    return load_config("tiny", ["train.steps=null", "train.total_tokens=256000", "optim.lr=1.0e-3",
                                "schedule.warmup_steps=10", *overrides])


def test_multi_step_exact_values():
    cfg = cfg_for()
    total = 256000  # decay points at 204800 (80%) and 230400 (90%)
    assert lr_at(1, 0, cfg) == pytest.approx(1e-3 * 1 / 10, rel=0, abs=1e-15)
    assert lr_at(5, 4 * TOK_PER_STEP, cfg) == pytest.approx(5e-4, abs=1e-15)
    assert lr_at(10, 9 * TOK_PER_STEP, cfg) == pytest.approx(1e-3, abs=1e-15)    # last warmup step = peak
    assert lr_at(11, 10 * TOK_PER_STEP, cfg) == 1e-3                             # constant plateau
    assert lr_at(500, 0.5 * total, cfg) == 1e-3
    assert lr_at(800, 0.8 * total - 1, cfg) == 1e-3                              # just before the first point
    assert lr_at(801, 0.8 * total, cfg) == pytest.approx(0.316e-3, abs=1e-15)   # at the boundary: stepped
    assert lr_at(850, 0.85 * total, cfg) == pytest.approx(0.316e-3, abs=1e-15)
    assert lr_at(900, 0.9 * total - 1, cfg) == pytest.approx(0.316e-3, abs=1e-15)
    assert lr_at(901, 0.9 * total, cfg) == pytest.approx(0.1e-3, abs=1e-15)
    assert lr_at(1000, total - TOK_PER_STEP, cfg) == pytest.approx(0.1e-3, abs=1e-15)


def test_multi_step_is_token_based_not_step_based():
    cfg = cfg_for()
    # The same step number with different tokens seen (a bigger batch earlier) gives the token-based LR.
    assert lr_at(100, 0.8 * 256000, cfg) == pytest.approx(0.316e-3, abs=1e-15)
    assert lr_at(900, 0.5 * 256000, cfg) == 1e-3


def test_cosine_exact_values():
    cfg = cfg_for("schedule.name=cosine", "schedule.min_lr_ratio=0.1")
    start = 10 * TOK_PER_STEP  # warmup ends after 10 steps of 256 tokens
    total = 256000
    assert lr_at(3, 2 * TOK_PER_STEP, cfg) == pytest.approx(3e-4, abs=1e-15)
    assert lr_at(11, start, cfg) == pytest.approx(1e-3, abs=1e-15)
    mid = start + (total - start) / 2
    assert lr_at(500, mid, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5, abs=1e-15)
    q = start + (total - start) / 4
    assert lr_at(300, q, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert lr_at(1000, total, cfg) == pytest.approx(1e-4, abs=1e-15)


def test_wsd_exact_values():
    cfg = cfg_for("schedule.name=wsd", "schedule.wsd_decay_fraction=0.2", "schedule.min_lr_ratio=0.0")
    total = 256000
    assert lr_at(2, TOK_PER_STEP, cfg) == pytest.approx(2e-4, abs=1e-15)
    assert lr_at(400, 0.5 * total, cfg) == 1e-3
    assert lr_at(800, 0.8 * total - 1, cfg) == 1e-3
    assert lr_at(801, 0.8 * total, cfg) == pytest.approx(1e-3, abs=1e-15)       # decay starts at 80%
    assert lr_at(900, 0.9 * total, cfg) == pytest.approx(0.5e-3, abs=1e-15)
    assert lr_at(1000, total, cfg) == pytest.approx(0.0, abs=1e-15)


def test_steps_and_tokens_without_rampup():
    cfg = cfg_for()
    assert total_steps(cfg) == 1000 and total_tokens(cfg) == 256000 and total_samples(cfg) == 8000
    assert tokens_at_step(7, cfg) == 7 * TOK_PER_STEP
    cfg = load_config("tiny", ["train.steps=12"])
    assert total_steps(cfg) == 12 and total_tokens(cfg) == 12 * TOK_PER_STEP and total_samples(cfg) == 96
    cfg = cfg_for("train.total_tokens=1000")  # not a whole number of steps: round up
    assert total_steps(cfg) == 4


def assert_walk_matches_steps(cfg, num_steps=60):
    """tokens_at_step's segment walk equals taking the steps one by one with global_batch_at."""
    expected, tokens = [0], 0
    for _ in range(num_steps):
        tokens += global_batch_at(tokens, cfg) * SEQ
        expected.append(tokens)
    assert [tokens_at_step(n, cfg) for n in range(num_steps + 1)] == expected


def test_batch_size_rampup():
    # Batch 2 until 640 tokens, 4 until 2048 tokens, then 8 (= global_batch_size).
    cfg = cfg_for("train.batch_size_rampup=[[0, 2], [640, 4], [2048, 8]]", "train.total_tokens=10240")
    assert global_batch_at(0, cfg) == 2 and global_batch_at(639, cfg) == 2
    assert global_batch_at(640, cfg) == 4 and global_batch_at(2048, cfg) == 8
    # Step by step: batch 2 (64 tokens/step) x 10 steps = 640; batch 4 (128) x 11 steps = 2048;
    # then batch 8 (256) x 32 steps = 10240.
    assert_walk_matches_steps(cfg)
    assert tokens_at_step(10, cfg) == 640 and tokens_at_step(21, cfg) == 2048
    assert total_steps(cfg) == 10 + 11 + 32 and steps_for_tokens(2048, cfg) == 21
    assert total_samples(cfg) == 10240 // SEQ
    # Overshooting a boundary: batch 2 x 64 tokens never lands on 100 exactly -> 2 steps (128 tokens).
    cfg2 = cfg_for("train.batch_size_rampup=[[0, 2], [100, 8]]")
    assert tokens_at_step(2, cfg2) == 128 and tokens_at_step(3, cfg2) == 128 + 256
    # A token-based decay point is unaffected by the ramp: it depends on tokens, not on the step count.
    assert lr_at(40, 0.8 * 10240, cfg) == pytest.approx(0.316e-3, abs=1e-15)


@pytest.mark.parametrize("ramp, dp, key", [
    ("[[0, 2], [640, 4]]", 1, "train.global_batch_size"),   # ends at 4 != 8
    ("[[0, 3], [640, 8]]", 1, "batch 3"),                   # not a multiple of micro 2
    ("[[640, 2], [0, 8]]", 1, "increasing"),
])
def test_rampup_errors(ramp, dp, key):
    cfg = cfg_for(f"train.batch_size_rampup={ramp}")
    with pytest.raises(ConfigError, match=key):
        validate_schedule(cfg, dp)


def test_global_batch_must_split_over_data_parallel():
    with pytest.raises(ConfigError, match=r"train.global_batch_size=8 .* 2 x 3"):
        validate_schedule(cfg_for(), 3)
    validate_schedule(cfg_for(), 4)


def test_lambda_and_gamma_step_changes():
    cfg = cfg_for("mtp.loss_weight=[[0, 0.3], [1000, 0.1]]", "moe.bias_update_speed=[[0, 0.001], [500, 0]]")
    assert loss_weights_at(0, cfg) == (0.3, 0.001)
    assert loss_weights_at(499, cfg) == (0.3, 0.001)
    assert loss_weights_at(500, cfg) == (0.3, 0.0)
    assert loss_weights_at(1000, cfg) == (0.1, 0.0)
    assert loss_weights_at(10, cfg_for()) == (0.3, 0.001)


# ----------------------------------------------------------------------------------- piecewise (V3) schedule

PHASES = ("schedule.phases=[{until_tokens: 102400, shape: constant}, {until_tokens: 204800, shape: cosine, "
          "lr_end: 1.0e-4}, {until_tokens: 230400, shape: linear, lr_end: 0.5e-4}, {shape: constant, lr_end: 2.0e-5}]")


def test_piecewise_exact_values():
    cfg = cfg_for("schedule.name=piecewise", PHASES)
    start = 10 * TOK_PER_STEP  # warmup ends after 10 steps (2560 tokens); the first phase starts there
    assert lr_at(5, 4 * TOK_PER_STEP, cfg) == pytest.approx(5e-4, abs=1e-15)
    assert lr_at(11, start, cfg) == 1e-3 and lr_at(300, 102399, cfg) == 1e-3               # constant at the peak
    assert lr_at(401, 102400, cfg) == pytest.approx(1e-3, abs=1e-15)                     # cosine starts at the peak
    assert lr_at(600, 153600, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5, abs=1e-15)      # half way: the mean
    q = 102400 + 102400 / 4
    assert lr_at(500, q, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert lr_at(801, 204800, cfg) == pytest.approx(1e-4, abs=1e-15)                     # linear from the cosine's end
    assert lr_at(850, 217600, cfg) == pytest.approx(0.75e-4, abs=1e-15)
    assert lr_at(901, 230400, cfg) == 2e-5 and lr_at(1000, 255744, cfg) == 2e-5          # last phase, to the end
    assert lr_at(1001, 10 ** 9, cfg) == 2e-5                                              # past the end: held


def test_piecewise_first_phase_decays_from_the_end_of_warmup_and_constant_schedule():
    cfg = cfg_for("schedule.name=piecewise", "schedule.phases=[{shape: linear, lr_end: 0}]")
    start = 10 * TOK_PER_STEP
    assert lr_at(11, start, cfg) == 1e-3
    assert lr_at(500, start + (256000 - start) / 2, cfg) == pytest.approx(0.5e-3, abs=1e-15)
    cfg = cfg_for("schedule.name=constant", "schedule.warmup_steps=0")
    assert lr_at(1, 0, cfg) == 1e-3 and lr_at(1000, 255744, cfg) == 1e-3


@pytest.mark.parametrize("phases, message", [
    ("[]", r"schedule.phases is empty"),
    ("[{until_tokens: 100, shape: cosine}]", r"schedule.phases\[0\].lr_end: a cosine phase needs"),
    ("[{until_tokens: 100, shape: step}]", r"schedule.phases\[0\].shape='step': use constant, cosine, linear"),
    ("[{shape: constant}, {until_tokens: 100}]", r"schedule.phases\[0\].until_tokens is null: only the last"),
    ("[{until_tokens: 100}, {until_tokens: 50}]", r"schedule.phases\[1\].until_tokens=50: .* increasing"),
    ("[{until_tokens: 100, lr: 0.1}]", r"schedule.phases\[0\].lr: unknown key"),
    ("[{until_tokens: -5}]", r"schedule.phases\[0\].until_tokens=-5: expected a non-negative token count"),
    ("[7]", r"schedule.phases\[0\]=7: expected a mapping"),
])
def test_piecewise_errors_are_one_line(phases, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg_for("schedule.name=piecewise", f"schedule.phases={phases}")
    assert "\n" not in str(e.value)


def test_piecewise_reads_yaml_exponents_without_sign():
    # YAML 1.1 reads 1.0e12 (no exponent sign) as a string; a phase's numbers accept it.
    cfg = cfg_for("schedule.name=piecewise", "schedule.phases=[{until_tokens: 1.0e5, shape: cosine, lr_end: 1e-4}]")
    assert cfg.schedule.phases == [{"until_tokens": 100000, "shape": "cosine", "lr_end": 1e-4}]


# ------------------------------------------------------------------------------- gradual (Megatron) batch ramp

def ramp_cfg(*overrides):
    # micro batch 2; the batch grows from 2 to 8 over 1200 tokens: 2 + floor(6 t / 1200 / u) u.
    return cfg_for("train.batch_ramp_start=2", "train.batch_ramp_tokens=1200", "train.total_tokens=10240",
                   *overrides)


def test_gradual_ramp_formula_and_exact_step_walk():
    cfg = ramp_cfg()
    validate_schedule(cfg, 1)  # fills the increment: micro batch 2 x dp 1
    assert cfg.train.batch_ramp_increment == 2
    # u = 2: +2 every 400 tokens -> 2 below 400, 4 from 400, 6 from 800, 8 from 1200 on.
    assert [global_batch_at(t, cfg) for t in (0, 399, 400, 799, 800, 1199, 1200, 10 ** 6)] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert_walk_matches_steps(cfg)
    # 2 x 32 = 64 tokens/step: 7 steps reach 448 >= 400; batch 4 (128/step): 3 steps -> 832; batch 6 (192):
    # 2 steps -> 1216; then batch 8 (256/step): ceil((10240 - 1216) / 256) = 36 steps.
    assert tokens_at_step(7, cfg) == 448 and tokens_at_step(12, cfg) == 1216
    assert total_steps(cfg) == 7 + 3 + 2 + 36 and steps_for_tokens(1216, cfg) == 12


def test_gradual_ramp_increment_is_micro_batch_times_dp_and_errors():
    cfg = ramp_cfg("train.batch_ramp_start=4")
    validate_schedule(cfg, 2)  # u = 2 x 2 = 4: 4 + floor(4 t / 1200 / 4) 4 -> one jump, at the end of the ramp
    assert cfg.train.batch_ramp_increment == 4
    assert [global_batch_at(t, cfg) for t in (0, 1199, 1200)] == [4, 4, 8]
    with pytest.raises(ConfigError, match=r"train.batch_ramp_start=2 and train.global_batch_size=8 must be "
                                          r"multiples of the ramp increment 4"):
        validate_schedule(ramp_cfg(), 2)
    with pytest.raises(ConfigError, match=r"train.batch_ramp_increment=2 is not a multiple of .* = 4"):
        validate_schedule(ramp_cfg("train.batch_ramp_increment=2"), 2)


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_ramp_start=2"], "set both"),
    (["train.batch_ramp_start=16", "train.batch_ramp_tokens=100"], r"train.batch_ramp_start=16: must be in \(0, "),
    (["train.batch_ramp_start=2", "train.batch_ramp_tokens=100", "train.batch_size_rampup=[[0, 2], [50, 8]]"],
     "use one ramp"),
])
def test_gradual_ramp_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_for(*overrides)

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


def test_batch_size_rampup():
    # Batch 2 until 640 tokens, 4 until 2048 tokens, then 8 (= global_batch_size).
    cfg = cfg_for("train.batch_size_rampup=[[0, 2], [640, 4], [2048, 8]]", "train.total_tokens=10240")
    assert global_batch_at(0, cfg) == 2 and global_batch_at(639, cfg) == 2
    assert global_batch_at(640, cfg) == 4 and global_batch_at(2048, cfg) == 8
    # Step by step: batch 2 (64 tokens/step) x 10 steps = 640; batch 4 (128) x 11 steps = 2048;
    # then batch 8 (256) x 32 steps = 10240.
    expected, tokens = [0], 0
    for _ in range(60):
        tokens += global_batch_at(tokens, cfg) * SEQ
        expected.append(tokens)
    assert [tokens_at_step(n, cfg) for n in range(61)] == expected
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

"""The post-training stages in the four-process layouts (tp2-dp2-ep2, pp2-dp2-ep2, tp2-pp2) give the single
process's losses: posttrain.sft / rm / dpo at the tolerances of tests/test_posttrain_loop.py's two-process layouts,
posttrain.grpo / ppo on the fixed rollouts (tests/grpo_fixed.py) at those of tests/test_grpo.py. Same data,
single-process references and launchers as those tests (conftest.py, helpers.py).

OPT-IN: the plain ``python3 -m pytest tests`` (CI) skips them (``layouts4`` marker, conftest.py); four processes
on 2 cores take 10-30 s per test, about 4 minutes for the 15 (5 stages x 3 layouts):

    python3 -m pytest tests -m layouts4 --layouts4
"""
from __future__ import annotations

import pytest

from helpers import POSTTRAIN_METRICS, PPO_ARGS, PPO_KEYS, RL_KEYS, RL_STEPS, assert_same_losses, grpo, losses, \
    posttrain

LAYOUTS = {"tp2-dp2-ep2": ("parallel.tp=2", "parallel.ep=2"),
           "pp2-dp2-ep2": ("parallel.pp=2", "parallel.ep=2"),
           "tp2-pp2": ("parallel.tp=2", "parallel.pp=2")}

# pp2-dp2-ep2 cuts the stages without MTP (rm, dpo, grpo, ppo) as "embedding, layer 0 | layer 1, norm, head":
# stage 0 holds no expert (pretrain.engine._grad_norm_over_stages)
CASES = [pytest.param(stage, layout, id=f"{stage}-{layout}")
         for layout in LAYOUTS for stage in ("sft", "rm", "dpo", "grpo", "ppo")]


@pytest.mark.slow
@pytest.mark.layouts4
@pytest.mark.parametrize("stage,layout", CASES)
def test_four_process_layout_gives_the_single_process_losses(stage, layout, request, tmp_path, monkeypatch):
    out = tmp_path / "run"
    if stage in POSTTRAIN_METRICS:  # sft, rm, dpo
        posttrain(stage, out, request.getfixturevalue("chat_data"), *LAYOUTS[layout], nproc=4)
        assert_same_losses(losses(out), request.getfixturevalue("single")[stage], POSTTRAIN_METRICS[stage])
    elif stage == "grpo":
        grpo(out, request.getfixturevalue("rl_data"), monkeypatch, *LAYOUTS[layout], nproc=4, fixed=True)
        assert_same_losses(losses(out), request.getfixturevalue("fixed_single"), RL_KEYS, steps=RL_STEPS, atol=1e-6)
    else:  # ppo
        grpo(out, request.getfixturevalue("rl_data"), monkeypatch, *PPO_ARGS, *LAYOUTS[layout], nproc=4, fixed=True,
             stage="ppo")
        assert_same_losses(losses(out), losses(request.getfixturevalue("ppo_single")), PPO_KEYS, steps=RL_STEPS,
                           atol=1e-6)

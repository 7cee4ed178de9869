"""Fixtures shared by the test modules; the helper functions are in tests/helpers.py (imported from there).

Session-scoped: each shared run is trained once per pytest invocation, whichever modules use it. The runs are
read-only for the tests (a test that changes one copies it first).

    python3 -m pytest tests                 # everything (CI)
    python -m pytest tests -m "not slow"    # unit tests and the fast end-to-end ones (< 3 minutes)
    python3 -m pytest tests -m layouts4 --layouts4   # opt-in: the four-process post-training layouts

Tests marked ``layouts4`` (four processes each, minutes on 2 cores) are skipped unless ``--layouts4`` is given.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from helpers import PPO_ARGS, POSTTRAIN_METRICS, grpo, losses, posttrain, run_train, train, trained_tokenizer, \
    write_token_dir


def pytest_addoption(parser):
    parser.addoption("--layouts4", action="store_true",
                     help="also run the tests marked layouts4 (four-process post-training layouts; slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--layouts4"):
        return
    skip = pytest.mark.skip(reason="four-process layout test: opt in with --layouts4 "
                                   "(python3 -m pytest tests -m layouts4 --layouts4)")
    for item in items:
        if "layouts4" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Synthetic documents made of repeated random phrases: learnable, so the loss moves over 3 steps."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 512, rng.integers(5, 20)) for _ in range(40)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 40, 30)]) for _ in range(60)]
    return write_token_dir(str(tmp_path_factory.mktemp("data") / "train"), docs, vocab_size=512)


@pytest.fixture(scope="session")
def reference(data_dir, tmp_path_factory):
    """The layout tests' single-process run (``helpers.train``: 3 steps): its metrics. The run directory is
    ``<basetemp>/ref*/run``."""
    return train(tmp_path_factory.mktemp("ref") / "run", data_dir, 1)


@pytest.fixture(scope="session")
def checkpoint_reference(data_dir, tmp_path_factory):
    """The reliability tests' uninterrupted single-process run (``helpers.run_train``), a checkpoint after every
    step (all four kept): its run directory."""
    from pretrain.checkpoint import complete_tags
    out = tmp_path_factory.mktemp("rel_ref") / "run"
    run_train(out, data_dir, "train.keep_last=4")
    assert complete_tags(out)[:1] == ["step_0000004"]
    return out


# ------------------------------------------------------------------------------ post-training

@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """Arithmetic SFT conversations, preference pairs and held-out items (posttrain.arithmetic) + a tokenizer."""
    from posttrain.arithmetic import write
    out = tmp_path_factory.mktemp("chat")
    shutil.copy(trained_tokenizer(500), out / "tok.model")  # 500 + 3 chat pieces fit the tiny preset's 512
    return {**write(out, 64, 8), "tokenizer": str(out / "tok.model")}


@pytest.fixture(scope="session")
def single(chat_data, tmp_path_factory):
    """The single-process runs of posttrain.sft / rm / dpo (``helpers.posttrain``, fp32): their metrics."""
    root = tmp_path_factory.mktemp("single")
    return {stage: losses(posttrain(stage, root / stage, chat_data) and root / stage) for stage in POSTTRAIN_METRICS}


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory):
    """16 ``a+b=`` prompts with their answers (rl.jsonl) and a tokenizer (tok.model): the GRPO / PPO runs' data."""
    out = tmp_path_factory.mktemp("rl")
    shutil.copy(trained_tokenizer(500), out / "tok.model")
    rng = random.Random(0)
    with open(out / "rl.jsonl", "w") as f:
        for _ in range(16):
            a, b = rng.randint(100, 999), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return out


@pytest.fixture(scope="session")
def fixed_single(rl_data, tmp_path_factory):
    """GRPO on one process on the fixed rollouts (tests/grpo_fixed.py): its metrics (the run directory is
    ``<basetemp>/fixed*/run``)."""
    out = tmp_path_factory.mktemp("fixed") / "run"
    with pytest.MonkeyPatch.context() as mp:
        grpo(out, rl_data, mp, fixed=True)
    return losses(out)


@pytest.fixture(scope="session")
def ppo_single(rl_data, tmp_path_factory):
    """PPO on one process on the fixed rollouts: its run directory."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        grpo(out, rl_data, mp, *PPO_ARGS, fixed=True, stage="ppo")
    return out

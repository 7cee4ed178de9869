"""Fixtures shared by the test modules; the helper functions are in tests/helpers.py (imported from there).

Session-scoped: each shared run is trained once per pytest invocation, whichever modules use it. The runs are
read-only for the tests (a test that changes one copies it first).

    python3 -m pytest tests                 # everything (CI)
    python -m pytest tests -m "not slow"    # unit tests and the fast end-to-end ones (< 3 minutes)
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import run_train, train, write_token_dir


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

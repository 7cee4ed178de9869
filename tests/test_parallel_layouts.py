"""End to end: ``python -m pretrain.train`` on the tiny preset (MLA + MoE + MTP, fp32, clipping active) gives the
single-process losses and gradient norms over 3 optimizer steps in every layout (relative difference < 1e-4).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import write_token_dir
from parallel.testing import free_port

pytestmark = pytest.mark.slow
STEPS = 3


def _moe_groups_supported() -> bool:
    """DeepSpeed splits expert parameters out of the optimizer groups by group name (deepspeed/moe/utils.py)."""
    import torch
    from pretrain.engine import param_groups
    return all("name" in g for g in param_groups(torch.nn.Linear(2, 2), 0.1))


needs_named_groups = pytest.mark.xfail(
    not _moe_groups_supported(), strict=True,
    reason="pretrain.engine.param_groups must give each group a 'name' for DeepSpeed's MoE parameter split")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic documents made of repeated random phrases: learnable, so the loss moves over 3 steps."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 512, rng.integers(5, 20)) for _ in range(40)]
    docs = [np.concatenate([phrases[i] for i in rng.integers(0, 40, 30)]) for _ in range(60)]
    return write_token_dir(str(tmp_path_factory.mktemp("data") / "train"), docs, vocab_size=512)


def train(out_dir, data_dir, nproc, *overrides):
    args = ["-m", "pretrain.train", "--config", "tiny", f"data.paths=[{data_dir}]", f"train.output_dir={out_dir}",
            f"train.steps={STEPS}", "train.log_interval=1", *overrides]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600,
                          env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{overrides} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref") / "run", data_dir, 1)


@pytest.mark.parametrize("nproc, layout", [
    (2, ["parallel.tp=2"]),
    pytest.param(2, ["parallel.ep=2"], marks=needs_named_groups),
    pytest.param(4, ["parallel.tp=2", "parallel.ep=2"], marks=needs_named_groups),
], ids=["tp2", "dp2-ep2", "tp2-dp2-ep2"])
def test_layout_equals_single_process(reference, data_dir, tmp_path, tmp_path_factory, nproc, layout):
    got = train(tmp_path / "run", data_dir, nproc, *layout)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert reference[1]["grad_norm"] > 1.0  # clipping (optim.grad_clip = 1) is active: the norm must be exact
    for want, have in zip(reference, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(have[key] - want[key]) <= 1e-4 * abs(want[key]), (layout, want["step"], key, want, have)

    # Export's consolidation: TP and expert shards merge back into the single-process weights.
    import torch
    from pretrain.checkpoint import load_model_from_checkpoint
    ref_dir = next(tmp_path_factory.getbasetemp().glob("ref*/run/latest")).parent
    ours = load_model_from_checkpoint(tmp_path / "run")[0].state_dict()
    want = load_model_from_checkpoint(ref_dir)[0].state_dict()
    assert ours.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=0, atol=1e-5, msg=name)

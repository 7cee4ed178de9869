"""End to end: ``python -m pretrain.train`` on the tiny preset (MLA + MoE + MTP, fp32, clipping active) gives the
single-process losses and gradient norms over 3 optimizer steps in every layout (relative difference < 1e-4).
"""
import pytest

from helpers import STEPS, train

pytestmark = pytest.mark.slow


def _moe_groups_supported() -> bool:
    """DeepSpeed splits expert parameters out of the optimizer groups by group name (deepspeed/moe/utils.py)."""
    import torch
    from pretrain.engine import param_groups
    return all("name" in g for g in param_groups(torch.nn.Linear(2, 2), 0.1))


needs_named_groups = pytest.mark.xfail(
    not _moe_groups_supported(), strict=True,
    reason="pretrain.engine.param_groups must give each group a 'name' for DeepSpeed's MoE parameter split")


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

"""Pipeline parallelism end to end: ``python -m pretrain.train`` with ``parallel.pp=2`` (DeepSpeed PipelineModule,
1F1B ``train_batch``) on the tiny preset (MLA + MoE + MTP, fp32, clipping active) gives the single-process losses
and gradient norms (relative difference < 1e-4) in the layouts pp2, pp2 dp2 ep2 (across a resume) and tp2 pp2;
export from the tp2 pp2 run matches the single-process export's logits in transformers; resuming in the pp2
layout is exact.

The launcher (``helpers.train``) and the single-process reference (the ``reference`` fixture) are shared
with ``test_parallel_layouts``.
"""
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import STEPS, train


def _assert_matches(reference, got, layout):
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert max(r["grad_norm"] for r in reference) > 1.0  # clipping (optim.grad_clip = 1) is active
    for want, have in zip(reference, got):
        for key in ("loss", "lm_loss", "mtp_loss", "seq_aux_loss", "grad_norm"):
            assert abs(have[key] - want[key]) <= 1e-4 * abs(want[key]), (layout, want["step"], key, want, have)


@pytest.fixture(scope="module")
def pp2_run(data_dir, tmp_path_factory):
    """pp2, stages balanced by parameters: (embedding, dense layer, MoE layer) | (MTP embedding, head, MTP).
    Checkpoints at steps 2 and 3 (the resume test restarts from step 2)."""
    out = tmp_path_factory.mktemp("pp2") / "run"
    return out, train(out, data_dir, 2, "parallel.pp=2", "train.save_interval=2")


@pytest.mark.slow
def test_pp2_equals_single_process(reference, pp2_run):
    _assert_matches(reference, pp2_run[1], "pp2")


def _reference_dir(tmp_path_factory):
    """The run directory of the ``reference`` fixture (it returns only the metrics)."""
    return next(tmp_path_factory.getbasetemp().glob("ref*/run/latest")).parent


@pytest.mark.slow
def test_pp2_dp2_ep2_equals_single_process_across_a_resume(reference, data_dir, tmp_path,
                                                           tmp_path_factory):
    """Stopped at step 2 and resumed: each EP rank must get its own experts back (DeepSpeed's MoE checkpoint
    path would hand every rank EP rank 0's); the gathered checkpoint equals the single-process weights. One layer
    per stage: stage 0 holds the dense layer 0 and no expert (no MoE optimizer group: the stages' ZeRO gradient-norm
    collectives must still match, pretrain.engine._grad_norm_over_stages)."""
    from pretrain.checkpoint import load_model_from_checkpoint
    layout = ["parallel.pp=2", "parallel.ep=2", "parallel.pipeline_layout=[1,1]"]
    train(tmp_path / "run", data_dir, 4, *layout, "train.exit_at_step=2")
    _assert_matches(reference, train(tmp_path / "run", data_dir, 4, *layout), "pp2-dp2-ep2")
    ours = load_model_from_checkpoint(tmp_path / "run")[0].state_dict()
    want = load_model_from_checkpoint(_reference_dir(tmp_path_factory))[0].state_dict()
    assert ours.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_tp2_pp2_equals_single_process_and_exports_the_same_model(reference, data_dir, tmp_path,
                                                                  tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint import load_model_from_checkpoint
    run = tmp_path / "tp2pp2"
    # An explicit layout: one transformer layer per stage (parameter balancing would put both on stage 0).
    _assert_matches(reference, train(run, data_dir, 4, "parallel.tp=2", "parallel.pp=2",
                                     "parallel.pipeline_layout=[1,1]"), "tp2-pp2")
    hf_dir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(run), "--output", str(hf_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The single-process checkpoint's model (its export matches it in transformers: tests/test_train.py).
    single, _, _ = load_model_from_checkpoint(_reference_dir(tmp_path_factory))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits
        torch.testing.assert_close(hf_logits, single(ids), rtol=1e-4, atol=1e-4)
    # The gathered TP shards and stages are the single-process weights (the router bias buffers too).
    ours, want = load_model_from_checkpoint(run)[0].state_dict(), single.state_dict()
    assert ours.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(ours[name], want[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_pp2_resume_is_exact(data_dir, pp2_run, tmp_path):
    """Restart the pp2 run from its step-2 checkpoint: step 3 and the final weights are bit for bit the same."""
    from parallel.shards import gather_pipeline_state_dict
    from pretrain.checkpoint import load_model_from_checkpoint
    full, out = pp2_run[0], tmp_path / "resumed"
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("step_0000003", "tensorboard"))
    (out / "latest").write_text("step_0000002")
    assert train(out, data_dir, 2, "parallel.pp=2", "train.save_interval=2") == pp2_run[1]  # losses, norms, LR
    model, _, _ = load_model_from_checkpoint(out)
    a = gather_pipeline_state_dict(full / "step_0000003", model)
    b = gather_pipeline_state_dict(out / "step_0000003", model)
    assert a.keys() == b.keys() and any(k.endswith("e_score_correction_bias") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("layout", [[1], [1, 2], [-1, 3], [1.5, 0.5], [0, 0, 2]])
def test_bad_pipeline_layout_is_one_line(layout):
    """Length and sum are checked when the config loads, the rest by parallel.pipeline (both before any group)."""
    from parallel.topology import check_pipeline_layout
    from pretrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"parallel.pipeline_layout=.*model.num_hidden_layers=2") as err:
        check_pipeline_layout(load_config("tiny", [f"parallel.pp={max(len(layout), 2)}",
                                                   f"parallel.pipeline_layout={layout}"]))
    assert "\n" not in str(err.value)


def test_good_pipeline_layouts_pass():
    from parallel.topology import check_pipeline_layout
    from pretrain.config import load_config
    for pp, layout in [(2, [1, 1]), (2, [0, 2]), (2, [2, 0]), (3, [0, 2, 0])]:
        check_pipeline_layout(load_config("tiny", [f"parallel.pp={pp}", f"parallel.pipeline_layout={layout}"]))


def test_merge_shards():
    from parallel.shards import _merge
    full = torch.arange(24.0).view(4, 6)
    assert torch.equal(_merge("w", list(full.chunk(2, dim=1)), full.shape), full)  # row-parallel split
    assert torch.equal(_merge("w", list(full.chunk(2, dim=0)), full.shape), full)  # column-parallel / experts
    assert _merge("w", [full, full], full.shape) is full  # replicated: one copy
    with pytest.raises(ValueError, match="w: 3 shards give"):
        _merge("w", list(full.chunk(2, dim=0)) + [full[:2]], full.shape)

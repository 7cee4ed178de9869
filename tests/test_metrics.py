"""MetricsLogger: TensorBoard tags and values read back with tensorboard's own reader; exact MFU/violation math."""
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain.metrics import (MatplotlibMissing, MetricsLogger, expert_load_figure, expert_load_heatmap,
                             expert_load_image, load_max_violation, measure_gemm_flops, new_figure)


def _events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_tokens_throughput_mfu(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, enabled=True, flops_per_token=6e6, peak_flops=1e12, total_steps=10,
                        num_devices=2, initial_tokens=100, print_fn=lines.append)
    for step, loss in ((1, 5.0), (2, 4.5)):
        log.log_step(step, {"train/loss": loss, "train/lr": 1e-3 * step, "train/grad_norm": 0.5},
                     tokens_in_step=4000, step_time_s=2.0)
    log.close()
    acc = _events(tmp_path)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_sec",
            "train/mfu"} <= set(acc.Tags()["scalars"])
    value = lambda tag: [(e.step, e.value) for e in acc.Scalars(tag)]
    assert value("train/loss") == [(1, 5.0), (2, 4.5)]
    assert value("train/tokens") == [(1, 4100.0), (2, 8100.0)]  # cumulative from initial_tokens
    assert value("train/tokens_per_sec") == [(1, 2000.0), (2, 2000.0)]
    # 2000 tok/s * 6e6 FLOP/tok / (1e12 * 2 devices) = 0.006
    assert [v for _, v in value("train/mfu")] == pytest.approx([0.006, 0.006], rel=1e-6)
    assert lines[1].startswith("step 2/10 | loss 4.5000 | lr 2.000e-03 | grad_norm 0.500 | tokens/s 2,000 | MFU 0.60%")
    assert lines[1].endswith("ETA 0:00:16")  # 8 steps left x 2 s


def test_log_interval_averages_throughput(tmp_path):
    log = MetricsLogger(tmp_path, enabled=True, flops_per_token=1.0, peak_flops=1.0, log_interval=2,
                        print_fn=lambda s: None)
    assert log.log_step(1, {"train/loss": 1.0}, tokens_in_step=100, step_time_s=1.0) is None
    out = log.log_step(2, {"train/loss": 1.0}, tokens_in_step=300, step_time_s=1.0)
    log.close()
    assert out["train/tokens_per_sec"] == 200.0 and out["train/tokens"] == 400.0
    assert [e.step for e in _events(tmp_path).Scalars("train/loss")] == [2]


def test_disabled_rank_writes_nothing(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path / "run", enabled=False, flops_per_token=1.0, peak_flops=None, print_fn=lines.append)
    log.log_step(1, {"train/loss": 1.0}, tokens_in_step=10, step_time_s=0.1)
    log.log_expert_load(1, torch.ones(2, 4))
    log.log_scalar("eval/loss", 1.0, 1)
    log.close()
    assert not (tmp_path / "run").exists() and lines == []


def test_load_max_violation_exact():
    load = torch.tensor([[1.0, 1.0, 1.0, 5.0],    # mean 2, max 5 -> 1.5
                         [2.0, 2.0, 2.0, 2.0],    # balanced -> 0
                         [0.0, 0.0, 0.0, 0.0]])   # no tokens routed -> 0
    assert load_max_violation(load) == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match="num_moe_layers, num_experts"):
        load_max_violation(torch.ones(4))


def test_expert_load_image_and_violation_tag(tmp_path):
    load = torch.tensor([[0.0, 2.0, 4.0, 2.0], [2.0, 2.0, 2.0, 2.0]])  # layer 0: idle, mean, 2x mean
    img = expert_load_heatmap(load, cell_px=3)
    assert img.shape == (2 * 3, 4 * 3, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [0, 0, 255]        # idle expert: blue
    assert img[0, 3].tolist() == [255, 255, 255]    # at the mean: white
    assert img[0, 6].tolist() == [255, 0, 0]        # 2x the mean: red
    assert (img[3:] == 255).all()                   # balanced layer: all white
    log = MetricsLogger(tmp_path, enabled=True, flops_per_token=1.0, peak_flops=1.0)
    assert log.log_expert_load(7, load) == pytest.approx(0.5)
    log.close()
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("moe/load_max_violation")] == [(7, 0.5)]
    images = acc.Images("moe/expert_load")
    height, width, _ = expert_load_image(load, 7).shape  # the labelled figure, or the raw pixels without matplotlib
    assert [(e.step, e.height, e.width) for e in images] == [(7, height, width)]


def test_expert_load_figure_is_labelled():
    pytest.importorskip("matplotlib")
    load = torch.tensor([[0.0, 2.0, 4.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    fig = expert_load_figure(load, step=7)
    ax, cbar = fig.axes
    assert ax.get_xlabel() == "expert" and ax.get_ylabel().startswith("MoE layer")
    assert "step 7" in ax.get_title() and "0.500" in ax.get_title()
    assert cbar.get_ylabel() == "load / mean load"
    assert ax.images[0].get_array().tolist() == [[0.0, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]  # load / layer mean
    img = expert_load_image(load, 7)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 100


def test_expert_load_image_without_matplotlib_is_the_raw_heatmap(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    load = torch.tensor([[0.0, 2.0, 4.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    assert np.array_equal(expert_load_image(load, 7), expert_load_heatmap(load))
    with pytest.raises(MatplotlibMissing, match=r"^the plot needs matplotlib: pip install 'deepseek-pretrain\[plot\]'"):
        new_figure("the plot")


def test_measure_gemm_flops_is_plausible():
    flops = measure_gemm_flops(size=128, min_time_s=0.05)
    assert 1e8 < flops < 1e14

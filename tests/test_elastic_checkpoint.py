"""Elastic checkpoints (pretrain/checkpoint_format.py): a checkpoint of one (tp, pp, ep, dp, ZeRO stage) layout
resumes in another, bit for bit in its fp32 master weights and Adam moments, and the run continues on the losses
of the uninterrupted run; the offline converter cuts a checkpoint for any layout and back.

The matrix: a ``tiny`` run (fp32, MTP, MoE with the bias) trained 6 steps in dp2 ep2 with checkpoints at steps 3
and 6 (the ``reference_run`` fixture) is resumed at step 3 in each layout below; right after loading, every rank
saves what it loaded (``_resume_save_train``, in-process on N gloo processes) and trains steps 4-6. The losses
must equal the reference's within relative 1e-4 (the layout-parity tolerance); the loaded state, converted to the
layout-free form, must equal the saved one exactly. Then the layout's own step-3 checkpoint (just written) is
resumed as dp2 ep2 with the same two checks (the reverse direction).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, losses, run_checked, run_distributed, torchrun

STEPS = 6
BASE = ["train.steps=6", "train.log_interval=1", "train.save_interval=3"]
DP2_EP2 = ["parallel.ep=2"]
LAYOUTS = {  # name -> (processes, overrides)
    "1 process": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2 pp2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pipeline_layout=[1,1]"]),
    "dp4 ep4": (4, ["parallel.ep=4"]),
    "pp2 dp2 ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    "dp2 ep2 zero2": (2, ["parallel.ep=2", "parallel.zero_stage=2"]),
}


def _config(data_dir, run_dir, overrides):
    from pretrain.config import load_config
    return load_config("tiny", [f"data.paths=[{data_dir}]", f"train.output_dir={run_dir}", *BASE, *overrides])


def _resume_save_train(rank, world, data_dir, run_dir, loaded_dir, overrides):
    """In one of ``world`` gloo processes: resume ``run_dir`` in the layout of ``overrides``, save the loaded state
    to ``loaded_dir`` (a step-3 checkpoint of this layout), then train to the end like ``pretrain.train.train``."""
    from pretrain.checkpoint import save_checkpoint
    from pretrain.train import setup, train_one

    cfg = _config(data_dir, run_dir, overrides)
    run = setup(cfg)
    assert run.state.step == 3
    loaded_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(loaded_dir)))
    save_checkpoint(run.engine, loaded_cfg, run.state, run.schedule_state)
    for step in range(run.state.step + 1, run.last_step + 1):
        train_one(run, step)
    run.metrics.close()


def _step3_copy(src, dst):
    """A copy of run directory ``src`` whose newest checkpoint is step 3."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("step_0000006", "tensorboard"))
    (dst / "latest").write_text("step_0000003")
    return dst


def _layout_free(step_dir, out):
    """The checkpoint converted to whole tensors (``python -m pretrain.checkpoint convert``): name -> master and
    Adam moments."""
    from pretrain.checkpoint_format import StateReader
    proc = subprocess.run([sys.executable, "-m", "pretrain.checkpoint", "convert", "--input", str(step_dir),
                           "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = StateReader(out / step_dir.name / "state")
    keys = ("", ":exp_avg", ":exp_avg_sq")
    return {name + k: reader.region(name, k) for name, t in reader.tensors.items() for k in keys[:1 + 2 * t["moments"]]}


def _assert_same_state(want, got, what):
    assert want.keys() == got.keys(), what
    assert any(k.endswith("e_score_correction_bias") for k in want) and any(k.endswith(":exp_avg_sq") for k in want)
    for name in want:
        assert torch.equal(want[name], got[name]), (what, name)


def _assert_losses(reference, got, what):
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), what
    for want, have in zip(reference[3:], got[3:]):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(have[key] - want[key]) <= 1e-4 * abs(want[key]), (what, want["step"], key, want, have)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """dp2 ep2, 6 steps, checkpoints at 3 and 6: (run directory, metrics, step 3 as whole tensors)."""
    out = tmp_path_factory.mktemp("elastic_ref") / "run"
    args = ["-m", "pretrain.train", "--config", "tiny", f"data.paths=[{data_dir}]", f"train.output_dir={out}",
            *BASE, *DP2_EP2]
    run_checked(args, launcher=torchrun(2))
    return out, losses(out), _layout_free(out / "step_0000003", out.parent / "full")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_in_another_layout_and_back(reference_run, data_dir, tmp_path, layout):
    ref_dir, ref_losses, ref_state = reference_run
    nproc, overrides = LAYOUTS[layout]
    # dp2 ep2 -> layout
    run, loaded = _step3_copy(ref_dir, tmp_path / "there"), tmp_path / "loaded_there"
    run_distributed(_resume_save_train, nproc, data_dir, run, loaded, overrides)
    _assert_losses(ref_losses, losses(run), f"dp2 ep2 -> {layout}")
    _assert_same_state(ref_state, _layout_free(loaded / "step_0000003", tmp_path / "full_there"), layout)
    saved = json.loads((loaded / "step_0000003" / "trainer_state.json").read_text())
    assert saved["consumed_samples"] == 24 and saved["layout"]["dp"] == nproc // (
        2 if "tp2" in layout else 1) // (2 if "pp2" in layout else 1)
    # layout -> dp2 ep2, from the step-3 checkpoint this layout wrote
    back = tmp_path / "back"
    shutil.copytree(ref_dir, back, ignore=shutil.ignore_patterns("step_*", "tensorboard"))
    shutil.copytree(loaded / "step_0000003", back / "step_0000003")
    (back / "latest").write_text("step_0000003")
    run_distributed(_resume_save_train, 2, data_dir, back, tmp_path / "loaded_back", DP2_EP2)
    _assert_losses(ref_losses, losses(back), f"{layout} -> dp2 ep2")
    _assert_same_state(ref_state, _layout_free(tmp_path / "loaded_back" / "step_0000003", tmp_path / "full_back"),
                       f"{layout} -> dp2 ep2")


# ------------------------------------------------------------------------------- single process, fast

def test_partition_plan_by_name():
    from parallel.shards import slice_box, split_dims
    assert split_dims("layers.0.self_attn.q_b_proj.weight") == (0, None)
    assert split_dims("layers.1.mlp.shared_experts.down_proj.weight") == (1, None)
    assert split_dims("mtp.0.block.mlp.experts.gate_proj") == (None, 0)  # routed: EP only
    assert split_dims("embed_tokens.weight") == (0, None) and split_dims("lm_head.weight") == (0, None)
    assert split_dims("layers.1.mlp.gate.weight") == (None, None)  # the router is replicated
    assert split_dims("layers.0.self_attn.kv_a_proj_with_mqa.weight") == (None, None)
    assert slice_box("layers.0.self_attn.o_proj.weight", [64, 96], 2, 1, 4, 3) == ([0, 48], [64, 48])
    assert slice_box("layers.1.mlp.experts.up_proj", [8, 32, 64], 2, 1, 4, 3) == ([6, 0, 0], [2, 32, 64])
    with pytest.raises(ValueError, match="q_proj.weight: dim 0 of size 6 does not split over 4 ranks"):
        slice_box("q_proj.weight", [6, 2], 4, 0, 1, 0)


def test_reader_reads_any_box_from_overlapping_slices(tmp_path):
    """Slices of a (6, 4) tensor cut one way (rows 0-1, 2-5), read back in boxes cut another way."""
    from safetensors.torch import save_file

    from pretrain.checkpoint_format import INDEX, StateReader, merge_index
    full = torch.arange(24.0).view(6, 4)
    save_file({"w": full[:2].contiguous(), "w:exp_avg": -full[:2].contiguous()}, str(tmp_path / "a.safetensors"))
    save_file({"w": full[2:].contiguous(), "w:exp_avg": -full[2:].contiguous()}, str(tmp_path / "b.safetensors"))
    entry = {"shape": [6, 4], "dtype": "float32", "moments": True}
    index = merge_index([{"w": {**entry, "offsets": [0, 0], "slice": [2, 4], "file": "a.safetensors"}},
                         {"w": {**entry, "offsets": [2, 0], "slice": [4, 4], "file": "b.safetensors"}},
                         {"w": {**entry, "offsets": [2, 0], "slice": [4, 4], "file": "b.safetensors"}}],  # duplicate
                        {"tp": 1}, 3.0)
    assert len(index["tensors"]["w"]["slices"]) == 2
    (tmp_path / INDEX).write_text(json.dumps(index))
    reader = StateReader(tmp_path)
    assert torch.equal(reader.region("w"), full)
    assert torch.equal(reader.region("w", "", [1, 2], [3, 2]), full[1:4, 2:4])  # crosses the two files
    assert torch.equal(reader.region("w", ":exp_avg", [0, 0], [6, 2]), -full[:, :2])
    with pytest.raises(ValueError, match="cover 8 of 12 values"):
        reader.region("w", "", [4, 0], [3, 4])  # beyond the tensor


def test_parse_layout():
    from pretrain.checkpoint import parse_layout
    assert parse_layout("tp=2,ep=4") == {"tp": 2, "pp": 1, "ep": 4} and parse_layout(None)["tp"] == 1
    for bad in ("tp=0", "dp=2", "tp=x"):
        with pytest.raises(ValueError, match="expected tp=N,pp=N,ep=N"):
            parse_layout(bad)


def test_convert_to_a_layout_and_back_is_exact(checkpoint_reference, tmp_path):
    """Offline: step 4 of the single-process reference cut for tp2 pp2 ep2 (one file per writing rank, each
    holding only its slices), then back to whole tensors: bit for bit the original; export reads both."""
    from pretrain.checkpoint import convert_checkpoint, load_model_from_checkpoint
    from pretrain.checkpoint_format import StateReader
    src = checkpoint_reference / "step_0000004"
    out = convert_checkpoint(src, tmp_path / "tp2pp2ep2", {"tp": 2, "pp": 2, "ep": 2})
    files = sorted(p.name for p in (out / "state").glob("*.safetensors"))
    # routed experts are cut over EP only: TP rank 1 holds no expert, so it has no ep01 file
    assert files == [f"tp{t:02d}-pp{s:02d}-ep{e:02d}.safetensors" for t in range(2) for s in range(2)
                     for e in range(2 - t)]
    cut = StateReader(out / "state")
    experts = cut.tensors["layers.1.mlp.experts.up_proj"]["slices"]
    assert sorted((s["file"], s["offsets"][0], s["shape"][0]) for s in experts) == [
        ("tp00-pp00-ep00.safetensors", 0, 4), ("tp00-pp00-ep01.safetensors", 4, 4)]  # layer 1: stage 0
    assert [s["file"] for s in cut.tensors["norm.weight"]["slices"]] == ["tp00-pp01-ep00.safetensors"]
    assert (tmp_path / "tp2pp2ep2" / "latest").read_text() == "step_0000004"
    back = _layout_free(out, tmp_path / "back")
    original = StateReader(src / "state")
    assert back.keys() >= set(original.tensors)
    for name, t in original.tensors.items():
        for key in ("", ":exp_avg", ":exp_avg_sq")[:1 + 2 * t["moments"]]:
            assert torch.equal(back[name + key], original.region(name, key)), name + key
    ours = load_model_from_checkpoint(tmp_path / "tp2pp2ep2")[0].state_dict()
    want = torch.load(src / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(ours[k], want[k]) for k in want)


def test_convert_refuses_a_corrupt_input(checkpoint_reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint_reference, run)
    victim = next((run / "step_0000004" / "state").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-7])
    proc = subprocess.run([sys.executable, "-m", "pretrain.checkpoint", "convert", "--input", str(run),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{victim}: sha256 differs" in proc.stderr and "convert only an intact checkpoint" in proc.stderr


@pytest.mark.slow
def test_converted_checkpoint_resumes_exactly(checkpoint_reference, data_dir, tmp_path):
    """A converted (layout-free only) step-3 checkpoint resumed on one process retrains step 4 to the numbers of
    the uninterrupted run, exactly (same layout: the fp32 masters and moments are the saved ones)."""
    from helpers import run_train
    from pretrain.checkpoint import convert_checkpoint
    out = tmp_path / "run"
    convert_checkpoint(checkpoint_reference / "step_0000003", out, {"tp": 1, "pp": 1, "ep": 1})
    shutil.copyfile(checkpoint_reference / "metrics.jsonl", out / "metrics.jsonl")
    proc = run_train(out, data_dir)
    assert "resharding while loading" in proc.stdout and f"resumed from {out / 'step_0000003'}" in proc.stdout
    assert losses(out) == losses(checkpoint_reference)

"""Reliability of checkpoints (docs/RELIABILITY.md items 1, 2, 6, 8), each fault injected for real.

- crash mid-save (SIGKILL of rank 1 after DeepSpeed wrote its files) under ``torchrun --max-restarts=1``: the
  restart resumes from the previous complete checkpoint, replaces the partial directory, and ends on the numbers
  of the uninterrupted run;
- a truncated or byte-flipped file fails resume naming the file (sha256 manifest), or with
  ``train.checkpoint_fallback`` resumes from the newest older good checkpoint; a bad ``latest`` likewise;
- ENOSPC on one rank while saving: every rank reports it and exits, ``latest`` keeps naming a loadable checkpoint.

The launcher is ``helpers.run_train``, the shards and the uninterrupted run are the ``data_dir`` and
``checkpoint_reference`` fixtures; ``PRETRAIN_FAULT`` (pretrain.faults) injects the faults.
"""
import json
import shutil

import pytest
import torch

from helpers import losses, module_states, run_train
from pretrain.checkpoint import (CHECKSUMS, CheckpointError, complete_tags, prune_checkpoints, select_checkpoint,
                                 verify_checksums)
from pretrain.config import load_config


def cfg_for(run_dir, *overrides):
    return load_config("tiny", [f"train.output_dir={run_dir}", *overrides])


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_named_or_falls_back(checkpoint_reference, tmp_path, damage):
    run = copy_run(checkpoint_reference, tmp_path)
    victim = run / "step_0000004" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        select_checkpoint(cfg_for(run))
    msg = str(e.value)
    assert "\n" not in msg and str(victim) in msg and "sha256 differs" in msg and "checkpoint_fallback" in msg
    assert select_checkpoint(cfg_for(run, "train.checkpoint_fallback=true")) == "step_0000003"


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("garbage\x00\x01", "not a step_NNNNNNN tag"),
    ("step_0000099", "names step_0000099, but"),
    (None, "latest is missing but complete checkpoints exist"),
])
def test_bad_latest_is_a_clear_error_or_falls_back(checkpoint_reference, tmp_path, content, message):
    run = copy_run(checkpoint_reference, tmp_path)
    if content is None:
        (run / "latest").unlink()
    else:
        (run / "latest").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        select_checkpoint(cfg_for(run))
    assert select_checkpoint(cfg_for(run, "train.checkpoint_fallback=true")) == "step_0000004"  # scans step dirs


def test_partial_directory_is_ignored_and_pruned(checkpoint_reference, tmp_path):
    """A save that died before its checksums: never a resume point, deleted by the next successful save."""
    run = copy_run(checkpoint_reference, tmp_path)
    partial = run / "step_0000005"
    shutil.copytree(run / "step_0000004", partial)
    (partial / CHECKSUMS).unlink()
    assert select_checkpoint(cfg_for(run)) == "step_0000004" and complete_tags(run)[0] == "step_0000004"
    prune_checkpoints(run, keep_last=2)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000003", "step_0000004"]


@pytest.mark.slow
def test_fallback_resume_reproduces_the_run(checkpoint_reference, data_dir, tmp_path):
    """End to end: step 4's optimizer file corrupted -> resume from step 3, retrain step 4 to the same numbers.
    (Resume errors on the command line are one line and exit 1: see the SIGKILL test below.)"""
    run = copy_run(checkpoint_reference, tmp_path)
    victim = next((run / "step_0000004").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    proc = run_train(run, data_dir, "train.checkpoint_fallback=true")
    assert "falling back to" in proc.stdout and "resumed from" in proc.stdout and "step_0000003" in proc.stdout
    assert losses(run) == losses(checkpoint_reference)
    assert not verify_checksums(run / "step_0000004", collective=False)  # rewritten, intact


@pytest.mark.slow
def test_sigkill_mid_save_then_torchrun_restart_equals_uninterrupted(checkpoint_reference, data_dir, tmp_path,
                                                                     monkeypatch):
    """Rank 1 is SIGKILLed half-way through the step-2 checkpoint (DeepSpeed's files written, RNG/state/checksums
    not); torchrun --max-restarts=1 restarts both ranks, which resume from step 1 and finish."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")  # torchrun reads its options from PET_* variables
    monkeypatch.setenv("PET_MONITOR_INTERVAL", "0.5")  # see the failure (and restart) sooner than the 5 s default
    out = tmp_path / "run"
    proc = run_train(out, data_dir, nproc=2, fault="crash_in_save:2:1", monkeypatch=monkeypatch)
    log = proc.stdout + proc.stderr
    assert "resumed from" in log and f"{out / 'step_0000001'} (step 1" in log, log[-3000:]
    assert "step_0000002 (step 2" not in log  # the partial step-2 directory was never a resume point
    ref, got = losses(checkpoint_reference), losses(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):  # 2 data-parallel ranks = gradient accumulation (test_train): within 1e-5
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert not verify_checksums(out / "step_0000002", collective=False)  # re-saved completely after the restart
    # This dp2 ZeRO-1 checkpoint cannot be resumed on one process (partitioned optimizer state): one line.
    proc = run_train(out, data_dir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "was saved with data-parallel size 2, this run has 1: ZeRO-1 partitions" in proc.stderr


@pytest.mark.slow
def test_disk_full_on_one_rank_is_reported_by_every_rank(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = run_train(out, data_dir, nproc=2, check=False, fault="enospc_in_save:2:1", monkeypatch=monkeypatch)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: saving checkpoint")]
    assert len(errors) == 2, proc.stderr[-3000:]  # rank 0 (healthy) and rank 1 (the full disk) both say it
    assert all("failed on rank(s) [1]" in e and "No space left on device" in e and "step_0000001" in e
               for e in errors)
    assert (out / "latest").read_text().strip() == "step_0000001"
    assert select_checkpoint(cfg_for(out)) == "step_0000001"
    state = module_states(out / "step_0000001")
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert json.loads((out / "step_0000001" / "trainer_state.json").read_text())["step"] == 1

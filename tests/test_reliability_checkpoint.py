"""Reliability of checkpoints (docs/RELIABILITY.md items 1, 2, 6, 8), each fault injected for real.

- crash mid-save (SIGKILL of rank 1 after DeepSpeed wrote its files) under ``torchrun --max-restarts=1``: the
  restart resumes from the previous complete checkpoint, replaces the partial directory, and ends on the numbers
  of the uninterrupted run;
- a truncated or byte-flipped file fails resume naming the file (sha256 manifest), or with
  ``train.checkpoint_fallback`` resumes from the newest older good checkpoint; a bad ``latest`` likewise;
- ENOSPC on one rank while saving: every rank reports it and exits, ``latest`` keeps naming a loadable checkpoint;
- the same faults in the background writer of ``train.async_save`` and behind a resume that reshards.

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


@pytest.mark.parametrize("damage, victim", [("truncate", "mp_rank_00_model_states.pt"),
                                            ("flip", "mp_rank_00_model_states.pt"),
                                            ("flip", "state/tp00-pp00-ep00.safetensors"),  # the layout-free state
                                            ("truncate", "state/index.json")])
def test_corrupt_file_is_named_or_falls_back(checkpoint_reference, tmp_path, damage, victim):
    run = copy_run(checkpoint_reference, tmp_path)
    victim = run / "step_0000004" / victim
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
def test_fallback_resume_in_another_layout_reshards_and_reproduces_the_run(checkpoint_reference, data_dir, tmp_path):
    """The resharding path behind the fallback: step 4's layout-free state corrupted, the run resumed under ZeRO 2
    (saved under ZeRO 1): falls back to step 3, reshards it, retrains step 4 to the same numbers."""
    run = copy_run(checkpoint_reference, tmp_path)
    victim = next((run / "step_0000004" / "state").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])
    proc = run_train(run, data_dir, "train.checkpoint_fallback=true", "parallel.zero_stage=2")
    assert "falling back to" in proc.stdout and "zero_stage=1 precision=fp32; this run has" in proc.stdout
    assert "resharding while loading" in proc.stdout and f"resumed from {run / 'step_0000003'}" in proc.stdout
    assert losses(run) == losses(checkpoint_reference)


@pytest.mark.slow
def test_sigkill_in_the_async_writer_then_restart_equals_uninterrupted(checkpoint_reference, data_dir, tmp_path,
                                                                      monkeypatch):
    """train.async_save: rank 1's background writer is SIGKILLed half-way through the step-2 checkpoint (its
    layout-free file written, RNG and checksums not): `latest` still names step 1, the restart resumes there
    (the layout-free path: async checkpoints have no DeepSpeed files) and ends on the uninterrupted numbers."""
    monkeypatch.setenv("PET_MAX_RESTARTS", "1")
    monkeypatch.setenv("PET_MONITOR_INTERVAL", "0.5")
    out = tmp_path / "run"
    proc = run_train(out, data_dir, "train.async_save=true", nproc=2, fault="crash_in_save:2:1",
                     monkeypatch=monkeypatch)
    log = proc.stdout + proc.stderr
    assert f"resumed from {out / 'step_0000001'} (step 1" in log, log[-3000:]
    assert not any((out / "step_0000001").glob("*optim_states.pt"))  # async: layout-free state only
    ref, got = losses(checkpoint_reference), losses(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert not verify_checksums(out / "step_0000002", collective=False)


@pytest.mark.slow
def test_disk_full_in_the_async_writer_is_reported_by_every_rank(data_dir, tmp_path, monkeypatch):
    """ENOSPC in rank 1's background writer at step 2: both ranks raise it at their next save, `latest` stays."""
    out = tmp_path / "run"
    proc = run_train(out, data_dir, "train.async_save=true", nproc=2, check=False, fault="enospc_in_save:2:1",
                     monkeypatch=monkeypatch)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: saving checkpoint")]
    assert len(errors) == 2 and all("step_0000002" in e and "failed on rank(s) [1]" in e for e in errors), \
        proc.stderr[-3000:]
    assert select_checkpoint(cfg_for(out)) == "step_0000001"


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
    # This dp2 ZeRO-1 checkpoint resumes on one process: resharded from the layout-free state (the numbers of
    # such resumes: tests/test_elastic_checkpoint.py).
    proc = run_train(out, data_dir)
    assert "dp=2 zero_stage=1 precision=fp32; this run has tp=1 pp=1 ep=1 dp=1" in proc.stdout
    assert "resharding while loading" in proc.stdout


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

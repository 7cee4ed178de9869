"""Reliability across processes (docs/RELIABILITY.md items 3 and 5).

- exact resume in the layouts the other tests do not cover yet (dp2 ep2, tp2): the run restarted from its step-2
  checkpoint logs the same losses, gradient norms and tokens for steps 3-4, bit for bit; dp2 (test_launch) and
  pp2 (test_pipeline) are proved there;
- resuming with another data-parallel size continues the global sample stream: no gap, no repeat;
- a rank that stops before a collective: the others fail after ``train.step_timeout_s`` with one line naming the
  step and the timeout, exit non-zero.
"""
import hashlib
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.dataset import SampleStream
from helpers import COMMON, free_port, launch_env, losses, run_train


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.tp=2"]], ids=["dp2-ep2", "tp2"])
def test_resume_is_exact_in_layout(data_dir, tmp_path, layout):
    full = tmp_path / "full"
    run_train(full, data_dir, *layout, "train.save_interval=2", nproc=2)  # checkpoints at steps 2 and 4
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "step_0000004")
    (resumed / "latest").write_text("step_0000002")
    proc = run_train(resumed, data_dir, *layout, "train.save_interval=2", nproc=2)
    assert f"resumed from {resumed / 'step_0000002'}" in proc.stdout
    want, got = losses(full), losses(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == want  # losses, grad norms, LR, tokens of steps 3-4: exact


def test_resume_before_a_batch_size_change_is_exact(checkpoint_reference, data_dir, tmp_path):
    """Resumed at step 1 (batch 4, 2 micro-batches), the ramp to batch 8 at step 3 must still accumulate 4
    micro-batches: DeepSpeed's micro-step counter restarts at 0 on resume, so its own boundary rule
    ((micro_steps + 1) % accumulation_steps) stepped after 2 of them (regression: losses differed by 2e-2)."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint_reference, run)
    for tag in ("step_0000002", "step_0000003", "step_0000004"):
        shutil.rmtree(run / tag, ignore_errors=True)
    (run / "latest").write_text("step_0000001")
    proc = run_train(run, data_dir)
    assert f"resumed from {run / 'step_0000001'}" in proc.stdout
    assert losses(run) == losses(checkpoint_reference)


@pytest.mark.slow
def test_resume_on_another_data_parallel_size(checkpoint_reference, data_dir, tmp_path):
    """ZeRO 0 (unpartitioned optimizer state): stopped at step 2 on dp2, resumed on one process, steps 3-4 equal
    the uninterrupted run and the sample stream goes on from sample 8. (Under ZeRO 1/2 the optimizer state is
    partitioned by data-parallel rank: such a resume reshards the layout-free state, tests/test_elastic_checkpoint.py.)"""
    out = tmp_path / "zero0"
    run_train(out, data_dir, "parallel.zero_stage=0", "train.exit_at_step=2", nproc=2)
    assert json.loads((out / "step_0000002" / "trainer_state.json").read_text())["consumed_samples"] == 8
    run_train(out, data_dir, "parallel.zero_stage=0")
    for want, have in zip(losses(checkpoint_reference), losses(out)):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert abs(want[key] - have[key]) < 1e-5, (want["step"], key, want[key], have[key])
    assert json.loads((out / "step_0000004" / "trainer_state.json").read_text())["consumed_samples"] == 24


class _Ids:
    """A dataset whose sample i is [i] (so a stream's output is its sample ids)."""

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return np.array([i])


def _take(dp_size: int, consumed: int, steps: int, batch: int = 8) -> list[int]:
    streams = [SampleStream(_Ids(), r, dp_size, 2, consumed_samples=consumed) for r in range(dp_size)]
    ids = []
    for _ in range(steps):
        for stream in streams:
            ids += [int(x) for mb in stream.next_batch(batch) for x in mb.flatten()]
    assert len({s.consumed_samples for s in streams}) == 1
    return ids


def test_resume_with_another_data_parallel_size_continues_the_sample_stream():
    """dp2 for 3 steps, then dp4 from the saved consumed_samples, then dp1: the same global samples, once each."""
    ids = _take(2, 0, 3) + _take(4, 24, 2) + _take(1, 40, 1)
    checksum = hashlib.sha256(np.array(sorted(ids)).tobytes()).hexdigest()
    want = hashlib.sha256(np.arange(48).tobytes()).hexdigest()
    assert len(ids) == len(set(ids)) == 48 and checksum == want  # no gap, no repeat
    assert sorted(_take(1, 0, 6)) == sorted(ids)


@pytest.mark.slow
def test_hung_rank_ends_the_job_with_a_timeout(data_dir, tmp_path):
    """Rank 1 stops before step 2's collectives; rank 0 gives up after train.step_timeout_s=3 (start-up keeps the
    long train.dist_timeout_s) and exits 1 with one line. A launcher then tears the job down (here: the test)."""
    port = free_port()
    args = ["-m", "pretrain.train", *COMMON, f"train.output_dir={tmp_path / 'run'}", f"data.paths=[{data_dir}]",
            "train.dist_timeout_s=120", "train.step_timeout_s=3"]
    procs = [subprocess.Popen([sys.executable, *args], env=dict(
        launch_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        PRETRAIN_FAULT="hang:2:1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        want = "step 2, rank 0: a collective did not complete within train.step_timeout_s=3.0: another rank hung"
        assert want in errors[0], errors[0]
        assert procs[1].poll() is None  # the hung rank is still hung: the survivor did not wait for it
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()

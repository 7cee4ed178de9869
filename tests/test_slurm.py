"""launch_scripts/pretrain.sbatch under a real slurm (one node on this machine).

Needs running slurm daemons: `bash .ci/slurm.sh start` (root; installs Debian's slurm-wlm and munge if missing).
As root with slurm installed, this module starts them itself and stops them afterwards; otherwise it is skipped.
A cluster that .ci/slurm.sh did not configure is used only with SLURM_TEST_CLUSTER=1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import build_small_data

ROOT = Path(__file__).resolve().parents[1]
# The #SBATCH lines ask for a GPU cluster; these fit the test node (2 CPUs, no GPUs) and keep logs in tmp.
SBATCH_FOR_CPU = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]


def _node_state() -> str:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _ours_or_allowed() -> bool:
    """Submit only to the one-node cluster .ci/slurm.sh wrote, or where SLURM_TEST_CLUSTER=1 says a real cluster
    may take test jobs (its nodes must see this machine's temporary directory)."""
    conf = Path("/etc/slurm/slurm.conf")
    ours = conf.is_file() and conf.read_text().startswith("# written by .ci/slurm.sh")
    return ours or os.environ.get("SLURM_TEST_CLUSTER") == "1"


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") and _node_state() in ("idle", "mix", "alloc"):
        if not _ours_or_allowed():
            pytest.skip("a slurm cluster not started by .ci/slurm.sh is running; set SLURM_TEST_CLUSTER=1 to use it")
        yield
        return
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.skip("no running slurm: start one with `bash .ci/slurm.sh start` (as root)")
    subprocess.run(["bash", str(ROOT / ".ci" / "slurm.sh"), "start"], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm.sh"), "stop"], timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_data(tmp_path_factory.mktemp("data"))


def sbatch(tmp_path: Path, *args: str, wait: bool) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *SBATCH_FOR_CPU,
           f"--output={tmp_path}/%x-%j.log", "launch_scripts/pretrain.sbatch", *args]
    env = {**os.environ, "CONFIG": "tiny", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def job_field(job_id: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f).get(key, "")


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sbatch_job_trains_and_resubmission_resumes(slurm, shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"train.output_dir={run_dir}", f"data.paths=[{shards}]", "train.steps=12"]
    first = sbatch(tmp_path, *args, "train.exit_at_step=5", wait=True)
    assert first.returncode == 0, first.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    job1 = first.stdout.strip()
    log1 = (tmp_path / f"pretrain-{job1}.log").read_text()
    assert f"[pretrain.sbatch] job {job1} (restart 0): 1 node(s) x 2" in log1
    assert "step 5/12" in log1 and "training exited with status 0" in log1
    assert (run_dir / "latest").read_text().strip() == "step_0000005"
    assert (run_dir / "step_0000005").is_dir()

    second = sbatch(tmp_path, *args, wait=True)
    assert second.returncode == 0, second.stderr
    log2 = (tmp_path / f"pretrain-{second.stdout.strip()}.log").read_text()
    assert "step 6/12" in log2 and "step 5/12" not in log2, log2[-3000:]  # resumed, not restarted
    assert (run_dir / "latest").read_text().strip() == "step_0000012"
    assert metrics_steps(run_dir) == list(range(1, 13))


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues(slurm, shards, tmp_path):
    """What `--signal=B:USR1@300` does near the time limit, triggered by hand: the batch script forwards USR1 to
    the trainers, they checkpoint at the next step and exit 0, and the job requeues itself."""
    run_dir = tmp_path / "run"
    sub = sbatch(tmp_path, f"train.output_dir={run_dir}", f"data.paths=[{shards}]", "train.steps=400", wait=False)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING"), \
                job_field(job, "JobState")
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        while job_field(job, "Restarts") != "1":  # requeued by the batch script after training exited 0
            assert time.time() < deadline, job_field(job, "JobState")
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job])  # the requeued copy would resume; the test above covers resuming
    log = (tmp_path / f"pretrain-{job}.log").read_text()
    assert "time limit near: asking the trainers to checkpoint and stop" in log
    assert "received SIGUSR1" in log and "training exited with status 0" in log and "requeueing job" in log
    last = metrics_steps(run_dir)[-1]
    assert last < 400 and (run_dir / "latest").read_text().strip() == f"step_{last:07d}"


@pytest.mark.slow
def test_bad_config_fails_before_srun_in_one_line(slurm, shards, tmp_path):
    """pretrain.sbatch runs pretrain.preflight before srun: a bad layout fails the job with one error line and no
    job step is ever started (no launcher, no rank)."""
    out = sbatch(tmp_path, f"train.output_dir={tmp_path / 'run'}", f"data.paths=[{shards}]", "parallel.tp=4",
                 wait=True)
    assert out.returncode != 0
    job = out.stdout.strip()
    log = (tmp_path / f"pretrain-{job}.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: parallel layout tp=4"), log
    assert "Traceback" not in log and "+ torchrun" not in log and "training exited" not in log, log
    assert job_field(job, "ExitCode").startswith("2:"), job_field(job, "ExitCode")

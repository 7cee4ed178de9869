"""launch_scripts/ for real: both launchers, two "nodes" on loopback, SIGTERM -> checkpoint -> identical resume.

Every run trains the `tiny` preset on shards built here by data_pipeline from stdlib sources, and the losses
(metrics.jsonl, written by rank 0) are compared exactly: the launch path must not change the numerics.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import build_small_data, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "launch_scripts"
STEPS = 20


def train_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [f"train.output_dir={run_dir}", f"data.paths=[{shards}]", f"train.steps={STEPS}",
            "train.save_interval=100", *extra]


def script_env(**extra: str) -> dict:
    # Two processes share this machine's cores: one BLAS thread each keeps them from fighting.
    return {**os.environ, "CONFIG": "tiny", "OMP_NUM_THREADS": "1", **extra}


def launch(script: str, overrides: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SCRIPTS / script), *overrides], cwd=ROOT, env=script_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> list[tuple[int, float]]:
    """One node, 2 processes, torchrun: the losses every other launch path must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref")
    finish(launch("pretrain.sh", train_overrides(run_dir, shards), LAUNCHER="torchrun", NPROC_PER_NODE="2",
                  MASTER_PORT=str(free_port())))
    result = losses(run_dir)
    assert [s for s, _ in result] == list(range(1, STEPS + 1))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_on_loopback_match_one_node(shards, reference, tmp_path, launcher):
    port = str(free_port())
    nodes = [launch("pretrain_multinode.sh", train_overrides(tmp_path, shards), LAUNCHER=launcher, NNODES="2",
                    NODE_RANK=str(rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for rank in (0, 1)]
    outs = [finish(p) for p in nodes]
    assert f"--node_rank 1" in outs[1]
    assert losses(tmp_path) == reference
    assert (tmp_path / "latest").read_text().strip() == f"step_{STEPS:07d}"


def _ssh_to_self_works() -> bool:
    try:
        return shutil.which("pdsh") is not None and all(
            subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", host, "true"],
                           capture_output=True, timeout=15).returncode == 0 for host in ("localhost", "127.0.0.1"))
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def ssh_loopback():
    """Passwordless ssh to `localhost` and `127.0.0.1`: already there, or started by .ci/ssh_loopback.sh (root)."""
    if _ssh_to_self_works():
        yield
        return
    script = ROOT / ".ci" / "ssh_loopback.sh"
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists() or not shutil.which("pdsh"):
        pytest.skip("no passwordless ssh to localhost + pdsh: run `bash .ci/ssh_loopback.sh start` (as root)")
    subprocess.run(["bash", str(script), "start"], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["bash", str(script), "stop"], timeout=60)


@pytest.mark.slow
def test_hostfile_over_ssh_matches_one_node(shards, reference, tmp_path, ssh_loopback):
    """DeepSpeed's default multi-node path for real: hostfile -> pdsh -> ssh, two "hosts" that are this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run_dir = tmp_path / "run"
    out = finish(launch("pretrain_multinode.sh", train_overrides(run_dir, shards), HOSTFILE=str(hostfile),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    assert f"+ deepspeed --hostfile {hostfile}" in out and "127.0.0.1: " in out  # pdsh prefixes remote output
    assert losses(run_dir) == reference


def _worker_pids(launcher_pid: int) -> list[int]:
    """The trainers (`python -u -m pretrain.train ...`) under a launcher, not the launcher's own helpers."""
    def is_trainer(cmd: list[str]) -> bool:
        return any(a == "-m" and b == "pretrain.train" for a, b in zip(cmd, cmd[1:]))
    return sorted(p.pid for p in psutil.Process(launcher_pid).children(recursive=True) if is_trainer(p.cmdline()))


@pytest.mark.slow
def test_deepspeed_launcher_sigterm_and_resume_match_torchrun(shards, reference, tmp_path):
    """pretrain.sh with the DeepSpeed launcher, SIGTERM to one trainer mid-run: every rank checkpoints at the next
    step boundary and exits 0; the same command resumes. The stitched loss curve equals the uninterrupted
    torchrun run's exactly, so this checks both launchers agree and the resume is exact."""
    overrides = train_overrides(tmp_path, shards)
    proc = launch("pretrain.sh", overrides, LAUNCHER="deepspeed", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()):  # the loop is running: handlers installed
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)  # one trainer only: the other learns it through the all-reduce
    out = finish(proc)
    assert "+ deepspeed --num_gpus 2" in out and out.count("received SIGTERM") == 1
    stopped = losses(tmp_path)
    last = stopped[-1][0]
    assert last < STEPS, "training finished before the signal arrived; the test needs slower steps"
    assert (tmp_path / "latest").read_text().strip() == f"step_{last:07d}"
    assert stopped == reference[:last]
    # The same command again resumes from that checkpoint and reproduces the uninterrupted run exactly.
    finish(launch("pretrain.sh", overrides, LAUNCHER="deepspeed", NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    assert losses(tmp_path) == reference


def test_script_errors_name_the_fix():
    bad = subprocess.run(["bash", str(SCRIPTS / "pretrain.sh")], env=script_env(LAUNCHER="mpirun"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "LAUNCHER=mpirun: use deepspeed or torchrun" in bad.stderr
    env = {k: v for k, v in script_env().items() if k not in ("HOSTFILE", "NODE_RANK", "NNODES", "MASTER_ADDR")}
    bad = subprocess.run(["bash", str(SCRIPTS / "pretrain_multinode.sh")], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "set HOSTFILE (way 1), or NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT" in bad.stderr
    bad = subprocess.run(["bash", str(SCRIPTS / "pretrain_multinode.sh")], env={**env, "NODE_RANK": "0"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "set NNODES" in bad.stderr

"""PreemptionHandler: a signal to one rank stops every rank at the same step; single-process and error paths."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import free_port
from pretrain.preemption import PreemptionHandler

WORKER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from pretrain.preemption import PreemptionHandler
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = PreemptionHandler(("SIGTERM", "SIGUSR1")).install()
    for step in range(1, 2000):
        time.sleep(0.02)  # "train_step"
        print(f"step {step}", flush=True)
        if handler.should_stop():
            print(f"stop {step} requested={handler.requested}", flush=True)
            break
    dist.destroy_process_group()
""")


def test_sigterm_on_one_rank_stops_all_at_same_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    # Wait until rank 1 is inside the loop, then signal only rank 1.
    first = procs[1].stdout.readline()
    assert first.startswith("step"), first + procs[1].stderr.read()
    time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    stops = [[l for l in out.splitlines() if l.startswith("stop")] for out in outs]
    assert len(stops[0]) == 1 and len(stops[1]) == 1
    step0, step1 = (int(s[0].split()[1]) for s in stops)
    assert step0 == step1 >= 1
    assert stops[0][0].endswith("requested=False")  # rank 0 was never signalled: it learned from the all-reduce
    assert stops[1][0].endswith("requested=True")


def test_single_process_and_uninstall():
    handler = PreemptionHandler(("USR1",)).install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert handler.requested and handler.should_stop() and handler.received == signal.SIGUSR1
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_unknown_signal_name():
    with pytest.raises(ValueError, match="preemption signal 'SIGFOO': unknown signal name"):
        PreemptionHandler(("SIGFOO",))

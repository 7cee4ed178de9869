"""Run a function on N CPU processes joined by gloo: the harness of the multi-process tests (house rule 9)."""
from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share a few cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; a failure in any re-raises here.

    Forked (not spawned) so the children reuse the parent's imports: seconds instead of tens of seconds.
    ``fn`` must be a module-level function.
    """
    # Import the heavy libraries once here: the forked children inherit them instead of each importing them.
    import deepspeed  # noqa: F401
    from megatron.core import parallel_state  # noqa: F401
    mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method="fork")

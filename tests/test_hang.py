"""`raydpo.train.hang` and ``scaling.collective_timeout_s``: a rank that never joins a collective
fails the others' step within the timeout, with one line naming the rank and the step (instead of
a wait without end: TRL#1405's 42 hours on an all-gather)."""

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydpo.config import load_config
from raydpo.train.hang import CollectiveTimeout, named_hang


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))  # a slow start is fine
    group = dist.new_group(timeout=timedelta(seconds=2))  # what scaling.collective_timeout_s sets
    if rank == 1:  # hangs: never reaches the all-reduce (a SIGSTOP, a stuck kernel)
        time.sleep(8)
        os._exit(0)
    t0 = time.monotonic()
    try:
        with named_hang(0, 7, 2.0):
            dist.all_reduce(torch.ones(1), group=group)
        msg = "returned"
    except CollectiveTimeout as e:
        msg = f"{time.monotonic() - t0:.1f}|{e}"
    with open(out, "w") as f:
        f.write(msg)
    # out without the interpreter's teardown: a gloo group whose collective timed out sometimes
    # aborts in a C++ destructor at exit ("terminate called without an active exception"), after
    # the message is written; Ray replaces a real worker's process in that case anyway
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_comes_fails_the_step_naming_rank_and_step(tmp_path):
    out = str(tmp_path / "msg")
    mp.start_processes(_rank, args=(_free_port(), out), nprocs=2, start_method="spawn", join=True)
    waited, msg = open(out).read().split("|", 1)
    assert float(waited) < 6.0  # the timeout, not the hung rank's 8 s
    assert msg.startswith("rank 0: a collective waited 2 s at step 7") and "scaling.collective_timeout_s" in msg


def test_other_errors_pass_through_unchanged():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with named_hang(0, 1, 5.0):
            raise RuntimeError("shape mismatch")


def test_the_timeout_defaults_by_device_and_can_be_set():
    assert load_config(None, []).scaling.collective_timeout() == 300.0
    assert load_config(None, ["scaling.use_gpu=true"]).scaling.collective_timeout() == 1800.0
    assert load_config(None, ["scaling.collective_timeout_s=45"]).scaling.collective_timeout() == 45.0

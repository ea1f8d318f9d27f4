"""Fixtures shared by the unit tier."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def gloo():
    """A one-rank gloo process group for in-process DeepSpeed engines (no Ray), torn down through
    DeepSpeed so the next module that needs one starts clean."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not dist.is_initialized():
        # a module before this one may have torn its group down with torch alone: DeepSpeed would
        # still hold that dead group and fail the next engine
        groups._release_process_group_references()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # releases DeepSpeed's references too, for the next module
    elif dist.is_initialized():
        dist.destroy_process_group()

"""A hung collective becomes a failure that names the rank and the step.

A rank stuck in a kernel, a frozen process or a dead link leaves the other ranks waiting in an
all-reduce. With `raydpo.config.ScalingConfig.collective_timeout` set on the process group (Ray
Train's ``TorchConfig``, torchrun's ``init_process_group``; DeepSpeed joins that group), the
waiting ranks' collective raises instead; `named_hang` turns that error into one line a user can
act on, and Ray, seeing a failed worker, restarts the group from the last checkpoint
(``run.max_failures``). On GPU the NCCL watchdog may take the process down itself: its message
names the rank, and the last ``[dpo] step`` line the step.
"""

from __future__ import annotations

from contextlib import contextmanager

# what gloo ("Timed out waiting 30000ms for recv operation") and NCCL ("Watchdog caught collective
# operation timeout", DistBackendError) say
_MARKERS = ("timed out", "timeout")


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than ``scaling.collective_timeout_s`` for another rank."""


def is_collective_timeout(err: BaseException) -> bool:
    import torch.distributed as dist

    return (isinstance(err, RuntimeError) and not isinstance(err, CollectiveTimeout) and dist.is_available()
            and dist.is_initialized() and any(m in str(err).lower() for m in _MARKERS))


@contextmanager
def named_hang(rank: int, step: int, timeout_s: float):
    """Run one step; a collective's timeout inside it is re-raised as `CollectiveTimeout`."""
    try:
        yield
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        raise CollectiveTimeout(
            f"rank {rank}: a collective waited {timeout_s:g} s at step {step} for a rank that never came "
            "(scaling.collective_timeout_s): another rank hung or its link died; Ray restarts the workers from "
            "the last checkpoint where run.max_failures allows") from e

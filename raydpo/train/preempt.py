"""Preemption: a SIGTERM anywhere ends the run at the next step with a checkpoint, not a loss.

* On the driver (`raydpo.orchestration.preemption.install_driver_handler`), SIGTERM writes the
  stage's stop file; the workers look for it after every step (`StopWatch`).
* On a Ray worker, the training loop runs in a thread that cannot install signal handlers, and
  Ray's own handler on the main thread exits the process at once. So
  `raydpo.orchestration.ray_callbacks.SigtermToStop` (a Ray Train worker callback, run on the worker's
  main thread) replaces it with one that only raises `TERM`. Under torchrun the loop owns the
  main thread and `StopWatch` installs the same handler itself.

* A node drain Ray announces ahead of time (a spot reclaim, ``kubectl drain``, `drain_notice`)
  counts as the same request, read between steps on every rank.

Every rank agrees on the flag through an all-reduce (`raydpo.train.loop`), so they all save
the same step and return; the driver then exits 0 saying how to resume.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from raydpo import storage


# Set by the SIGTERM handler of this process. A signal is process-wide by nature: this flag is
# the one piece of worker state that cannot travel through the loop's arguments.
TERM = threading.Event()


def _on_term(signum, frame) -> None:
    TERM.set()


def install_worker_handler():
    """Replace this process's SIGTERM handler (main thread only); returns the previous one."""
    return signal.signal(signal.SIGTERM, _on_term)


def drain_notice() -> Any:
    """Ray Train's node-drain notice for this worker's group (a spot reclaim, a Kubernetes node
    drain: `ray.train.PreemptionInfo`), or None; None outside a Ray Train worker.

    Read from the worker's own copy, which Ray Train's watcher (polling every
    ``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S``, 5 s) writes on every worker of the group: a field
    read per step. The public ``ray.train.get_preemption_info()`` is a barrier through Ray's
    actors on every call; the loop's own all-reduce of the stop flag already makes every rank
    stop at the same step."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - no Train context (torchrun, tests) or another Ray: no notice
        return None


def describe_drain(info: Any) -> str:
    """One line about a `ray.train.PreemptionInfo`."""
    nodes = ", ".join(n[:8] for n in getattr(info, "preempted_node_ids", [])) or "a node"
    ranks = ", ".join(map(str, getattr(info, "preempted_ranks", []))) or "?"
    deadline = getattr(info, "deadline_ms", None)
    when = f", {max(0.0, deadline / 1000 - time.time()):.0f} s before it goes" if deadline else ""
    return f"Ray drains node {nodes} (ranks {ranks}{when})"


class StopWatch:
    """``requested()`` turns true once this process got SIGTERM or the driver's stop file exists.
    A stop file in an object store is looked up at most every `REMOTE_EVERY_S` (a request per
    step per rank is on the step's critical path), and a failed look-up is "not yet"."""

    REMOTE_EVERY_S = 10.0

    def __init__(self, stop_file: str | None, drain: Callable[[], Any] | None = None,
                 say: Callable[[str], None] = print):
        self.stop_file = stop_file
        self._every = self.REMOTE_EVERY_S if stop_file and storage.is_remote(stop_file) else 0.0
        self._next = 0.0
        self._seen = False
        self._prev = None
        self._drain, self._say = drain or (lambda: None), say
        if threading.current_thread() is threading.main_thread():  # torchrun
            self._prev = install_worker_handler()

    def requested(self) -> bool:
        if TERM.is_set() or self._seen:
            return True
        notice = self._drain()
        if notice is not None:
            self._seen = True
            self._say(f"[preempt] {describe_drain(notice)}: checkpointing at the end of this step")
            return True
        if not self.stop_file or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self._every
        try:
            self._seen = storage.exists(self.stop_file)
        except OSError:  # the store did not answer: look again next time
            return False
        return self._seen

    def close(self) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)

"""The one fault-injection hook, for tests and the chaos suite (`raydpo.benchmarks.chaos`).

Faults are named in ``$RAYDPO_FAULTS``, a comma-separated list of ``kind@step[:rank=R]``; nothing
else in raydpo injects faults, and with the variable unset this module does nothing:

* ``kill@18``       the worker process SIGKILLs itself after optimizer step 18 (rank 0 unless
  ``:rank=R``) — a dead node, an OOM-killer, a spot instance gone;
* ``sigterm@7``     the worker's process gets SIGTERM after step 7 (a preemption notice);
* ``nan@5``         the loss of step 5's last micro-batch is NaN on that rank (``nanrun@5``: every
  micro-batch from step 5 on, for good);
* ``oom@3``         step 3 raises ``torch.OutOfMemoryError``;
* ``drain@4``       after step 4 the worker asks Ray to drain its node for a preemption, 120 s
  ahead (what a spot reclaim or a Kubernetes drain does; `raydpo.train.preempt.drain_notice`);
* ``hang@4``        after step 4 the worker's process SIGSTOPs itself: a rank that never comes
  to the next collective (`raydpo.train.hang`).

Each fault fires once per run: a marker in the run's folder (``$RAYDPO_FAULTS_DIR`` overrides it)
stops a restarted worker from hitting it again, so a restart can show that it recovers.
``nanrun`` fires on every step from its step on. The Ray driver reads the variable and hands it
to its workers with the rest of their config (a running cluster's workers do not see the
driver's environment).

The loop sees only `StepHooks`, the three points of a step where a fault may enter (no-ops when
none is named); `step_hooks` makes them from this rank's faults.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydpo import storage

ENV = "RAYDPO_FAULTS"
DIR_ENV = "RAYDPO_FAULTS_DIR"
KINDS = ("kill", "sigterm", "nan", "nanrun", "oom", "drain", "hang")
DRAIN_AHEAD_S = 120


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.step}:rank={self.rank}"


def parse(spec: str | None) -> list[Fault]:
    out = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        head, *opts = item.split(":")
        kind, _, step = head.partition("@")
        if kind not in KINDS or not step.isdigit():
            raise ValueError(f"${ENV}: bad fault {item!r} (want kind@step[:rank=R], kind one of {KINDS})")
        rank = 0
        for o in opts:
            k, _, v = o.partition("=")
            if k != "rank" or not v.isdigit():
                raise ValueError(f"${ENV}: bad option {o!r} in {item!r}")
            rank = int(v)
        out.append(Fault(kind, int(step), rank))
    return out


class Faults:
    """The faults of this process's rank, read from the environment once."""

    def __init__(self, rank: int, spec: str | None = None, fired_dir: str | None = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [f for f in parse(spec) if f.rank == rank]
        tag = hashlib.sha1(spec.encode()).hexdigest()[:10]
        # a folder in run storage (local or a bucket: a restarted worker on another node sees it)
        self.dir = os.environ.get(DIR_ENV) or fired_dir or str(Path(tempfile.gettempdir()) / f"raydpo-faults-{tag}")

    def _take(self, kind: str, step: int) -> bool:
        for f in self.faults:
            if f.kind == kind and f.step == step:
                marker = storage.join(self.dir, f.name.replace(":", "_"))
                if storage.exists(marker):
                    return False
                storage.write_text(marker, "fired")
                return True
        return False

    def nan_loss(self, step: int, last_micro: bool = True) -> bool:
        """This micro-batch of step ``step`` (1-based, the step being computed) gets a NaN loss."""
        if not self.faults:
            return False
        if any(f.kind == "nanrun" and step >= f.step for f in self.faults):
            return True
        return last_micro and self._take("nan", step)

    def poison(self, loss: Any, step: int, last_micro: bool) -> Any:
        """``loss`` (a tensor), or ``loss`` times NaN where `nan_loss` says so."""
        return loss * float("nan") if self.nan_loss(step, last_micro=last_micro) else loss

    def before_step(self, step: int) -> None:
        if self.faults and self._take("oom", step):
            import torch

            raise torch.OutOfMemoryError(f"injected by ${ENV} at step {step}")

    def after_step(self, step: int) -> None:
        """Process faults due after optimizer step ``step`` finished."""
        if not self.faults:
            return
        if self._take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._take("drain", step):
            drain_my_node(DRAIN_AHEAD_S)
        if self._take("hang", step):
            os.kill(os.getpid(), signal.SIGSTOP)


def drain_my_node(ahead_s: float) -> None:
    """Ask Ray's GCS to drain this worker's node for a preemption, ``ahead_s`` from now (what the
    autoscaler does for a spot reclaim), as ``ray drain-node`` would."""
    import time

    import ray
    from ray.core.generated import autoscaler_pb2

    ctx = ray.get_runtime_context()
    gcs = ray._raylet.GcsClient(address=ctx.gcs_address)
    accepted, why = gcs.drain_node(ctx.get_node_id(), autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   f"${ENV}", int((time.time() + ahead_s) * 1000))
    if not accepted:
        raise RuntimeError(f"${ENV}: Ray refused to drain this node: {why}")


def _nothing(step: int) -> None:
    return None


def _unchanged(loss: Any, step: int, last_micro: bool) -> Any:
    return loss


@dataclass(frozen=True)
class StepHooks:
    """Where the loop lets a fault into an optimizer step; each a no-op by default. ``step`` is
    1-based: the step about to be computed (``before_step``, ``loss``) or just finished
    (``after_step``). ``loss(loss, step, last_micro)`` returns the micro-batch loss to use."""

    before_step: Callable[[int], None] = _nothing
    loss: Callable[[Any, int, bool], Any] = _unchanged
    after_step: Callable[[int], None] = _nothing


def step_hooks(rank: int, spec: str | None = None, fired_dir: str | None = None) -> StepHooks:
    """This rank's faults (`Faults`: ``spec`` None reads ``$RAYDPO_FAULTS``) as step hooks."""
    faults = Faults(rank, spec, fired_dir)
    if not faults.faults:
        return StepHooks()
    return StepHooks(before_step=faults.before_step, loss=faults.poison, after_step=faults.after_step)

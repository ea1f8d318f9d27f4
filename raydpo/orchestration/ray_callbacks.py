"""Ray Train hooks that need Ray's internals (DeveloperAPI in Ray 2.60), kept in one place.

* `SigtermToStop`: on each worker's main thread, SIGTERM raises the stop flag instead of
  killing the process, so the loop checkpoints first (`raydpo.train.preempt`).
* `fatal_trainer`: a TorchTrainer whose failure policy does not retry errors that a restart
  would only repeat (out of memory, non-finite losses, a failed sanity check); every other worker
  failure is retried within ``run.max_failures`` as usual. Its controller polls the workers
  every `POLL_INTERVAL_S` (Ray's default 2 s) unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set.
"""

from __future__ import annotations

import os

from ray.train.v2._internal.execution.callback import WorkerCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

FATAL_MARKERS = ("out of memory on a worker", "non-finite loss", "sanity check failed")
# How often Ray Train's controller polls the workers: their reports (metrics, checkpoints) and
# their end reach the driver no later than this. Ray's 2 s cost a run ~2.5 s of idle cores after
# its last step (measured on the peer benchmark); a poll is one small actor call per worker.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.5


class SigtermToStop(WorkerCallback):
    def after_init_train_context(self):
        from raydpo.train.preempt import install_worker_handler

        install_worker_handler()


def is_fatal(err: BaseException) -> bool:
    if not isinstance(err, WorkerGroupError):
        return False
    return any(any(m in str(e) for m in FATAL_MARKERS) for e in err.worker_failures.values())


class NoRetryOnFatal(DefaultFailurePolicy):
    def make_decision(self, training_failed_error):
        if is_fatal(training_failed_error):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def fatal_trainer():
    """`ray.train.torch.TorchTrainer` with `NoRetryOnFatal` as its failure policy."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kw):
            os.environ.setdefault(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S))  # Ray hands it to the controller
            kw["failure_policy"] = NoRetryOnFatal(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kw)

    return Trainer

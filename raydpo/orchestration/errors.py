"""The driver's errors: what stops a stage before or after its training, and how the CLI says it.

`SETUP_ERRORS` are the setup's, not training's: the CLI prints their one line and exits 2.
`Preempted` exits 0 (the checkpoint is written), `WorkerOOM` and everything else exit 1 with
`explain`'s line.
"""

from __future__ import annotations

from raydpo.data.sources import DataSourceError


class StorageError(RuntimeError):
    """``run.storage_path`` cannot hold checkpoints."""


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached."""


class HubAccessError(RuntimeError):
    """A gated hub model and no token."""


class ResourceError(RuntimeError):
    """The cluster did not get what a step needs within ``scaling.resources_timeout_s``."""


class DataError(ValueError):
    """The data cannot make even one training batch."""


class ResumeConfigError(ValueError):
    """A rerun's config differs from its checkpoint's in keys that change the run."""


class WorkerOOM(RuntimeError):
    """A worker ran out of memory (never retried)."""


class Preempted(Exception):
    """The stage stopped early on SIGTERM, after writing a checkpoint; rerun to continue."""

    def __init__(self, stage: str, step: int | None, storage_dir: str):
        self.stage, self.step, self.storage_dir = stage, step, storage_dir
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{stage} was preempted{at} and checkpointed in {storage_dir}; "
                         "run the same command again to resume from there")


# errors of the setup, not of training: the CLI prints their one line and exits 2 (DataSourceError:
# a source that cannot be read, or whose format cannot be told or rendered, e.g. no chat template)
SETUP_ERRORS = (StorageError, TrackingError, DataError, DataSourceError, HubAccessError, ResumeConfigError,
                ResourceError)


def explain(err: BaseException) -> str:
    """One line for a failed stage: a worker's own message rather than Ray's wrapper and traceback."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, e = sorted(failures.items())[0]
        text = str(e).strip().splitlines()
        msg = next((ln for ln in reversed(text) if ln.strip() and not ln.startswith((" ", "Traceback"))), str(e))
        return f"worker {rank}: {msg.strip()}"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else err.__class__.__name__

"""What must hold before a stage or a search trains, each failing with one line (`errors`).

`preflight` runs before Ray starts (storage, tracking store, hub token); `check_cpu_budget` once
Ray is up; `check_batch_fits` once the training data is counted. `launch.fit_stage` and
`tune.run_tune` both call them.
"""

from __future__ import annotations

from raydpo import storage
from raydpo.config import Config
from raydpo.orchestration.errors import DataError, HubAccessError, ResourceError, StorageError, TrackingError


def check_storage(cfg: Config) -> str | None:
    """One line if ``run.storage_path`` cannot hold checkpoints (not a folder, not writable)."""
    import os
    import tempfile

    p = storage.root(cfg.run.storage_path)
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"run.storage_path {p}: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"run.storage_path {p} is not writable (checked {probe})"
    if p.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=p, prefix=".raydpo-write-check-"):
                pass
        except OSError as e:
            return f"run.storage_path {p} is not writable ({e.strerror or e})"
    return None


def preflight(cfg: Config) -> str:
    """What must hold before Ray starts, each failing with one line: run storage writable, the
    tracking store reachable (<= 5 s), a gated hub model's token present. Returns the store URI."""
    from raydpo import tracking
    from raydpo.models.factory import check_hub_access

    problem = check_storage(cfg)
    if problem:
        raise StorageError(problem)
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    problem = tracking.check_store(uri, timeout_s=5.0)
    if problem:
        raise TrackingError(problem)
    problem = check_hub_access(cfg.model)
    if problem:
        raise HubAccessError(problem)
    return uri


def check_cpu_budget(cfg: Config) -> None:
    """Ray Data needs CPUs of its own while workers train, or ingest stalls at 0 rows forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    s = cfg.scaling
    trainer_cpus = s.trainer_resources()["CPU"]
    if s.slots({"CPU": total}, {"CPU": trainer_cpus}) < 1:
        needed = trainer_cpus + s.data_cpus
        raise ResourceError(
            f"the cluster has {total:g} CPUs; {s.num_workers} workers x {s.cpus_per_worker:g} CPU "
            f"+ {s.data_cpus:g} for Ray Data = {needed:g}. Lower scaling.cpus_per_worker or "
            f"scaling.num_workers (Ray Data must keep >= scaling.data_cpus)"
        )


def check_batch_fits(who: str, rows: int, unit: str, num_workers: int, per_device_batch_size: int) -> int:
    """The global batch (``num_workers x per_device_batch_size``); a `DataError` naming ``who``
    (the stage, or ``tune``) when ``rows`` training ``unit`` (pairs, blocks) cannot fill one."""
    global_batch = per_device_batch_size * num_workers
    if rows < global_batch:
        raise DataError(f"{who}: {rows} training {unit} remain after filtering and the eval split, fewer than one "
                        f"batch per worker ({num_workers} workers x {per_device_batch_size} = {global_batch}); "
                        "add data or lower the batch size")
    return global_batch

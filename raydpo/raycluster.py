"""Connect to Ray once per process: the cluster in ``RAY_ADDRESS``, or an embedded local one."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: float | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True, "logging_level": logging.WARNING}
    if not address:
        # an embedded local instance: no dashboard, quiet
        kwargs.update(include_dashboard=False, num_cpus=int(num_cpus) if num_cpus else None)
    ray.init(address=address, **kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

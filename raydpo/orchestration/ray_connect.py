"""Connect to Ray once per process: the cluster in ``RAY_ADDRESS``, or an embedded local one."""

from __future__ import annotations

import logging
import math
import os


def ensure_ray(num_cpus: float | None = None) -> None:
    """``ray.init`` unless Ray is already initialized (then: nothing, whoever started it wins).

    With ``RAY_ADDRESS`` set, connect to that cluster (``num_cpus`` is ignored: the cluster has
    its own). Otherwise ``ray.init`` finds a local cluster started with ``ray start``, or starts
    an embedded instance with ``num_cpus`` CPUs (rounded up; None = all), dashboard on 127.0.0.1.
    Either way Ray logs at WARNING, worker output still reaches the driver, and Ray Data's
    progress bars and per-execution banners are off.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        # the job-submission (dashboard) address users export for `ray job submit`; ray.init
        # would read it too and fail, so look for a local cluster / start one instead
        os.environ.pop("RAY_ADDRESS")
        address = None
    kwargs: dict = {"log_to_driver": True, "configure_logging": True, "logging_level": logging.WARNING}
    if address is None:
        # the dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner needs to
        # free the workers' placement group of a Tune trial that was stopped (ASHA) — without it
        # the next trial waits forever for CPUs
        kwargs["include_dashboard"] = True
        kwargs["dashboard_host"] = "127.0.0.1"
        if num_cpus is not None:
            kwargs["num_cpus"] = max(1, math.ceil(num_cpus))
    try:
        ray.init(address=address, **kwargs)
    except ValueError as e:  # address None found a `ray start` cluster, which refuses num_cpus
        if "num_cpus" not in kwargs or "existing cluster" not in str(e):
            raise
        kwargs.pop("num_cpus")
        ray.init(address=address, **kwargs)

    from raydpo.orchestration.console import attach_ray

    attach_ray()  # the active console, if any, routes the workers' output from now on

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

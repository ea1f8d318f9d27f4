"""Training metrics as Prometheus gauges, exported from the Ray Train worker of rank 0.

The loop's logged dict (``train/loss``, ``train/tokens_per_s``, ``eval/rewards/margins``, ...;
already all-reduced across ranks) goes to MLflow *and*, through `TrainMetricsExporter`, to
``ray.util.metrics.Gauge``s, so ``dashboards/raydpo.json`` can draw training next to Ray's own
node, GPU and object-store metrics from one Prometheus.

Names. A gauge created as ``raydpo_loss`` reaches Prometheus as ``ray_raydpo_loss``: Ray's
metrics agent prefixes every metric, user ones included, with its namespace ``ray``
(``ray/_private/telemetry/open_telemetry_metric_recorder.py``: ``name=f"{NAMESPACE}_{name}"``,
checked against a live node by ``tests/integration/test_metrics_export.py``). Train and eval
values of one quantity share a gauge and differ by the ``split`` label. Units are Prometheus'
base units (seconds, bytes), so the loop's ``peak_memory_gb`` is exported in bytes.

Nothing Ray-related happens at import time: the gauges are built in the worker (Ray metrics
belong to the process that records them; a module-level gauge would be created in the driver
and pickled into workers) and ``ray`` is imported only when no gauge factory is injected.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from raydpo.metric_names import (LR, METRIC_KEYS, NONFINITE_STEPS, PADDING_FRACTION, PEAK_MEMORY_GB, PEAK_RSS_MIB,
                                 SAMPLES_PER_S, SCORED_TOKENS_PER_S, SPLITS, STEP_TIME, TOKENS_PER_S)

RAY_PROMETHEUS_PREFIX = "ray_"  # what Ray's metrics agent prepends to every metric name
GB = 2**30

# Quantities logged for both splits: the key after the ``train/`` or ``eval/`` prefix -> gauge.
SPLIT_GAUGES: dict[str, tuple[str, str]] = {
    k: ("raydpo_" + k.replace("/", "_"), f"{k} of the latest logged step (label split: train or eval)")
    for k in METRIC_KEYS
}
# Train-only loop keys -> (gauge name, description, factor to Prometheus base units).
TRAIN_GAUGES: dict[str, tuple[str, str, float]] = {
    TOKENS_PER_S: ("raydpo_tokens_per_second", "training tokens per second, all workers", 1.0),
    SAMPLES_PER_S: ("raydpo_samples_per_second", "training samples (DPO pairs) per second, all workers", 1.0),
    STEP_TIME: ("raydpo_step_time_seconds", "wall time per optimizer step over the logging window", 1.0),
    PEAK_MEMORY_GB: ("raydpo_gpu_peak_memory_bytes", "peak GPU memory allocated by torch on rank 0", GB),
    LR: ("raydpo_learning_rate", "learning rate after the step", 1.0),
    SCORED_TOKENS_PER_S: ("raydpo_scored_tokens_per_second", "DPO response tokens scored per second, all workers",
                                  1.0),
    PADDING_FRACTION: ("raydpo_padding_fraction", "share of the DPO batch positions that are padding", 1.0),
    PEAK_RSS_MIB: ("raydpo_workers_peak_rss_bytes", "peak resident memory of all training workers, summed",
                           2**20),
    NONFINITE_STEPS: ("raydpo_nonfinite_steps", "optimizer steps skipped for a non-finite loss, so far", 1.0),
}
STEP_GAUGE = ("raydpo_step", "optimizer step of the latest logged metrics")
RSS_GAUGE = ("raydpo_process_rss_bytes", "resident memory of the rank-0 training process")

TAG_KEYS = ("stage", "experiment", "run")

GAUGE_NAMES: tuple[str, ...] = (
    *(name for name, _ in SPLIT_GAUGES.values()),
    *(name for name, _, _ in TRAIN_GAUGES.values()),
    STEP_GAUGE[0],
    RSS_GAUGE[0],
)
# The names Prometheus sees; the dashboard may query these and nothing else of raydpo's.
EXPORTED_METRICS: tuple[str, ...] = tuple(RAY_PROMETHEUS_PREFIX + n for n in GAUGE_NAMES)

GaugeFactory = Callable[[str, str, tuple[str, ...]], Any]
_logger = logging.getLogger(__name__)


def _ray_gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


def ray_refresh_interval_s() -> float:
    """Half of Ray's metrics report interval (at least 1 s, as Ray floors it): how often a gauge
    must be set again to stay in Prometheus (see `TrainMetricsExporter`)."""
    import ray

    try:
        interval_ms = ray._config.metrics_report_interval_ms()
    except AttributeError:  # a private API: fall back to Ray 2.60's default of 10 s
        interval_ms = 10_000
    return max(interval_ms, 1000) / 2000


def _rss_bytes() -> float:
    import psutil  # a dependency of ray[default]

    return float(psutil.Process(os.getpid()).memory_info().rss)


class TrainMetricsExporter:
    """Sets one gauge per logged metric. Build it inside the worker (rank 0), call `export` (or
    the `wrap`-ped log hook) with each dict the loop logs, and `close` it when the stage ends.
    Keys it does not know are left to MLflow alone.

    Ray reports a gauge's value once after each ``set`` and its agent drops a value it has not
    heard about for two report intervals (20 s by default; measured on Ray 2.60: a gauge set
    once vanishes from the scrape ~20 s later). Steps logged further apart than that would
    leave holes in every panel, so a daemon thread sets the last values again (and samples the
    process RSS) every ``refresh_s`` seconds until `close`.

    ``gauge_factory(name, description, tag_keys)`` returns an object with
    ``set(value, tags=...)``; the default builds ``ray.util.metrics.Gauge``. ``refresh_s=None``
    means `ray_refresh_interval_s` with Ray gauges and no refresh thread with an injected factory;
    0 disables the thread.
    """

    def __init__(self, stage: str, experiment: str, run: str, *, gauge_factory: GaugeFactory | None = None,
                 rss: Callable[[], float] = _rss_bytes, refresh_s: float | None = None):
        make = gauge_factory or _ray_gauge
        self.tags = {"stage": stage, "experiment": experiment, "run": run}
        self._rss = rss
        self._split = {k: make(name, desc, (*TAG_KEYS, "split")) for k, (name, desc) in SPLIT_GAUGES.items()}
        self._train = {k: (make(name, desc, TAG_KEYS), factor) for k, (name, desc, factor) in TRAIN_GAUGES.items()}
        self._step = make(*STEP_GAUGE, TAG_KEYS)
        self._rss_gauge = make(*RSS_GAUGE, TAG_KEYS)
        self._last: dict[tuple[int, str], tuple[Any, float, dict[str, str]]] = {}  # (gauge, split) -> set args
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if refresh_s is None:
            refresh_s = ray_refresh_interval_s() if gauge_factory is None else 0
        self._thread = None
        if refresh_s > 0:
            self._thread = threading.Thread(target=self._refresh_loop, args=(refresh_s,), daemon=True,
                                            name="raydpo-metrics-refresh")
            self._thread.start()

    def export(self, metrics: dict[str, float], step: int | None = None) -> None:
        sets = []
        for key, value in metrics.items():
            if key in self._train:
                gauge, factor = self._train[key]
                sets.append((gauge, float(value) * factor, self.tags))
                continue
            split, _, rest = key.partition("/")
            if split in SPLITS and rest in self._split:
                sets.append((self._split[rest], float(value), {**self.tags, "split": split}))
        if step is None and "step" in metrics:
            step = int(metrics["step"])
        if step is not None:
            sets.append((self._step, float(step), self.tags))
        with self._lock:
            for gauge, value, tags in sets:
                self._last[(id(gauge), tags.get("split", ""))] = (gauge, value, tags)
                gauge.set(value, tags=tags)
            self._rss_gauge.set(self._rss(), tags=self.tags)

    def refresh(self) -> None:
        """Set every last exported value again, and the current RSS."""
        with self._lock:
            for gauge, value, tags in self._last.values():
                gauge.set(value, tags=tags)
            self._rss_gauge.set(self._rss(), tags=self.tags)

    def _refresh_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.refresh()
            except Exception as e:  # metrics must never take training down
                _logger.warning("raydpo metrics: refreshing the gauges failed, stopping the refresh: %r", e)
                return

    def close(self) -> None:
        """Stop refreshing; Ray drops the values from Prometheus two report intervals later."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def wrap(self, log: Callable[[dict[str, float], int], None]) -> Callable[[dict[str, float], int], None]:
        """A ``log(metrics, step)`` hook that calls ``log`` (MLflow) and then exports."""

        def log_and_export(metrics: dict[str, float], step: int) -> None:
            log(metrics, step)
            self.export(metrics, step)

        return log_and_export

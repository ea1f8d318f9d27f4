"""The metrics dashboards/raydpo.json queries really reach Prometheus: a real local Ray node, a
`TrainMetricsExporter` in a Ray actor on the session's cluster (as in the rank-0 Train worker), then a scrape of the
node's Prometheus endpoint. Names, labels and values are checked on what Prometheus would see."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: promql.py, shared with test_dashboard.py
from promql import dashboard_metrics, load_dashboard  # noqa: E402

from raydpo.tracking.prometheus import EXPORTED_METRICS  # noqa: E402

pytestmark = [pytest.mark.integration]

# Dashboard metrics a CPU-only node running no training cannot show. They are checked against the
# installed Ray's source only (tests/test_dashboard.py::test_every_queried_metric_is_exported_by_raydpo_or_ray).
NOT_ON_THIS_NODE = {
    "ray_node_gpus_utilization": "reported per GPU, only where Ray finds GPUs",
    "ray_node_gram_used": "reported per GPU, only where Ray finds GPUs",
    "ray_node_gram_available": "reported per GPU, only where Ray finds GPUs",
    "ray_train_report_total_blocked_time_s": "set by Ray Train V2 workers: needs a TorchTrainer run (minutes here)",
    "ray_data_iter_total_blocked_seconds": "set once per dataset iteration by Ray Data's stats actor, and dropped "
                                           "two report intervals later: too short-lived to catch reliably",
}

TAGS = {"experiment": "metrics-it", "run": "run-it", "stage": "dpo"}
# What the DPO loop logs at a step with eval (peak memory is GPU-only in the loop; any value will do here).
SAMPLE = {
    "train/loss": 0.6, "train/rewards/chosen": 0.3, "train/rewards/rejected": -0.2,
    "train/rewards/accuracies": 0.75, "train/rewards/margins": 0.5, "train/logps/chosen": -40.0,
    "train/logps/rejected": -55.0, "train/tokens_per_s": 1234.5, "train/samples_per_s": 6.5,
    "train/step_time_s": 0.8, "train/peak_memory_gb": 1.5, "train/lr": 5e-6, "train/padding_fraction": 0.0,
    "train/scored_tokens_per_s": 456.0, "train/peak_rss_mib": 2048.0, "train/nonfinite_steps": 1.0,
    "eval/loss": 0.65, "eval/rewards/chosen": 0.2, "eval/rewards/rejected": -0.1,
    "eval/rewards/accuracies": 0.625, "eval/rewards/margins": 0.3, "eval/logps/chosen": -41.0,
    "eval/logps/rejected": -54.0,
}
STEP = 12


def _rank0_class():
    # Built here, not at module level, so Ray ships it by value: workers cannot import this test module.
    class Rank0:
        """Stands in for the rank-0 Train worker: builds the exporter (and its refresh thread) in
        its own process and stays alive, as a worker does between two logged steps."""

        def export(self, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
            from raydpo.tracking.prometheus import TrainMetricsExporter

            self.exporter = TrainMetricsExporter(tags["stage"], tags["experiment"], tags["run"])
            self.exporter.export(metrics, step)

    return Rank0


def _scrape(port: int) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


@pytest.mark.timeout(240)
def test_dashboard_metrics_reach_prometheus(ray_connected):
    import ray

    queried = dashboard_metrics(load_dashboard())
    assert set(NOT_ON_THIS_NODE) <= queried, "NOT_ON_THIS_NODE lists a metric the dashboard no longer queries"
    expected = queried - set(NOT_ON_THIS_NODE)
    assert set(EXPORTED_METRICS) <= expected
    assert {"ray_node_cpu_utilization", "ray_node_mem_used_host", "ray_object_store_memory"} <= expected

    # Components push their metrics to the node's agent every metrics_report_interval_ms; the
    # session's cluster runs at 1 s (tests/integration/conftest.py) and the agent drops a gauge
    # not heard of for two intervals, which makes "still there later" (the exporter's refresh
    # thread) quick to check.
    port = ray_connected.metrics_port
    actor = ray.remote(num_cpus=0)(_rank0_class()).remote()
    ray.get(actor.export.remote(SAMPLE, STEP, TAGS), timeout=60)  # once, as at one logged step
    exported_at = time.monotonic()

    deadline = exported_at + 60
    while True:
        samples = _scrape(port)
        missing = expected - {s.name for s in samples}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"queried by the dashboard but not exported by this node: {sorted(missing)}"
    # node gauges come from the agent's own reporter loop, which may skip a beat under load:
    # check their labels on this scrape, not the later one
    node = [s for s in samples if s.name == "ray_node_cpu_utilization"]

    # A gauge set once is gone two report intervals (2 s here) after its export; the next
    # logged step may be minutes away, so the exporter keeps setting its last values.
    time.sleep(max(0.0, exported_at + 8 - time.monotonic()))
    samples = _scrape(port)
    gone = set(EXPORTED_METRICS) - {s.name for s in samples}
    assert not gone, f"raydpo metrics dropped between logged steps: {sorted(gone)}"
    ray.kill(actor)

    ours = [s for s in samples if s.name in EXPORTED_METRICS and s.labels.get("run") == TAGS["run"]]

    def value(name: str, **labels: str) -> float:
        hits = [s.value for s in ours if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(hits) == 1, (name, labels, hits)
        return hits[0]

    for s in ours:  # the labels the dashboard's variables and filters select on
        assert {k: s.labels.get(k) for k in TAGS} == TAGS, s
    assert value("ray_raydpo_loss", split="train") == pytest.approx(0.6)
    assert value("ray_raydpo_loss", split="eval") == pytest.approx(0.65)
    assert value("ray_raydpo_rewards_margins", split="eval") == pytest.approx(0.3)
    assert value("ray_raydpo_rewards_accuracies", split="train") == pytest.approx(0.75)
    assert value("ray_raydpo_tokens_per_second") == pytest.approx(1234.5)
    assert value("ray_raydpo_step_time_seconds") == pytest.approx(0.8)
    assert value("ray_raydpo_gpu_peak_memory_bytes") == pytest.approx(1.5 * 2**30)
    assert value("ray_raydpo_learning_rate") == pytest.approx(5e-6)
    assert value("ray_raydpo_padding_fraction") == 0.0
    assert value("ray_raydpo_scored_tokens_per_second") == pytest.approx(456.0)
    assert value("ray_raydpo_workers_peak_rss_bytes") == pytest.approx(2048.0 * 2**20)
    assert value("ray_raydpo_nonfinite_steps") == pytest.approx(1.0)
    assert value("ray_raydpo_step") == STEP
    assert 10 * 2**20 < value("ray_raydpo_process_rss_bytes") < 64 * 2**30  # a real Python process
    assert node and all("SessionName" in s.labels for s in node)  # the dashboard's session filter

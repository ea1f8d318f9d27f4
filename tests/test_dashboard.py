"""dashboards/raydpo.json queries only metrics that raydpo or the installed Ray exports, and
raydpo.tracking.prometheus maps every metric the loop logs onto a gauge (fake gauges here: no Ray).

The live counterpart, scraping a real node, is tests/integration/test_metrics_export.py."""

from __future__ import annotations

import ast
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from promql import (
    DASHBOARD,
    dashboard_expressions,
    dashboard_metrics,
    iter_panels,
    load_dashboard,
    metric_names,
    ray_defines,
    unknown_metrics,
)
from raydpo import losses
from raydpo.tracking import prometheus as metrics
from raydpo.tracking.prometheus import EXPORTED_METRICS, GAUGE_NAMES, TrainMetricsExporter

LOOP = Path(__file__).resolve().parents[1] / "raydpo" / "train" / "loop.py"


# -- the PromQL extractor ------------------------------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("ray_node_cpu_utilization", {"ray_node_cpu_utilization"}),
    ('sum by (instance, GpuIndex) (rate(foo_total{a="b", c=~"x|y"}[5m] offset 1h30m))'
     ' / on(instance) group_left(Name) bar * 1e3 > bool 0.5', {"foo_total", "bar"}),
    ('sum(a{l="}", m="{{x}}"}) without (le) + ignoring (k) b', {"a", "b"}),
    ("histogram_quantile(0.99, sum by (le) (rate(lat_bucket[$__rate_interval])))", {"lat_bucket"}),
    ("max_over_time(x[1h:5m]) or vector(0)", {"x"}),
    ("topk(5, a) unless b and c atan2 d", {"a", "b", "c", "d"}),
    ('label_replace(a, "dst", "$1", "src", "(.*)") * 0x1F', {"a"}),
    ('count_values("v", a) > Inf', {"a"}),
    ("sum (m) by (instance) / on() group_left sum(n)", {"m", "n"}),
    ("time() - process_start_time_seconds", {"process_start_time_seconds"}),
    ("1 + 2.5e-3", set()),
    ('label_values(ray_node_cpu_utilization{SessionName=~"$SessionName"}, instance)', {"ray_node_cpu_utilization"}),
    ("label_values(m, job)", {"m"}),
    ("label_values(job)", set()),
])
def test_metric_names(expr, expected):
    assert metric_names(expr) == expected


@pytest.mark.parametrize("expr", ['{__name__="ray_node_cpu_utilization"}', "made_up_fn(ray_x)"])
def test_metric_names_refuses_what_it_cannot_read(expr):
    with pytest.raises(ValueError):
        metric_names(expr)


# -- the dashboard -------------------------------------------------------------------------

def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in iter_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]


def test_every_panel_has_promql_targets_on_the_datasource_variable():
    panels = [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] != "row"]
    assert len(panels) >= 15
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no target"
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert metric_names(t["expr"]), f"{p['title']!r}: {t['expr']!r} queries no metric"


def test_every_queried_metric_is_exported_by_raydpo_or_ray():
    names = dashboard_metrics(load_dashboard())
    assert unknown_metrics(names, EXPORTED_METRICS) == []
    ray_names = {n for n in names if not n.startswith("ray_raydpo_")}
    # the panels the issue asks for: node CPU/memory/GPU, GPU memory, object store
    for needed in ("ray_node_cpu_utilization", "ray_node_mem_used_host", "ray_node_gpus_utilization",
                   "ray_node_gram_used", "ray_object_store_memory"):
        assert needed in ray_names


def test_dashboard_draws_every_metric_raydpo_exports():
    queried = {n for n in dashboard_metrics(load_dashboard()) if n.startswith("ray_raydpo_")}
    assert queried == set(EXPORTED_METRICS)


def test_invented_and_misspelt_names_are_rejected():
    invented = {"ray_node_gpu_fan_speed_rpm", "ray_raydpo_tokens_per_sec", "node_cpu_utilization",
                "ray_node_cpu", "ray_object_store"}
    assert unknown_metrics(invented, EXPORTED_METRICS) == sorted(invented)
    # a raydpo name is judged against raydpo's list alone, even if Ray had a literal like it
    assert unknown_metrics({"ray_raydpo_loss"}, ()) == ["ray_raydpo_loss"]


def test_ray_lookup_finds_python_and_compiled_metrics_and_exporter_suffixes():
    assert ray_defines("ray_node_cpu_utilization")  # reporter_agent.py
    assert ray_defines("ray_data_iter_total_blocked_seconds")  # ray/data
    assert ray_defines("ray_node_manager_unexpected_worker_failure_total")  # raylet (C++), counter
    assert ray_defines("ray_scheduler_placement_time_ms_bucket")  # C++ histogram
    assert not ray_defines("ray_node_manager_unexpected_worker_failure_bucket_total")


def test_a_dashboard_with_an_invented_metric_fails_the_check(tmp_path):
    d = load_dashboard()
    panel = next(p for p in iter_panels(d["panels"]) if p["type"] != "row")
    panel["targets"][0]["expr"] = 'sum(ray_node_cpu_utilisation{instance=~"$Instance"})'  # British spelling
    assert unknown_metrics(dashboard_metrics(d), EXPORTED_METRICS) == ["ray_node_cpu_utilisation"]


def test_variable_queries_are_checked_too():
    exprs = dashboard_expressions(load_dashboard())
    assert any(e.startswith("label_values(ray_raydpo_step") for e in exprs)
    assert DASHBOARD.read_text().endswith("\n")


# -- raydpo.tracking.prometheus ------------------------------------------------------------------------

class FakeGauge:
    def __init__(self, name, description, tag_keys):
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.values: dict[tuple, float] = {}
        self.sets = 0
        self.was_set = threading.Event()

    def set(self, value, tags=None):
        assert isinstance(value, float)
        assert set(tags) == set(self.tag_keys), (self.name, tags)  # what ray.util.metrics enforces
        self.values[tuple(sorted(tags.items()))] = value
        self.sets += 1
        self.was_set.set()


def _fake_factory(gauges: dict[str, FakeGauge]):
    def factory(name, description, tag_keys):
        assert name not in gauges
        gauges[name] = FakeGauge(name, description, tag_keys)
        return gauges[name]

    return factory


@pytest.fixture
def exporter():
    gauges: dict[str, FakeGauge] = {}
    exp = TrainMetricsExporter("dpo", "exp", "run-a", gauge_factory=_fake_factory(gauges), rss=lambda: 123.0)
    assert exp._thread is None  # injected gauges and no refresh_s: no thread
    return exp, gauges


def _value(gauge: FakeGauge, **extra) -> float:
    tags = {"stage": "dpo", "experiment": "exp", "run": "run-a", **extra}
    return gauge.values[tuple(sorted(tags.items()))]


def test_exporter_maps_loop_keys_to_gauges(exporter):
    exp, g = exporter
    assert set(g) == set(GAUGE_NAMES)
    exp.export({"train/loss": 0.69, "eval/loss": 0.7, "train/rewards/margins": 0.25, "eval/rewards/accuracies": 0.75,
                "train/logps/chosen": -12.0, "train/tokens_per_s": 1500.0, "train/samples_per_s": 3.0,
                "train/step_time_s": 0.5, "train/peak_memory_gb": 1.5, "train/lr": 1e-4,
                "train/not_a_metric_we_know": 9.0}, 7)
    assert _value(g["raydpo_loss"], split="train") == 0.69
    assert _value(g["raydpo_loss"], split="eval") == 0.7
    assert _value(g["raydpo_rewards_margins"], split="train") == 0.25
    assert _value(g["raydpo_rewards_accuracies"], split="eval") == 0.75
    assert _value(g["raydpo_logps_chosen"], split="train") == -12.0
    assert _value(g["raydpo_tokens_per_second"]) == 1500.0
    assert _value(g["raydpo_samples_per_second"]) == 3.0
    assert _value(g["raydpo_step_time_seconds"]) == 0.5
    assert _value(g["raydpo_gpu_peak_memory_bytes"]) == 1.5 * 2**30
    assert _value(g["raydpo_learning_rate"]) == 1e-4
    assert _value(g["raydpo_step"]) == 7.0
    assert _value(g["raydpo_process_rss_bytes"]) == 123.0
    assert g["raydpo_rewards_chosen"].values == {}  # not logged, not invented
    assert all(len(x.values) <= 2 for x in g.values())


def test_exporter_takes_numpy_and_tensor_scalars_and_a_step_key(exporter):
    exp, g = exporter
    exp.export({"train/loss": np.float32(0.5), "train/lr": torch.tensor(2e-5), "step": 3.0})
    assert _value(g["raydpo_loss"], split="train") == 0.5
    assert _value(g["raydpo_learning_rate"]) == pytest.approx(2e-5)
    assert _value(g["raydpo_step"]) == 3.0


def test_wrap_logs_then_exports(exporter):
    exp, g = exporter
    calls = []
    log = exp.wrap(lambda m, step: calls.append((dict(m), step)))
    log({"eval/rewards/margins": 0.1}, 4)
    assert calls == [({"eval/rewards/margins": 0.1}, 4)]
    assert _value(g["raydpo_rewards_margins"], split="eval") == 0.1
    assert _value(g["raydpo_step"]) == 4.0


def test_refresh_sets_the_last_values_again_and_samples_rss():
    gauges: dict[str, FakeGauge] = {}
    rss = iter([100.0, 150.0, 200.0])  # one per export, then the refresh
    exp = TrainMetricsExporter("sft", "exp", "run-a", gauge_factory=_fake_factory(gauges), rss=lambda: next(rss))
    exp.export({"train/loss": 2.0, "eval/loss": 2.5}, 1)
    exp.export({"train/loss": 1.5}, 2)
    before = {n: g.sets for n, g in gauges.items()}
    exp.refresh()
    tags = {"experiment": "exp", "run": "run-a", "stage": "sft"}

    def key(**extra):
        return tuple(sorted({**tags, **extra}.items()))

    assert gauges["raydpo_loss"].values == {key(split="train"): 1.5, key(split="eval"): 2.5}
    assert gauges["raydpo_loss"].sets == before["raydpo_loss"] + 2  # both splits, latest values
    assert gauges["raydpo_step"].values == {key(): 2.0}
    assert gauges["raydpo_process_rss_bytes"].values == {key(): 200.0}
    assert gauges["raydpo_tokens_per_second"].sets == 0  # never logged: never set


def test_refresh_thread_keeps_setting_until_close():
    gauges: dict[str, FakeGauge] = {}
    exp = TrainMetricsExporter("dpo", "exp", "run-a", gauge_factory=_fake_factory(gauges), rss=lambda: 1.0,
                               refresh_s=0.01)
    try:
        exp.export({"train/lr": 1e-5}, 1)
        lr = gauges["raydpo_learning_rate"]
        lr.was_set.clear()
        assert lr.was_set.wait(10), "the refresh thread did not set the gauge again"
    finally:
        exp.close()
    assert not exp._thread.is_alive()
    n = lr.sets
    time.sleep(0.05)
    assert lr.sets == n


def test_a_failing_refresh_stops_the_thread_without_raising(caplog):
    gauges: dict[str, FakeGauge] = {}
    exp = TrainMetricsExporter("dpo", "exp", "run-a", gauge_factory=_fake_factory(gauges),
                               rss=lambda: 1.0, refresh_s=0.01)
    exp.export({"train/lr": 1e-5}, 1)
    exp._rss = lambda: 1 / 0
    exp._thread.join(10)
    assert not exp._thread.is_alive()
    assert "refreshing the gauges failed" in caplog.text
    exp.close()


def test_every_metric_the_loop_logs_has_a_gauge():
    # train-only keys the loop writes as metrics["train/..."] = ... or metrics[NAME] = ... with a
    # name from raydpo.metric_names
    from raydpo import metric_names

    loop_keys = set()
    for node in ast.walk(ast.parse(LOOP.read_text())):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "metrics":
                    if isinstance(t.slice, ast.Constant):
                        loop_keys.add(t.slice.value)
                    elif isinstance(t.slice, ast.Name):
                        loop_keys.add(getattr(metric_names, t.slice.id))  # AttributeError: a name not shared
    assert {"train/tokens_per_s", "train/step_time_s", "train/peak_memory_gb", "train/lr"} <= loop_keys
    assert loop_keys - {"step"} <= set(metrics.TRAIN_GAUGES)
    # per-split keys: what the DPO and SFT loops finalize (prefixed train/ or eval/)
    z = torch.zeros(2)
    dpo_keys = set(losses.dpo_metric_sums(z, z, z, z, z)) - {losses.COUNT}
    assert dpo_keys | {losses.LOSS} <= set(metrics.SPLIT_GAUGES)


def test_gauge_names_are_valid_and_exported_with_rays_prefix():
    for name in GAUGE_NAMES:
        assert re.fullmatch(r"raydpo_[a-z][a-z0-9_]*", name), name
    assert EXPORTED_METRICS == tuple("ray_" + n for n in GAUGE_NAMES)
    assert len(set(EXPORTED_METRICS)) == len(EXPORTED_METRICS)



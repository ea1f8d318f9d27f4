"""A stage on a cold or late cluster: what each step needs, whether a cluster holds it node by
node, the pools sized from it, and the wait (one line, the autoscaler asked, exit 2 at the
timeout). Ray's calls are faked: no Ray starts here."""

from __future__ import annotations

import pytest

from raydpo.config import Config, ConfigError, load_config, resume_fingerprint
from raydpo.orchestration import resources as r
from raydpo.orchestration.errors import SETUP_ERRORS, ResourceError

CPU = Config()  # 2 workers x 0.5 CPU, 1 CPU for Ray Data
GPU = Config().with_overrides({"scaling.use_gpu": True, "scaling.cpus_per_worker": 4.0, "scaling.data_cpus": 2.0})
HEAD = {"CPU": 0.0, "memory": 8e9, "node:10.0.0.1": 1.0}  # a `num-cpus: 0` head, as every shipped cluster starts


# -- what each step needs --------------------------------------------------------------------------


def test_a_stage_needs_its_workers_one_bundle_each_and_ray_datas_whole_cpus():
    workers, data = r.training_needs(CPU)
    assert workers.bundles == ({"CPU": 0.5},) * 2 and data.bundles == ({"CPU": 1.0},)
    assert " + ".join(map(str, r.training_needs(CPU))) == "2 x {CPU: 0.5} for the training workers + 1 CPU for Ray Data"
    workers, data = r.training_needs(GPU)
    assert workers.bundles == ({"CPU": 4.0, "GPU": 1.0},) * 2 and data.bundles == ({"CPU": 1.0},) * 2
    assert str(workers) == "2 x {CPU: 4, GPU: 1} for the training workers" and str(data) == "2 CPUs for Ray Data"
    odd = r.data_need(Config().with_overrides({"scaling.data_cpus": 1.5}).scaling)
    assert odd.bundles == ({"CPU": 1.0}, {"CPU": 0.5}) and str(odd) == "1.5 CPUs for Ray Data"


def test_the_merge_task_never_asks_for_less_than_a_whole_cpu_and_takes_a_workers_gpu():
    assert r.merge_task_options(CPU) == {"num_cpus": 1.0, "num_gpus": 0.0}  # 0.5 per worker, 1 for the merge
    assert r.merge_task_options(GPU) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert [str(n) for n in r.merge_needs(CPU)] == ["{CPU: 1} for the SFT merge"]
    assert not r.fits([HEAD], r.merge_needs(CPU))  # it cannot land on the head
    for cfg in (CPU, GPU):  # neither can a reference replica
        assert not r.fits([HEAD], r.reference_needs(cfg)[:1])


def test_the_autoscaler_is_asked_for_every_bundle_without_zero_amounts():
    assert r.bundles_of(r.reference_needs(GPU)) == [{"GPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]


# -- node by node, not totals --------------------------------------------------------------------


@pytest.mark.parametrize("cfg,nodes,ok", [
    (CPU, [HEAD], False),  # a cold cluster: only the head
    (CPU, [HEAD, {"CPU": 2.0}], True),  # a worker node joined
    (CPU, [HEAD, {"CPU": 1.5}], False),
    (CPU, [HEAD] + [{"CPU": 0.5}] * 4, False),  # 2 CPUs in all, but Ray Data's whole CPU fits no node
    (CPU, [HEAD, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}], True),
    (GPU, [HEAD, {"CPU": 8.0, "GPU": 1.0}], False),  # one GPU for two workers
    (GPU, [HEAD, {"CPU": 5.0, "GPU": 1.0}, {"CPU": 5.0, "GPU": 1.0}], True),  # each node: a worker + 1 CPU
    (GPU, [HEAD, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 2.0}], True),  # Ray Data on the CPU node
    (GPU, [HEAD, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], False),  # no CPU left for Ray Data
    (Config().with_overrides({"scaling.use_gpu": True, "scaling.gpus_per_worker": 2.0}),
     [HEAD, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}],
     False),  # 4 GPUs in all for 2 x 2, but no node holds a 2-GPU worker
    (Config().with_overrides({"scaling.use_gpu": True, "scaling.gpus_per_worker": 2.0}),
     [HEAD, {"CPU": 8.0, "GPU": 4.0}], True),
])
def test_a_step_fits_when_every_bundle_has_a_node(cfg, nodes, ok):
    assert r.fits(nodes, r.training_needs(cfg)) is ok


@pytest.mark.parametrize("nodes,overrides,expected", [
    ([{"CPU": 2.0}], {}, 2),  # 2 CPUs, 1 kept for Ray Data, 0.5 per replica
    ([{"CPU": 16.0}], {"scaling.cpus_per_worker": 4.0}, 3),
    ([{"CPU": 1.0}], {}, 1),  # never fewer than one replica
    ([HEAD], {}, 1),
    ([{"CPU": 64.0, "GPU": 8.0}], {"scaling.use_gpu": True}, 8),  # one per GPU, not per CPU
    ([{"CPU": 64.0, "GPU": 8.0}], {"scaling.use_gpu": True, "scaling.gpus_per_worker": 2.0}, 4),
    ([HEAD, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], {"scaling.use_gpu": True}, 2),
    ([HEAD, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], {"scaling.cpus_per_worker": 0.75}, 2),  # .25 left on two nodes
])
def test_the_reference_pool_is_every_replica_that_fits_beside_ray_data(nodes, overrides, expected):
    assert r.reference_pool_size(Config().with_overrides(overrides), nodes) == expected


def test_tune_runs_as_many_trials_as_fit_beside_ray_data_or_its_own_limit(monkeypatch):
    from raydpo.orchestration.tune import max_concurrent

    cfg = Config().with_overrides({"scaling.num_workers": 2, "scaling.cpus_per_worker": 1.0})
    monkeypatch.setattr(r, "cluster_nodes", lambda: [{"CPU": 2.0}])
    assert max_concurrent(cfg) == 1  # never fewer than one trial
    monkeypatch.setattr(r, "cluster_nodes", lambda: [{"CPU": 7.0}])
    assert max_concurrent(cfg) == 3  # (7 - 1) // (2 x 1)
    monkeypatch.setattr(r, "cluster_nodes", lambda: [HEAD, {"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}])
    assert max_concurrent(cfg) == 3  # Ray Data on the 1-CPU node, a trial per 2 CPUs left
    assert max_concurrent(cfg.with_overrides({"tune.max_concurrent_trials": 5})) == 5


def test_the_cluster_is_its_live_nodes_totals(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": HEAD},
                                               {"Alive": False, "Resources": {"CPU": 8.0}},
                                               {"Alive": True, "Resources": {"CPU": 2.0}}])
    assert r.cluster_nodes() == [HEAD, {"CPU": 2.0}]


# -- the wait ----------------------------------------------------------------------------------------


class FakeCluster:
    """Snapshots in turn (the last one stays), a clock that the wait's sleeps move, the requests."""

    def __init__(self, *snapshots, ask_error: str | None = None):
        self.snapshots, self.now, self.asked, self.ask_error = list(snapshots), 0.0, [], ask_error

    def nodes(self):
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]

    def ask(self, bundles):
        self.asked.append(bundles)
        return self.ask_error

    def sleep(self, s):
        assert 0 <= s <= r.POLL_S
        self.now += s

    def wait(self, cfg, lines):
        r.wait_for_resources(cfg, r.training_needs(cfg), "dpo", lines.append, cluster=self, sleep=self.sleep,
                             clock=lambda: self.now)


def test_a_cluster_that_has_the_resources_is_neither_asked_nor_waited_for():
    c, lines = FakeCluster([HEAD, {"CPU": 4.0}]), []
    c.wait(CPU, lines)
    assert (lines, c.asked, c.now) == ([], [], 0.0)


def test_a_late_worker_node_is_waited_for_with_one_line_and_the_request_withdrawn():
    c, lines = FakeCluster([HEAD], [HEAD], [HEAD], [HEAD, {"CPU": 2.0}]), []
    c.wait(CPU, lines)
    assert lines == ["[dpo] waiting up to 600 s for the cluster to have 2 x {CPU: 0.5} for the training workers "
                     "+ 1 CPU for Ray Data (it has 1 node: {CPU: 0}); asked the autoscaler"]
    assert c.asked == [[{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 1.0}], []]  # asked, then withdrawn
    assert c.now == 3 * r.POLL_S


def test_the_wait_gives_up_after_the_timeout_with_one_line_that_exits_2():
    cfg = GPU.with_overrides({"scaling.resources_timeout_s": 12})
    c, lines = FakeCluster([HEAD, {"CPU": 8.0, "GPU": 1.0}]), []
    with pytest.raises(ResourceError) as e:
        c.wait(cfg, lines)
    assert str(e.value) == (
        "dpo: after 12 s the cluster still lacks 2 x {CPU: 4, GPU: 1} for the training workers + 2 CPUs for Ray Data, "
        "each bundle on one node (it has 2 nodes: {CPU: 0, GPU: 0}, {CPU: 8, GPU: 1}); add nodes that hold them (or "
        "let the autoscaler: its max workers, node types), lower scaling.num_workers or the CPUs/GPUs per worker, or "
        "raise scaling.resources_timeout_s")
    assert "\n" not in str(e.value) and len(lines) == 1
    assert c.now == 12 and c.asked[-1] == []  # it slept to the deadline, not past it, and withdrew its request
    assert ResourceError in SETUP_ERRORS


def test_the_cli_exits_2_on_a_resource_error():
    from raydpo.cli import guarded

    def stage():
        raise ResourceError("dpo: after 1 s the cluster still lacks ...")

    assert guarded(stage) == 2


def test_the_wait_goes_on_when_the_autoscaler_cannot_be_asked_and_withdraws_nothing():
    c, lines = FakeCluster([HEAD], [HEAD, {"CPU": 2.0}], ask_error="RuntimeError: Ray is not initialized yet"), []
    c.wait(CPU, lines)
    assert lines[0].endswith("; could not ask the autoscaler (RuntimeError: Ray is not initialized yet)")
    assert len(c.asked) == 1


def test_asking_the_autoscaler_without_ray_says_why_instead_of_raising():
    assert r.ask_autoscaler([{"CPU": 1.0}]) == "RuntimeError: Ray is not initialized yet"


def test_the_timeout_is_a_positive_setting_that_a_resume_may_change():
    assert Config().scaling.resources_timeout_s == 600
    with pytest.raises(ConfigError) as e:
        load_config(None, ["scaling.resources_timeout_s=0"])
    assert "scaling.resources_timeout_s" in str(e.value)
    assert resume_fingerprint(Config().with_overrides({"scaling.resources_timeout_s": 60})) == resume_fingerprint(Config())

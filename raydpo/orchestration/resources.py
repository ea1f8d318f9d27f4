"""What each step asks of the cluster, the wait for it on a cold or late cluster, and the pools
sized from what is there once the wait is over.

A step's needs are `Need`s: resource bundles, each of which must fit on one node, since Ray puts
a placement-group bundle, a task or an actor on a single node. Checking the cluster's totals is
not enough. Two 1-GPU nodes hold 2 GPUs, but not a worker that asks for 2: a totals check passes,
and Train's placement group then waits forever (Train V2 keeps retrying a worker group that does
not start). `fits` packs all of a step's bundles onto the nodes' total resources. Exact packing is
NP-hard, so it is greedy, like the autoscaler's own packing (``get_bin_pack_residual`` in
ray/autoscaler/_private/resource_demand_scheduler.py): biggest bundles first, scarcest resource
(GPU) first, each on the node it leaves with the least room. For the shapes the steps ask for
(identical worker bundles, whole Ray Data CPUs) it misses a packing only on odd mixes of node
sizes, and then it waits and names the nodes it saw. It counts capacity, not free resources: a
Tune trial or another job using the nodes does not make a step wait, and the autoscaler adds
capacity, not free room.

`wait_for_resources` asks the autoscaler only when the cluster lacks a step's needs
(``ray.autoscaler.sdk.request_resources``). On a cluster with no autoscaler the request is a
write to the GCS that nobody reads (ray/autoscaler/_private/commands.py: a KV put for autoscaler
v1, a GCS resource constraint for v2), so it does no harm. The wait prints one line and polls
until the needs fit. After ``scaling.resources_timeout_s`` it raises `ResourceError`, whose line
the CLI prints before exiting 2.

The request is withdrawn when the wait ends, whether the needs fit or the wait timed out,
because Ray does not give us a request held for the length of a stage. There is one request
per cluster, and the last call replaces it (commands.py; "Future requests ... overwrite the
previous requests" in ray/autoscaler/v2/sdk.py). Ray Data writes the same request during every
execution, and its own requester withdraws with ``bundles=[]`` when its requests expire
(ray/data/_internal/execution/autoscaling_requester.py), so a request held through a stage
would be overwritten by the stage's first read. A request left standing also keeps its nodes
from idling out (ray/autoscaler/_private/autoscaler.py,
``_get_nodes_needed_for_request_resources``), so a driver that died holding one would keep GPU
nodes up. After the wait, the step's own tasks, actors and placement groups are the autoscaler's
demand. If a node goes idle and is removed in between, Train's pending placement group asks for
it again (Train V2 retries ``WorkerGroupStartupTimeoutError`` without limit).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from raydpo.config import Config, ScalingConfig
from raydpo.orchestration.errors import ResourceError
from raydpo.tracking.terminal import echo

Bundle = dict[str, float]
POLL_S = 5.0  # between looks at the cluster while waiting; a node's join is seen within this
EPS = 1e-9  # resource amounts are floats (0.5 CPU per worker): 2.9999999 CPUs hold 3 x 1
MAX_POOL = 4096  # a bound on the pool counts when a bundle reserves nothing countable


@dataclass(frozen=True)
class Need:
    """Bundles one part of a step reserves together (each on one node), and what they are for."""

    what: str  # "the training workers"
    bundles: tuple[Bundle, ...]
    text: str = ""  # how the bundles read, when not as `format_bundles` writes them

    def __str__(self) -> str:
        return f"{self.text or format_bundles(self.bundles)} for {self.what}"


# -- what each step needs --------------------------------------------------------------------------


def workers_need(s: ScalingConfig) -> Need:
    """One TorchTrainer's workers: ``num_workers`` bundles of `ScalingConfig.worker_resources`.
    Train V2's controller and its sync actor take ``num_cpus=0`` on the driver's node
    (ray/train/v2/api/data_parallel_trainer.py), so they reserve nothing."""
    return Need("the training workers", (s.worker_resources(),) * s.num_workers)


def data_need(s: ScalingConfig) -> Need:
    """Ray Data's ``scaling.data_cpus``, as whole CPUs (its file reads plan tasks of one whole
    CPU), and any fraction on top as one more bundle."""
    whole, part = divmod(s.data_cpus, 1.0)
    bundles = ({"CPU": 1.0},) * int(whole) + (({"CPU": part},) if part > EPS else ())
    return Need("Ray Data", bundles, text=f"{s.data_cpus:g} CPU{'' if s.data_cpus == 1 else 's'}")


def replica_need(s: ScalingConfig) -> Need:
    """One reference-model replica (`ScalingConfig.replica_resources`)."""
    return Need("a reference replica", (s.replica_resources(),))


def merge_resources(s: ScalingConfig) -> Bundle:
    """The SFT merge task's reservation: a training worker's, with at least one whole CPU. It loads
    the whole model, so it belongs on a node a worker can use and never on a ``num-cpus: 0``
    head. Zero CPUs would put it there, and that node often lacks the memory for a 7B model."""
    return {**s.worker_resources(), "CPU": max(1.0, s.cpus_per_worker)}


def training_needs(cfg: Config) -> list[Need]:
    """What a training stage (or one Tune trial) holds while it trains: its workers, plus Ray
    Data's CPUs beside them."""
    return [workers_need(cfg.scaling), data_need(cfg.scaling)]


def merge_needs(cfg: Config) -> list[Need]:
    """What the SFT merge (`raydpo.orchestration.base.merged_sft_base`) needs to run."""
    return [Need("the SFT merge", (merge_resources(cfg.scaling),))]


def reference_needs(cfg: Config) -> list[Need]:
    """What the reference pass needs to start: one replica, plus Ray Data's CPUs."""
    return [replica_need(cfg.scaling), data_need(cfg.scaling)]


def merge_task_options(cfg: Config) -> dict[str, float]:
    """``ray.remote`` options for the merge task (`merge_resources`)."""
    b = merge_resources(cfg.scaling)
    return {"num_cpus": b["CPU"], "num_gpus": b.get("GPU", 0.0)}


# -- packing bundles onto nodes --------------------------------------------------------------


def _order(bundles: Sequence[Bundle]) -> list[str]:
    """The resource names in ``bundles``, the scarce ones (GPU, custom) before CPU."""
    names = sorted({k for b in bundles for k, v in b.items() if v > 0})
    return [k for k in names if k != "CPU"] + (["CPU"] if "CPU" in names else [])


def place(room: list[Bundle], bundles: Sequence[Bundle]) -> bool:
    """Put ``bundles`` into the nodes' remaining ``room`` (changed in place): biggest first,
    each on the node it leaves with the least room. False as soon as one fits no node; ``room``
    then holds a partial packing."""
    order = _order(bundles)

    def key(b: Bundle) -> tuple[float, ...]:
        return tuple(b.get(k, 0.0) for k in order)

    for b in sorted(bundles, key=key, reverse=True):
        held = [r for r in room if all(r.get(k, 0.0) + EPS >= v for k, v in b.items() if v > 0)]
        if not held:
            return False
        best = min(held, key=lambda r: tuple(r.get(k, 0.0) - b.get(k, 0.0) for k in order))
        for k, v in b.items():
            if v > 0:
                best[k] = best.get(k, 0.0) - v
    return True


def bundles_of(needs: Sequence[Need]) -> list[Bundle]:
    """Every bundle of ``needs``, without their zero amounts (nothing to ask for)."""
    return [{k: v for k, v in b.items() if v > 0} for n in needs for b in n.bundles]


def fits(nodes: Sequence[Bundle], needs: Sequence[Need]) -> bool:
    """Whether every bundle of ``needs`` fits at once on ``nodes`` (each node's total resources)."""
    return place([dict(n) for n in nodes], bundles_of(needs))


def count_fits(nodes: Sequence[Bundle], fixed: Sequence[Need], unit: Need) -> int:
    """How many ``unit``s fit on ``nodes`` beside ``fixed`` (placed first); 0 when none does."""
    room = [dict(n) for n in nodes]
    if not place(room, bundles_of(fixed)):
        return 0
    count, one = 0, bundles_of([unit])
    while count < MAX_POOL and place(room, one):
        count += 1
    return count


# -- pools sized from the cluster as it is -----------------------------------------------------


def reference_pool_size(cfg: Config, nodes: Sequence[Bundle] | None = None) -> int:
    """How many reference replicas run at once: as many as fit beside Ray Data's CPUs (every GPU,
    or every CPU Ray Data does not keep), at least one. ``nodes``: `cluster_nodes` by default."""
    s = cfg.scaling
    return max(1, count_fits(cluster_nodes() if nodes is None else nodes, [data_need(s)], replica_need(s)))


def trial_slots(cfg: Config, nodes: Sequence[Bundle] | None = None) -> int:
    """How many Tune trials (a TorchTrainer's workers each) train at once beside Ray Data's CPUs,
    at least one. ``nodes``: `cluster_nodes` by default."""
    s = cfg.scaling
    return max(1, count_fits(cluster_nodes() if nodes is None else nodes, [data_need(s)], workers_need(s)))


# -- the cluster, and the wait -----------------------------------------------------------------


def cluster_nodes() -> list[Bundle]:
    """Each live node's total resources (``ray.nodes()``)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def ask_autoscaler(bundles: list[Bundle]) -> str | None:
    """``request_resources(bundles=...)`` (``[]`` withdraws the request); None when asked, else
    why the request could not be made (it is only a hint, so the wait goes on without it)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # noqa: BLE001 - e.g. a Ray Client connection, which has no GCS client here
        first = str(e).strip().splitlines()
        return f"{e.__class__.__name__}: {first[0]}" if first else e.__class__.__name__
    return None


class Cluster(Protocol):
    """What the wait reads and asks: `RayCluster` in a stage, a fake in the unit tests."""

    def nodes(self) -> list[Bundle]: ...

    def ask(self, bundles: list[Bundle]) -> str | None: ...


class RayCluster:
    """The connected Ray cluster (`cluster_nodes`, `ask_autoscaler`)."""

    def nodes(self) -> list[Bundle]:
        return cluster_nodes()

    def ask(self, bundles: list[Bundle]) -> str | None:
        return ask_autoscaler(bundles)


def _shown(names: Iterable[str]) -> list[str]:
    """Resource names as the lines show them: CPU, GPU, then the rest by name."""
    return sorted(names, key=lambda k: (k != "CPU", k != "GPU", k))


def format_bundle(b: Bundle, names: Iterable[str] | None = None) -> str:
    """``{CPU: 0.5, GPU: 1}``: ``names`` (by default those ``b`` holds more than 0 of)."""
    names = _shown(names if names is not None else (k for k, v in b.items() if v > 0))
    return "{" + ", ".join(f"{k}: {b.get(k, 0.0):g}" for k in names) + "}"


def format_bundles(bundles: Sequence[Bundle]) -> str:
    """Equal bundles counted: ``2 x {CPU: 0.5}``, ``{CPU: 1} + 2 x {GPU: 1}``."""
    counts: dict[str, int] = {}
    for text in map(format_bundle, bundles):
        counts[text] = counts.get(text, 0) + 1
    return " + ".join(f"{n} x {text}" if n > 1 else text for text, n in counts.items())


def format_cluster(nodes: Sequence[Bundle], needs: Sequence[Need]) -> str:
    """``1 node: {CPU: 0}`` or ``3 nodes: 2 x {CPU: 8, GPU: 1}, {CPU: 0}``. Only the resources
    the needs name are shown (not memory, node IPs, ...)."""
    if not nodes:
        return "no live node"
    names = set(_order(bundles_of(needs))) or {"CPU"}
    counts: dict[str, int] = {}
    for n in nodes:
        text = format_bundle(n, names)
        counts[text] = counts.get(text, 0) + 1
    shapes = ", ".join(f"{c} x {t}" if c > 1 else t for t, c in counts.items())
    return f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}: {shapes}"


def waiting_line(who: str, needs: Sequence[Need], nodes: Sequence[Bundle], timeout_s: float,
                 ask_failed: str | None) -> str:
    """The one line a wait prints when it starts."""
    asked = "asked the autoscaler" if ask_failed is None else f"could not ask the autoscaler ({ask_failed})"
    return (f"[{who}] waiting up to {timeout_s:g} s for the cluster to have {' + '.join(map(str, needs))} "
            f"(it has {format_cluster(nodes, needs)}); {asked}")


def timeout_line(who: str, needs: Sequence[Need], nodes: Sequence[Bundle], timeout_s: float) -> str:
    """The `ResourceError`'s line: what was needed, what the cluster has, the ways out."""
    return (f"{who}: after {timeout_s:g} s the cluster still lacks {' + '.join(map(str, needs))}, each bundle "
            f"on one node (it has {format_cluster(nodes, needs)}); add nodes that hold them (or let the "
            "autoscaler: its max workers, node types), lower scaling.num_workers or the CPUs/GPUs per worker, "
            "or raise scaling.resources_timeout_s")


def wait_for_resources(cfg: Config, needs: Sequence[Need], who: str, progress: Callable[[str], None] = echo, *,
                       cluster: Cluster | None = None, sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic) -> None:
    """Return once ``needs`` fit the cluster (at once if they already do: no line, no request).
    Otherwise ask the autoscaler for them, print one line (``who``: the step, e.g. ``dpo``), look
    again every `POLL_S` seconds, and raise `ResourceError` after ``scaling.resources_timeout_s``.
    The request is withdrawn when the wait ends (the module's docstring says why)."""
    cluster = cluster if cluster is not None else RayCluster()
    nodes = cluster.nodes()
    if fits(nodes, needs):
        return
    timeout_s = cfg.scaling.resources_timeout_s
    deadline = clock() + timeout_s
    ask_failed = cluster.ask(bundles_of(needs))
    progress(waiting_line(who, needs, nodes, timeout_s, ask_failed))
    try:
        while True:
            sleep(max(0.0, min(POLL_S, deadline - clock())))
            nodes = cluster.nodes()
            if fits(nodes, needs):
                return
            if clock() >= deadline:
                raise ResourceError(timeout_line(who, needs, nodes, timeout_s))
    finally:
        if ask_failed is None:
            cluster.ask([])  # a failed withdrawal is only a hint left standing; it must not hide the outcome

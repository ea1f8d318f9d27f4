"""Nodes that share no disk: what the workers read from a local path must be the same folder on
their nodes, checked before training, each problem one line.

A local ``run.storage_path`` (checkpoints, the run record, the tiny model, the merged SFT base,
the reference cache), a local ``model.name_or_path`` folder and a local MLflow store (a sqlite
file or a file store: rank 0 logs into it from its own node) are read by processes on other
nodes. The driver writes a marker into each (as Ray Train does for its storage) and a task on
every other node that can run a worker looks for it: a missing marker means that node sees
another folder, or none, at that path. A store another node cannot reach is refused, not
routed through the driver: a tracking server (``http://``) or a folder every node mounts works.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from raydpo import storage
from raydpo.config import BUILTIN_MODEL, Config
from raydpo.orchestration.errors import StorageError, TrackingError

# set by Ray's job supervisor in the environment of a job's entrypoint (`ray job submit`, a RayJob)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PROBE_TIMEOUT_S = 120  # a node's task starts a worker process (seconds on a busy node)
WAYS_OUT = "put it on a filesystem every node mounts (NFS, a shared volume) or use a cloud URI (s3://, gs://, abfs://)"


def check_job_storage(cfg: Config) -> None:
    """Under a Ray job the cwd is the job's package folder, deleted with it: a relative
    ``run.storage_path`` there would lose the checkpoints (and a resubmission would not find them)."""
    from raydpo.orchestration.submit import job_storage_problem

    problem = job_storage_problem(cfg.run.storage_path) if RAY_JOB_ENV in os.environ else None
    if problem:
        raise StorageError(problem)


def shared_paths(cfg: Config, tracking_uri: str) -> dict[str, str]:
    """``{what: local folder}`` the workers read on their own nodes (configs absolute already)."""
    from raydpo.tracking.store import local_store_folder

    paths: dict[str, str] = {}
    if not storage.is_remote(cfg.run.storage_path):
        paths["run.storage_path"] = storage.root(cfg.run.storage_path)
    name = cfg.model.name_or_path
    if name != BUILTIN_MODEL and Path(name).is_dir():
        paths["model.name_or_path"] = str(Path(name).resolve())
    store = local_store_folder(tracking_uri)
    if store is not None:
        paths[f"the MLflow store {tracking_uri}"] = str(store)
    return paths


def worker_nodes() -> list[dict]:
    """The alive nodes other than this process's that can run a worker or a Ray Data task."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
            and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


def _missing(expected: list[tuple[str, int]]) -> list[str]:
    """Of ``(file, size)``, the files this node does not see, or sees with another size."""
    return [f for f, size in expected if not os.path.isfile(f) or os.path.getsize(f) != size]


def _probe_files(paths: dict[str, str], token: str) -> tuple[dict[str, str], list[str]]:
    """``({what: file}, markers written)``: a marker written into each folder, except a model
    folder (often a read-only mount), whose ``config.json`` is looked for instead."""
    files, written = {}, []
    for what, folder in paths.items():
        if what == "model.name_or_path":
            files[what] = os.path.join(folder, "config.json")
            continue
        files[what] = os.path.join(folder, storage.NODE_CHECK.format(token=token))
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(files[what]).write_text("raydpo: the same folder on every node?\n")
        written.append(files[what])
    return files, written


def _ask_nodes(nodes: list[dict], expected: list[tuple[str, int]]) -> dict[str, list[str]]:
    """``{node: files it does not see}``, from a ``num_cpus=0`` task pinned to each node. A node
    gone meanwhile runs no worker (skipped); one that does not answer is a `StorageError`."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_missing)
    refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(expected) for n in nodes}
    missing: dict[str, list[str]] = {}
    for node, ref in refs.items():
        try:
            missing[node] = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            raise StorageError(f"node {node} did not answer the shared-storage check within {PROBE_TIMEOUT_S} s "
                               "(is it still setting up its runtime environment?); run the command again") from None
        except RayError:  # the node left the cluster: no worker runs there
            continue
    return missing


def check_nodes_share(cfg: Config, tracking_uri: str) -> None:
    """`StorageError` / `TrackingError` (one line, naming the node and the ways out) when a node
    that can run a worker does not see the driver's folder at one of `shared_paths`."""
    paths = shared_paths(cfg, tracking_uri)
    nodes = worker_nodes() if paths else []
    if not nodes:
        return
    written: list[str] = []
    try:
        files, written = _probe_files(paths, uuid.uuid4().hex[:12])
        missing = _ask_nodes(nodes, [(f, os.path.getsize(f)) for f in files.values() if os.path.isfile(f)])
    finally:
        for m in written:
            Path(m).unlink(missing_ok=True)
    for what, probe in files.items():
        blind = [node for node, gone in missing.items() if probe in gone]
        if not blind:
            continue
        where = f"{what} {paths[what]}" if what in ("run.storage_path", "model.name_or_path") else what
        if what.startswith("the MLflow store"):
            raise TrackingError(f"{where} is a local file that node {blind[0]} does not see, and rank 0 may log from "
                                "there: use a tracking server (http://...) or a folder every node mounts")
        raise StorageError(f"{where} is a local folder that node {blind[0]} does not see (workers run there): "
                           f"{WAYS_OUT}")

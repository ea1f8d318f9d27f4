"""MLflow: the only raydpo module importing mlflow (lazily, so importing this is cheap).

Who does what:

* the driver resolves the store (`resolve_tracking_uri`), creates the experiment
  (`setup_experiment`) and the run (`start_run`), logs the flattened config (`log_params`);
  creating the sqlite database and experiment here, once, matters: concurrent creators race;
* rank 0 of the workers logs metrics into that run *by id* (`make_logger` -> `RunLogger`,
  plain ``MlflowClient`` calls, no fluent active-run globals); other ranks get a `NullLogger`;
* the driver reads the history back (`fetch_history`), logs the adapter, config and reward
  curves (`log_final_artifacts`), optionally registers the adapter (`register_model`) and ends
  the run (`end_run`).

Metric names are shared constants (`REWARD_KEYS` with ``train/`` and ``eval/`` prefixes), used
by the loops, the plots, tune and ``dashboards/``.

Artifacts of a sqlite store live next to the database, in ``<db dir>/mlartifacts/<experiment>/
<run id>/artifacts``. MLflow's own default for a sqlite store is ``./mlruns`` relative to the
*current directory of whichever process creates the experiment*, which scatters artifacts
(Ray workers do not share the driver's cwd). An http store keeps MLflow's choice (the server's
``--default-artifact-root`` / ``--artifacts-destination``).

MLflow 3.17 behaviours this module works around (measured against the pinned version):

* ``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI`` and its restoring helper
  unsets it, so nothing here touches the fluent API's URI except `find_runs` (see there);
* ``mlflow.register_model("runs:/<id>/adapter")`` fails for a plain artifact folder ("Unable to
  find a logged_model") *after* creating the registered model; `register_model` uses the client;
* creating a fresh sqlite database runs every migration (seconds), and concurrent creators race.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

REWARD_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
TOKENS_PER_S = "train/tokens_per_s"
LR = "train/lr"
STEP_TIME = "train/step_time_s"
PLOT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

SFT_RUN_TAG = "raydpo.sft_run_id"
STAGE_TAG = "raydpo.stage"
PARENT_TAG = "mlflow.parentRunId"
ADAPTER_TAG = "raydpo.adapter_path"
ARTIFACTS_DIR = "mlartifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# mirrors mlflow.utils.validation (3.17), kept here so this module imports nothing heavy. The
# param value limit is 6000 characters since MLflow 2.x (the 500 of older docs no longer holds).
MAX_PARAM_LEN = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


SPLITS = ("train", "eval")


def prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    """``{"loss": 0.6}, "eval"`` -> ``{"eval/loss": 0.6}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {f"{split}/{k}": v for k, v in metrics.items()}


# -- where the store is ------------------------------------------------------------------

def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute, resolved against the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def _absolute(uri: str) -> str:
    # A relative sqlite path names a different file in every process whose cwd differs (Ray
    # workers): spell the same database absolutely so the driver and workers share it.
    p = _sqlite_path(uri)
    if p is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"sqlite:///{p}" + (f"?{query}" if query else "")


def resolve_tracking_uri(cfg_tracking: Any, cwd: str | None = None) -> str:
    """The MLflow store to use: ``tracking.tracking_uri`` from the config if set, else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    An explicit config value wins over the environment because it was written for this job; the
    environment wins over the default so a shared server set for a shell is honoured. Relative
    sqlite paths are made absolute (same database, but valid from any worker's cwd).
    """
    uri = getattr(cfg_tracking, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute(uri)
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite store's artifacts go (next to the database); None for other stores."""
    p = _sqlite_path(uri)
    return None if p is None else p.parent / ARTIFACTS_DIR


def ui_command(uri: str) -> str:
    """How to look at the store: ``mlflow ui ...`` for a local store, the URL itself for a
    tracking server."""
    if uri.startswith(("http://", "https://")):
        return uri
    cmd = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    root = artifact_root(uri)
    if root is not None:  # for experiments created from the UI; ours carry their own location
        cmd += f" --default-artifact-root {shlex.quote(str(root))}"
    return cmd


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- experiments and runs (driver) --------------------------------------------------------

def setup_experiment(uri: str, experiment_name: str, artifact_location: str | None = None) -> str:
    """Create the store (a sqlite file: database and migrations) and the experiment once, and
    return the experiment id; idempotent. Call it on the driver before any worker logs.

    ``artifact_location`` (a path or URI) applies when the experiment is created; an existing
    experiment keeps its own. Left None, a sqlite store's experiment keeps artifacts in ``<db
    dir>/mlartifacts/<experiment>`` and other stores use MLflow's default. A deleted experiment
    of that name is restored."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = artifact_location
    if location is not None and "://" not in location and not location.startswith("file:"):
        location = Path(location).expanduser().resolve().as_uri()  # same folder from any cwd
    root = artifact_root(uri)
    if location is None and root is not None:
        safe = re.sub(r"[^\w.\-]+", "_", experiment_name).strip("._") or "experiment"
        location = (root / safe).as_uri()
    try:
        return client.create_experiment(experiment_name, artifact_location=location)
    except MlflowException:
        exp = client.get_experiment_by_name(experiment_name)  # created meanwhile by another driver
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment_id: str, run_name: str, *, parent_run_id: str | None = None,
              sft_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create a run and return its id. It stays RUNNING: workers log into it by id and the
    driver ends it with `end_run`. ``parent_run_id`` nests it (MLflow's ``mlflow.parentRunId``,
    drawn as a tree in the UI); ``sft_run_id`` links a DPO run to the SFT run it started from
    (plain tag ``raydpo.sft_run_id``: the two are siblings, not nested)."""
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    if sft_run_id:
        all_tags[SFT_RUN_TAG] = sft_run_id
    run = _client(uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    _client(uri).set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    _log_tags(_client(uri), run_id, [RunTag(k, str(v)) for k, v in tags.items()])


def _log_tags(client, run_id: str, tags: list) -> None:
    for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i:i + MAX_PARAMS_PER_BATCH])


def run_for_adapter(uri: str, experiment_name: str, adapter_path: str) -> str | None:
    """The run that produced an adapter folder (lineage: DPO/tune back to SFT)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return None
    path = str(Path(adapter_path).resolve()).replace("'", "")
    hits = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ADAPTER_TAG}` = '{path}'")
    return hits[0].info.run_id if hits else None


def log_params(uri: str, run_id: str, flat: dict[str, Any]) -> None:
    """Log a flattened config (``{"dpo.beta": 0.1, ...}``) as params: values stringified and cut
    to MLflow's length limit, sent in batches of MLflow's 100-params maximum."""
    from mlflow.entities import Param

    params = [Param(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
    client = _client(uri)
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])


# -- worker-side loggers ------------------------------------------------------------------

class RunLogger:
    """Logs into an existing run by id (plain client calls, no active-run globals); safe inside
    Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_METRICS_PER_BATCH])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        _log_tags(self.client, self.run_id, [RunTag(k, str(v)) for k, v in tags.items()])


class NullLogger:
    """What ranks other than 0 get: the same methods, no MLflow import, no traffic."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def make_logger(uri: str | None, run_id: str | None, rank: int) -> RunLogger | NullLogger:
    """A `RunLogger` for rank 0 when a store and run are given, else a `NullLogger`."""
    if rank == 0 and uri and run_id:
        return RunLogger(uri, run_id)
    return NullLogger()


# -- reading back, plots, final artifacts (driver) ----------------------------------------

def fetch_history(uri: str, run_id: str, keys: list[str] | None = None) -> list[dict[str, float]]:
    """A run's metric histories merged per step, sorted by step:
    ``[{"step": 10, "train/loss": .., "eval/loss": ..}, ...]``. ``keys=None``: every metric of
    the run. A value logged twice at one step: the latest wins."""
    client = _client(uri)
    if keys is None:
        keys = sorted(client.get_run(run_id).data.metrics)
    by_step: dict[int, dict[str, float]] = {}
    for k in keys:
        for m in sorted(client.get_metric_history(run_id, k), key=lambda m: (m.step, m.timestamp)):
            by_step.setdefault(int(m.step), {"step": int(m.step)})[k] = m.value
    return [by_step[s] for s in sorted(by_step)]


def plot_reward_curves(history: list[dict[str, float]], path: str) -> str:
    """PNG of loss and DPO reward curves (train line, eval markers) over steps, one panel per
    quantity that was logged: an SFT run (loss only) gets a single loss panel, an empty history
    an empty loss panel -- always a valid picture."""
    # A bare Figure on the Agg canvas, no pyplot: no process-wide backend switch (a notebook
    # calling this keeps its inline backend) and no global figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logged = {k for h in history for k in h}
    keys = [k for k in PLOT_KEYS if f"train/{k}" in logged or f"eval/{k}" in logged] or ["loss"]
    fig = Figure(figsize=(4 * len(keys), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("eval", "o--")):
            pts = [(h["step"], h[f"{split}/{key}"]) for h in history if f"{split}/{key}" in h]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split)
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    return str(path)


def log_final_artifacts(uri: str, run_id: str, *, adapter_dir: str | None = None, config_yaml: str | None = None,
                        history: list[dict[str, float]] | None = None) -> None:
    """Log the adapter folder's files under ``adapter/`` (loadable as is with
    ``PeftModel.from_pretrained``), ``config.yaml`` and ``reward_curves.png`` (from history)."""
    client = _client(uri)
    if adapter_dir:
        if not Path(adapter_dir).is_dir():
            raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
        client.log_artifacts(run_id, str(adapter_dir), "adapter")
    with tempfile.TemporaryDirectory() as tmp:
        if config_yaml is not None:
            p = Path(tmp) / "config.yaml"
            p.write_text(config_yaml)
            client.log_artifact(run_id, str(p))
        if history:
            client.log_artifact(run_id, plot_reward_curves(history, str(Path(tmp) / "reward_curves.png")))


def register_model(uri: str, run_id: str, artifact_path: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Register a run's artifact folder (e.g. ``adapter``) as the next version of model
    ``name`` in the Model Registry of the same store; returns the version ("1", "2", ...).

    ``mlflow.register_model("runs:/<id>/adapter")`` only takes MLflow-format models in 3.17 (and
    leaves the registered model behind when it refuses), so the version is created from the
    folder's artifact URI; ``mlflow.artifacts.download_artifacts`` fetches it back."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
    mv = client.create_model_version(name, source=source, run_id=run_id,
                                     tags={k: str(v) for k, v in (tags or {}).items()})
    return str(mv.version)


def find_runs(uri: str, experiment_name: str):
    """All runs of an experiment as a pandas DataFrame (``mlflow.search_runs`` columns:
    ``run_id``, ``status``, ``metrics.eval/rewards/accuracies``, ``params.dpo.beta``,
    ``tags.mlflow.parentRunId``, ...); empty when the experiment does not exist."""
    import mlflow
    import pandas as pd

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return pd.DataFrame()
    # mlflow.search_runs only reads the process-wide tracking URI. mlflow.set_tracking_uri
    # would also export $MLFLOW_TRACKING_URI (leaking into resolve_tracking_uri, subprocesses and
    # Ray workers) and its own restore helper unsets a user's env var: swap the global alone.
    from mlflow.tracking._tracking_service import utils as service

    with _FLUENT_URI_LOCK:  # two driver threads must not see each other's store
        saved = service._tracking_uri
        service._tracking_uri = uri
        try:
            return mlflow.search_runs(experiment_ids=[exp.experiment_id])
        finally:
            service._tracking_uri = saved


_FLUENT_URI_LOCK = threading.Lock()

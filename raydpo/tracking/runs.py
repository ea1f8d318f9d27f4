"""Experiments and runs in an MLflow store, through one ``MlflowClient`` per call (`_client`).

The driver creates the experiment (`setup_experiment`) and the run (`start_run`), logs the
flattened config (`log_params`), reads the history back (`fetch_history`), logs the adapter,
config and reward curves (`log_final_artifacts`), optionally registers the adapter
(`register_model`) and ends the run (`end_run`). Creating the sqlite database and experiment
there, once, matters: a fresh database runs every migration (seconds) and concurrent creators
race. Rank 0 of the workers appends the eval generations to the run's table (`log_generations`,
``eval_generations.json``), read back by `load_generations` for ``raydpo report``; `find_runs`
is what ``raydpo tune`` and ``raydpo report`` read.

``mlflow.register_model("runs:/<id>/adapter")`` fails for a plain artifact folder in MLflow 3.17
("Unable to find a logged_model") *after* creating the registered model; `register_model` uses
the client.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from raydpo import storage
from raydpo.tracking.store import _client, artifact_root

SFT_RUN_TAG = "raydpo.sft_run_id"
STAGE_TAG = "raydpo.stage"
PARENT_TAG = "mlflow.parentRunId"
ADAPTER_TAG = "raydpo.adapter_path"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# mirrors mlflow.utils.validation (3.17), kept here so this module imports nothing heavy. The
# param value limit is 6000 characters since MLflow 2.x (the 500 of older docs no longer holds).
MAX_PARAM_LEN = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


# eval generations (raydpo.train.generate): one MLflow table per run, appended at each evaluation
GENERATIONS_TABLE = "eval_generations.json"
GENERATION_COLUMNS = ("step", "prompt_index", "prompt", "policy", "reference", "chosen")

SEARCH_PAGE = 1000  # runs per search_runs page (MLflow's own default maximum)


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


def run_exists(uri: str, run_id: str) -> bool:
    """Whether the store holds a (not deleted) run with this id."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except MlflowException:
        return False


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again: a resumed stage continues the run it started (MLflow keeps its
    params and metrics; the driver ends it again when the stage finishes)."""
    _client(uri).update_run(run_id, status="RUNNING")


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
    path = storage.root(adapter_path).replace("'", "")  # as the stage tagged it: absolute, or the URI
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


# -- eval generations -----------------------------------------------------------------------

PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by mlflow per download (3.17)


class _no_download_bars:
    """Without a progress bar per table download (one per evaluation, one per reported run),
    unless the user set MLflow's variable."""

    def __enter__(self):
        self.unset = PROGRESS_BAR_ENV not in os.environ
        if self.unset:
            os.environ[PROGRESS_BAR_ENV] = "false"

    def __exit__(self, *exc):
        if self.unset:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        return False


def _log_generations(client, run_id: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # MlflowClient.log_table (3.17) appends to a table the run already holds (download, concat,
    # upload): one artifact holds every evaluation, told apart by its `step` column
    data = {c: [r.get(c) for r in rows] for c in GENERATION_COLUMNS}
    with _no_download_bars():
        client.log_table(run_id, data=data, artifact_file=GENERATIONS_TABLE)


def log_generations(uri: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Append eval generations (dicts with the `GENERATION_COLUMNS`) to the run's table
    `GENERATIONS_TABLE`; what the UI's artifact view and ``mlflow.load_table`` read."""
    _log_generations(_client(uri), run_id, rows)


def load_generations(uri: str, run_id: str) -> list[dict[str, Any]]:
    """Every row of the run's generations table, in logging order; ``[]`` when it has none."""
    import json

    client = _client(uri)
    if GENERATIONS_TABLE not in {f.path for f in client.list_artifacts(run_id)}:
        return []
    with tempfile.TemporaryDirectory() as tmp, _no_download_bars():
        path = client.download_artifacts(run_id, GENERATIONS_TABLE, tmp)
        table = json.loads(Path(path).read_text(encoding="utf-8"))  # pandas' orient="split"
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def latest_generations(rows: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, Any]]]:
    """The latest step's rows, by prompt index: ``(step, rows)``, ``(None, [])`` for none. A
    step logged twice (a worker restarted after logging it) keeps its last copy."""
    if not rows:
        return None, []
    step = max(int(r["step"]) for r in rows)
    by_prompt = {int(r.get("prompt_index") or 0): r for r in rows if int(r["step"]) == step}
    return step, [by_prompt[i] for i in sorted(by_prompt)]


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
            from raydpo.tracking.plots import plot_reward_curves

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


def find_runs(uri: str, experiment_name: str) -> list | None:
    """Every run of an experiment, oldest first, as MLflow ``Run`` objects (``.info.run_id``,
    ``.info.status``, ``.data.tags``, ``.data.metrics``, ...), read page by page through the
    public ``MlflowClient`` of this store -- never the fluent API, whose process-wide tracking URI
    another thread or the environment may hold. None when the experiment does not exist or is
    deleted. What ``raydpo tune`` (parents, trials) and ``raydpo report`` read."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    found, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=SEARCH_PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def max_logged_step(uri: str, run_id: str) -> int:
    """The largest step of any metric the run holds (0 if none): what to pass as
    ``BufferedLogger(skip_through_step=...)`` when a resumed job logs into the same run."""
    client = _client(uri)
    best = 0
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            best = max(best, int(m.step))
    return best

"""MLflow: the only raydpo module importing mlflow (lazily, so importing this is cheap).

Who does what:

* the driver resolves the store (`resolve_tracking_uri`), creates the experiment
  (`setup_experiment`) and the run (`start_run`), logs the flattened config (`log_params`);
  creating the sqlite database and experiment here, once, matters: concurrent creators race;
* rank 0 of the workers logs metrics into that run *by id* (`make_logger` -> `RunLogger`,
  plain ``MlflowClient`` calls, no fluent active-run globals); other ranks get a `NullLogger`;
  rank 0 also appends the eval generations to the run's table (`log_generations`,
  ``eval_generations.json``, read back by `load_generations` for ``raydpo report``);
* the driver reads the history back (`fetch_history`), logs the adapter, config and reward
  curves (`log_final_artifacts`), optionally registers the adapter (`register_model`) and ends
  the run (`end_run`).

Metric names are shared constants (`raydpo.metric_names`: ``METRIC_KEYS`` with ``train/`` and
``eval/`` prefixes), used by the loops, the plots, tune and ``dashboards/``.

Artifacts of a sqlite store live next to the database, in ``<db dir>/mlartifacts/<experiment>/
<run id>/artifacts``. MLflow's own default for a sqlite store is ``./mlruns`` relative to the
*current directory of whichever process creates the experiment*, which scatters artifacts
(Ray workers do not share the driver's cwd). An http store keeps MLflow's choice (the server's
``--default-artifact-root`` / ``--artifacts-destination``).

MLflow 3.17 behaviours this module works around (measured against the pinned version):

* ``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI`` and its restoring helper
  unsets it, so nothing here touches the fluent API: every call goes through an ``MlflowClient``
  bound to one store;
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


# the panels of reward_curves.png, in order

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


# eval generations (raydpo.train.generate): one MLflow table per run, appended at each evaluation
GENERATIONS_TABLE = "eval_generations.json"
GENERATION_COLUMNS = ("step", "prompt_index", "prompt", "policy", "reference", "chosen")


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

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        _log_generations(self.client, self.run_id, rows)


class NullLogger:
    """What ranks other than 0 get: the same methods, no MLflow import, no traffic."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        pass


def make_logger(uri: str | None, run_id: str | None, rank: int, *, buffered: bool = False,
                skip_through_step: int | None = None):
    """For rank 0 when a store and run are given: a `RunLogger`, or with ``buffered`` a
    `BufferedLogger` (training never waits on the store; an outage is buffered and flushed, steps
    ``<= skip_through_step`` are not logged again). Otherwise a `NullLogger`."""
    if rank == 0 and uri and run_id:
        if buffered:
            return BufferedLogger(uri, run_id, skip_through_step)
        return RunLogger(uri, run_id)
    return NullLogger()


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


SEARCH_PAGE = 1000  # runs per search_runs page (MLflow's own default maximum)


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


# -- outages: preflight check, buffered worker logging, spill and replay -------------------
#
# A tracking store that goes away (server restarted, network partition, sqlite folder on a
# flaky mount) must neither stop nor kill training. `check_store` is the cheap preflight (bounded
# in time: MLflow's own client retries for minutes); `BufferedLogger` is the rank-0 logger that
# queues metric points with their original timestamps and sends them from a daemon thread,
# buffering through an outage; what is still unsent at `close` is spilled to JSONL, which
# `replay_buffer` sends later without duplicating points already in the run.

HTTP_MAX_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # read by mlflow per request (3.17)
HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"  # idem, seconds (int)
FAIL_FAST_MAX_RETRIES = 0
FAIL_FAST_TIMEOUT_S = 5
REPLAY_COMMAND = "raydpo tracking replay"


def _warn(line: str) -> None:
    from raydpo.tracking.terminal import echo

    echo(line, err=True)


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cause(e: BaseException) -> str:
    """A short cause for a failed store call: MLflow wraps requests' errors in long messages."""
    text = " ".join(str(e).split())
    low = text.lower()
    for needle, short in (("connection refused", "connection refused"), ("timed out", "timed out"),
                          ("name or service not known", "cannot resolve host"),
                          ("connection reset", "connection reset"), ("remotedisconnected", "connection closed")):
        if needle in low:
            return short
    return _short(e, 160)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _unreachable(uri: str, why: str) -> str:
    return f"MLflow tracking store {uri} is unreachable ({why}); start it or set tracking.tracking_uri"


def _unusable(uri: str, why: str) -> str:
    return f"MLflow tracking store {uri} is not usable ({why}); fix it or set tracking.tracking_uri"


def _url_error_reason(e: BaseException) -> str:
    import socket
    import ssl
    import urllib.error

    inner = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(inner, socket.gaierror):
        return f"cannot resolve host: {_short(inner)}"
    if isinstance(inner, ssl.SSLError):
        return f"TLS error: {_short(inner)}"
    if isinstance(inner, ConnectionResetError):
        return "connection reset"
    return _short(inner)


def _check_http(uri: str, deadline: float) -> str | None:
    import ssl
    import urllib.error
    import urllib.request

    ctx = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes"):
            ctx = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            ctx = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    base = uri.rstrip("/")
    status = None
    for suffix in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        left = deadline - time.monotonic()
        if left <= 0:
            return _unreachable(uri, "timed out")
        try:
            with urllib.request.urlopen(urllib.request.Request(base + suffix), timeout=left, context=ctx) as r:
                r.read(64)
            return None
        except urllib.error.HTTPError as e:
            status = e.code
            if e.code in (401, 403):
                return None  # it answered; credentials are MLflow's business (not sent here)
            if e.code == 404:
                continue  # no /health (an old or proxied server): try the REST API
            return _unreachable(uri, f"HTTP {e.code} from {suffix.split('?')[0]}")
        except Exception as e:  # URLError, timeouts, resets
            return _unreachable(uri, _url_error_reason(e))
    return _unusable(uri, f"HTTP {status}: does not look like an MLflow tracking server")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_folder(uri: str, folder: Path) -> str | None:
    if folder.exists():
        if not folder.is_dir():
            return _unusable(uri, f"{folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            return _unusable(uri, f"folder {folder} is not writable")
        return None
    base = _nearest_existing(folder)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        return _unusable(uri, f"folder {folder} does not exist and cannot be created under {base}")
    return None


def _check_sqlite(uri: str, db: Path, deadline: float) -> str | None:
    import sqlite3

    reason = _check_folder(uri, db.parent)
    if reason is not None or not db.exists():
        return reason
    if not db.is_file():
        return _unusable(uri, f"{db} is not a file")
    if not os.access(db, os.R_OK | os.W_OK):
        return _unusable(uri, f"database {db} is not readable and writable")
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=max(0.1, deadline - time.monotonic()))
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header
        finally:
            con.close()
    except sqlite3.Error as e:
        return _unusable(uri, f"sqlite: {_short(e)}")
    return None


def _file_store_path(uri: str) -> Path | None:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if uri.startswith("file:"):
        return Path(url2pathname(urlparse(uri).path)).expanduser().resolve()
    if "://" in uri or re.match(r"^[A-Za-z][\w+.-]*:", uri):
        return None  # another scheme (databricks, postgresql, ...)
    return Path(uri).expanduser().resolve()


def check_store(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when the MLflow store at ``uri`` looks usable, else a one-line reason naming it.

    Finishes within ``timeout_s`` even for a blackholed host: an http(s) store gets a plain GET of
    ``<uri>/health`` (``/api/2.0/mlflow/experiments/search`` where that 404s) in a daemon thread,
    not ``MlflowClient`` (whose requests retry for minutes). A sqlite store needs a writable (or
    creatable) folder and, when the database exists, a readable/writable sqlite file; a file store
    a writable folder. Other schemes (databricks, SQL servers, ...) are not checked (None)."""
    deadline = time.monotonic() + timeout_s
    if _is_http(uri):
        out: list[str | None] = []

        def probe() -> None:
            try:
                out.append(_check_http(uri, deadline))
            except Exception as e:  # noqa: BLE001 -- a check must not raise
                out.append(_unreachable(uri, _short(e)))

        t = threading.Thread(target=probe, name="raydpo-check-store", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()) + 0.05)  # DNS is not bound by urlopen's timeout
        return out[0] if out else _unreachable(uri, f"no answer within {timeout_s:g} s")
    try:
        if uri.startswith("sqlite:"):
            db = _sqlite_path(uri)
            return None if db is None else _check_sqlite(uri, db, deadline)
        folder = _file_store_path(uri)
        return None if folder is None else _check_folder(uri, folder)
    except OSError as e:
        return _unusable(uri, _short(e))


def _fail_fast_http_env() -> None:
    """Make this process's MLflow http requests fail fast (no retries, 5 s timeout): mlflow
    3.17 reads both variables on every request. Values already stricter are kept."""
    for name, cap in ((HTTP_MAX_RETRIES_ENV, FAIL_FAST_MAX_RETRIES), (HTTP_TIMEOUT_ENV, FAIL_FAST_TIMEOUT_S)):
        try:
            cur = int(os.environ[name])
            keep = cur <= cap and (cur > 0 or name != HTTP_TIMEOUT_ENV)
        except (KeyError, ValueError):
            keep = False
        if not keep:
            os.environ[name] = str(cap)


def _spill_record(uri: str, run_id: str, point: tuple[str, float, int, int]) -> dict[str, Any]:
    key, value, ts, step = point
    return {"run_id": run_id, "key": key, "value": value, "timestamp": ts, "step": step, "tracking_uri": uri}


class BufferedLogger:
    """A `RunLogger` that never blocks training on, nor dies from, a tracking-store outage.

    ``log_metrics`` stamps the points (ms, as MLflow does) and queues them; a daemon thread sends
    them with ``log_batch``. When that fails the points stay queued (one warning line), the thread
    retries every ``retry_s`` .. ``max_retry_s`` seconds and says once when it has flushed the
    backlog. Resending a point keeps its timestamp, so a batch that reached the store before its
    answer was lost is not stored twice (MLflow's SQL store skips identical points).

    ``skip_through_step``: points with ``step <= skip_through_step`` are dropped -- on resume,
    pass `max_logged_step` of the run so steps it already holds are not logged twice.

    For an http store this sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` in ``os.environ`` (process-wide; meant for the rank-0 worker
    process) so that each attempt fails in seconds instead of minutes.

    Call `close` at the end: it flushes within a timeout and spills what is left to JSONL
    (`replay_buffer`). Tags are queued the same way.
    """

    def __init__(self, uri: str, run_id: str, skip_through_step: int | None = None, *,
                 retry_s: float = 2.0, max_retry_s: float = 5.0, max_buffered: int = 1_000_000,
                 spill_path: str | None = None):
        import atexit
        import collections

        self.uri, self.run_id = uri, run_id
        self.skip_through_step = None if skip_through_step is None else int(skip_through_step)
        self.retry_s, self.max_retry_s = float(retry_s), max(float(retry_s), float(max_retry_s))
        self.max_buffered = int(max_buffered)
        self.spill_path = spill_path
        self.sent = self.skipped = self.dropped = 0
        self.last_error: str | None = None
        self._pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._inflight: list[tuple[str, float, int, int]] = []
        self._tags: dict[str, str] = {}
        self._inflight_tags: dict[str, str] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()  # new data (ignored while the store is down)
        self._kick = threading.Event()  # flush/close: retry now
        self._stopping = self._abandoned = self._closed = False
        self._down = False
        self._outage_points = 0
        self._warned_overflow = self._warned_closed = False
        self._client = None
        if _is_http(uri):
            _fail_fast_http_env()
        self._thread = threading.Thread(target=self._loop, name="raydpo-mlflow-logger", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- caller side (training loop): no I/O, no MLflow import ---------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        step = int(step)
        if self.skip_through_step is not None and step <= self.skip_through_step:
            self.skipped += len(metrics)
            return
        ts = int(time.time() * 1000)
        points = [(str(k), float(v), ts, step) for k, v in metrics.items()]
        with self._cond:
            if self._closed:
                if not self._warned_closed:
                    self._warned_closed = True
                    _warn(f"warning: MLflow logger for run {self.run_id} is closed; "
                          "dropping metrics logged after close")
                return
            self._pending.extend(points)
            over = len(self._pending) - self.max_buffered
            if over > 0:
                for _ in range(over):
                    self._pending.popleft()
                self.dropped += over
                if not self._warned_overflow:
                    self._warned_overflow = True
                    _warn(f"warning: MLflow store {self.uri} unreachable for too long; more than "
                          f"{self.max_buffered} metric points buffered, dropping the oldest")
        self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._cond:
            if self._closed:
                return
            self._tags.update({str(k): str(v) for k, v in tags.items()})
        self._wake.set()

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        """Best effort, at once: a step already in the run (a resumed job) is not logged again;
        a failed upload only warns -- generations are for reading, not worth a training step."""
        if not rows or (self.skip_through_step is not None and int(step) <= self.skip_through_step):
            return
        try:
            _log_generations(self._get_client(), self.run_id, rows)
        except Exception as e:  # noqa: BLE001 -- an outage must not kill training
            _warn(f"warning: could not log the step-{int(step)} eval generations to MLflow store {self.uri} "
                  f"({_short(e)}); they are lost")

    @property
    def pending(self) -> int:
        """Metric points not yet acknowledged by the store (queued or being sent)."""
        with self._cond:
            return len(self._pending) + len(self._inflight)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` for everything queued so far to reach the store; True if it
        did. Never raises."""
        deadline = time.monotonic() + timeout_s
        self._kick.set()
        self._wake.set()
        with self._cond:
            while self._pending or self._inflight or self._tags or self._inflight_tags:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout_s: float = 10, spill_path: str | None = None) -> int:
        """Flush within ``timeout_s``, stop the sender, and write whatever was not sent to
        ``spill_path`` (default: the constructor's) as JSONL, one metric point per line
        (``run_id, key, value, timestamp, step, tracking_uri``; unsent tags as ``{"tag": ...}``
        lines). Returns how many records were not sent (0: everything reached the store).
        Idempotent."""
        import atexit
        import json

        with self._cond:
            if self._closed:
                return 0
            self._stopping = True
        self._kick.set()
        self._wake.set()
        self._thread.join(max(0.0, timeout_s))
        with self._cond:
            self._closed = self._abandoned = True
            points = list(self._inflight) + list(self._pending)  # in flight: maybe sent, replay dedupes
            tags = {**self._inflight_tags, **self._tags}
            self._pending.clear()
            self._tags.clear()
        try:
            atexit.unregister(self._at_exit)
        except Exception:  # noqa: BLE001
            pass
        left = len(points) + len(tags)
        if not left:
            return 0
        path = spill_path or self.spill_path
        why = f" ({self.last_error})" if self.last_error else ""
        if not path:
            _warn(f"warning: MLflow store {self.uri} unreachable{why}; {len(points)} metric points and "
                  f"{len(tags)} tags of run {self.run_id} were not sent and are lost (no spill path)")
            return left
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for p in points:
                    f.write(json.dumps(_spill_record(self.uri, self.run_id, p)) + "\n")
                for k, v in tags.items():
                    f.write(json.dumps({"run_id": self.run_id, "tag": k, "value": v, "tracking_uri": self.uri}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            _warn(f"warning: MLflow store {self.uri} unreachable{why}; {left} unsent records of run "
                  f"{self.run_id} could not be written to {path} either ({_short(e)}); they are lost")
            return left
        _warn(f"warning: MLflow store {self.uri} unreachable{why}; wrote {len(points)} unsent metric points "
              f"(and {len(tags)} tags) of run {self.run_id} to {path}; replay them with: "
              f"{REPLAY_COMMAND} {shlex.quote(str(path))}")
        return left

    def _at_exit(self) -> None:
        self.close(timeout_s=5)

    # -- sender thread ---------------------------------------------------------------------

    def _get_client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def _take_batch(self) -> tuple[list, dict] | None:
        """Move the next batch to in-flight (under the lock); None when there is nothing."""
        with self._cond:
            if self._abandoned or (not self._pending and not self._tags):
                return None
            tags = dict(list(self._tags.items())[:MAX_PARAMS_PER_BATCH])
            for k in tags:
                del self._tags[k]
            n = min(len(self._pending), MAX_METRICS_PER_BATCH - len(tags))
            self._inflight = [self._pending.popleft() for _ in range(n)]
            self._inflight_tags = tags
            return self._inflight, tags

    def _send(self, points: list, tags: dict) -> None:
        from mlflow.entities import Metric, RunTag

        self._get_client().log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in points],
                                     tags=[RunTag(k, v) for k, v in tags.items()])

    def _loop(self) -> None:
        delay = self.retry_s
        while True:
            if self._down:
                if self._stopping:
                    delay = min(delay, 0.5)  # closing: keep trying until close's deadline
                self._kick.wait(delay)
                self._kick.clear()
            else:
                self._wake.wait(1.0)
            self._wake.clear()
            while True:
                batch = self._take_batch()
                if batch is None:
                    break
                points, tags = batch
                try:
                    self._send(points, tags)
                except Exception as e:  # noqa: BLE001 -- keep everything, retry later
                    self.last_error = _cause(e)
                    with self._cond:
                        if not self._abandoned:  # put the batch back in front, newer tags win
                            self._pending.extendleft(reversed(points))
                            for k, v in tags.items():
                                self._tags.setdefault(k, v)
                        self._inflight, self._inflight_tags = [], {}
                        n = len(self._pending)
                        self._cond.notify_all()
                    if not self._down:
                        self._down, self._outage_points = True, 0
                        delay = self.retry_s
                        _warn(f"warning: MLflow store {self.uri} unreachable; buffering {n} metric points "
                              f"(will retry): {self.last_error}")
                    else:
                        delay = min(delay * 2, self.max_retry_s)
                    break
                with self._cond:
                    self._inflight, self._inflight_tags = [], {}
                    self.sent += len(points)
                    if self._down:
                        self._outage_points += len(points)
                    drained = not self._pending and not self._tags
                    self._cond.notify_all()
                if self._down and drained:
                    self._down = False
                    self.last_error = None
                    _warn(f"MLflow store {self.uri} reachable again; flushed {self._outage_points} "
                          f"buffered metric points of run {self.run_id}")
            with self._cond:
                if self._abandoned or (self._stopping and not self._pending and not self._tags):
                    self._cond.notify_all()
                    return


def _read_spill(path: str) -> list[dict[str, Any]]:
    import json

    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if n == len(lines):  # a torn last line (process killed mid-write): the rest is good
                _warn(f"warning: {path}:{n}: skipping a truncated last line")
                break
            raise ValueError(f"{path}:{n}: not a JSON object") from None
    return records


def replay_buffer(path: str, uri: str | None = None) -> int:
    """Send a `BufferedLogger` spill file (JSONL) into its run(s) -- the store is ``uri``, else
    each record's ``tracking_uri`` -- keeping original timestamps and steps, in batches of
    ``MAX_METRICS_PER_BATCH``. Points whose (key, step) the run already holds are skipped, so
    replaying twice adds nothing. Returns how many points were sent and renames the file to
    ``<path>.replayed``. Raises (file left as is) when a store is unreachable."""
    from mlflow.entities import Metric, RunTag

    records = _read_spill(path)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        target = uri or r.get("tracking_uri")
        if not target or not r.get("run_id"):
            raise ValueError(f"{path}: record without run_id/tracking_uri (pass uri): {r}")
        groups.setdefault((target, r["run_id"]), []).append(r)
    sent = 0
    for (target, run_id), recs in groups.items():
        reason = check_store(target)
        if reason is not None:
            raise RuntimeError(reason)
        client = _client(target)
        tags = [RunTag(r["tag"], str(r["value"])) for r in recs if "tag" in r]
        points = [r for r in recs if "key" in r]
        seen: set[tuple[str, int]] = set()
        for key in {r["key"] for r in points}:
            seen.update((key, int(m.step)) for m in client.get_metric_history(run_id, key))
        todo = []
        for r in points:
            ks = (r["key"], int(r["step"]))
            if ks not in seen:
                seen.add(ks)
                todo.append(Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])))
        for i in range(0, len(todo), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=todo[i:i + MAX_METRICS_PER_BATCH])
            sent += len(todo[i:i + MAX_METRICS_PER_BATCH])
        if tags:
            _log_tags(client, run_id, list({t.key: t for t in tags}.values()))
    os.replace(path, f"{path}.replayed")
    return sent


def max_logged_step(uri: str, run_id: str) -> int:
    """The largest step of any metric the run holds (0 if none): what to pass as
    ``BufferedLogger(skip_through_step=...)`` when a resumed job logs into the same run."""
    client = _client(uri)
    best = 0
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            best = max(best, int(m.step))
    return best

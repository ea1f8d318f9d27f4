"""MLflow: the only raydpo package importing mlflow (lazily, so importing this is cheap).

One file each, bottom to top:

* `store.py`: which store (`resolve_tracking_uri`, `artifact_root`, `ui_command`), whether it is
  usable (`check_store`, bounded in time), the fail-fast http settings, and `_client`, the one
  ``MlflowClient`` per store that every call goes through (never the fluent API);
* `runs.py`: experiments, runs, params, tags, history, eval-generation tables, final artifacts,
  the Model Registry, `find_runs`, `max_logged_step`, and the tag names (`STAGE_TAG`, ...);
* `logger.py`: what rank 0 of the workers logs through (`make_logger`: `RunLogger`, the
  outage-proof `BufferedLogger`; `NullLogger` for other ranks), its JSONL spill,
  `replay_buffer` and the driver's `replay_spill`;
* `plots.py` (reward curves, the trial scatter; matplotlib imported lazily), `trials.py` (a Tune
  search's trial rows and tags), `prometheus.py` (the live metrics exporter), `terminal.py`
  (where raydpo's own lines go).

Who does what: the driver resolves the store, creates the experiment and the run, logs the
flattened config; rank 0 of the workers logs metrics and eval generations into that run *by id*;
the driver reads the history back, logs the adapter, config and reward curves, optionally
registers the adapter and ends the run. Metric names are shared constants
(`raydpo.metric_names`), used by the loops, the plots, tune and ``dashboards/``.

This file only re-exports the names the rest of raydpo reads as ``tracking.X``.
"""

from raydpo.tracking.logger import (REPLAY_COMMAND, BufferedLogger, NullLogger, RunLogger, make_logger, replay_buffer,
                                    replay_spill)
from raydpo.tracking.runs import (ADAPTER_TAG, GENERATION_COLUMNS, GENERATIONS_TABLE, MAX_PARAM_LEN, PARENT_TAG,
                                  SFT_RUN_TAG, STAGE_TAG, end_run, fetch_history, find_runs, latest_generations,
                                  load_generations, log_final_artifacts, log_generations, log_params,
                                  max_logged_step, register_model, reopen_run, run_exists, run_for_adapter,
                                  run_tags, set_tags, setup_experiment, start_run)
from raydpo.tracking.store import (HTTP_MAX_RETRIES_ENV, HTTP_TIMEOUT_ENV, _client, _sqlite_path, artifact_root,
                                   check_store, resolve_tracking_uri, ui_command)

__all__ = [
    # store
    "HTTP_MAX_RETRIES_ENV", "HTTP_TIMEOUT_ENV", "_client", "_sqlite_path", "artifact_root", "check_store",
    "resolve_tracking_uri", "ui_command",
    # runs
    "ADAPTER_TAG", "GENERATION_COLUMNS", "GENERATIONS_TABLE", "MAX_PARAM_LEN", "PARENT_TAG", "SFT_RUN_TAG",
    "STAGE_TAG", "end_run", "fetch_history", "find_runs", "latest_generations", "load_generations",
    "log_final_artifacts", "log_generations", "log_params", "max_logged_step", "register_model", "reopen_run",
    "run_exists", "run_for_adapter", "run_tags", "set_tags", "setup_experiment", "start_run",
    # logger
    "REPLAY_COMMAND", "BufferedLogger", "NullLogger", "RunLogger", "make_logger", "replay_buffer", "replay_spill",
]

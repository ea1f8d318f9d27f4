"""MLflow: the only raydpo module importing mlflow (lazily, so importing this is cheap).

The driver creates the experiment and the run; rank 0 of the workers logs metrics into that
run by id through ``MlflowClient`` (no fluent active-run globals in workers); other ranks get a
`NullLogger`. The driver ends the run and logs the final artifacts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

REWARD_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
TOKENS_PER_S = "train/tokens_per_s"
LR = "train/lr"
SFT_RUN_TAG = "raydpo.sft_run_id"
STAGE_TAG = "raydpo.stage"
PARENT_TAG = "mlflow.parentRunId"
ADAPTER_TAG = "raydpo.adapter_path"
MAX_PARAM_LEN = 6000


def prefixed(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{split}/{k}": v for k, v in metrics.items()}


def resolve_tracking_uri(cfg_tracking, cwd: str | None = None) -> str:
    """Config > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``."""
    if cfg_tracking.tracking_uri:
        return cfg_tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent
    return None


def ui_command(uri: str) -> str:
    d = _sqlite_dir(uri)
    if d is not None:
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {d / 'mlartifacts'}"
    if uri.startswith("http"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def setup_experiment(uri: str, experiment_name: str) -> str:
    """Create (once) and return the experiment id. Run on the driver before any worker logs:
    concurrent creators of a sqlite store race. Artifacts of a sqlite store go next to it."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is not None:
        return exp.experiment_id
    d = _sqlite_dir(uri)
    location = (d / "mlartifacts" / experiment_name).as_uri() if d is not None else None
    try:
        return client.create_experiment(experiment_name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created meanwhile by someone else
        exp = client.get_experiment_by_name(experiment_name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(uri: str, experiment_id: str, run_name: str, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    tags = dict(tags or {})
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = _client(uri).create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


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
    from mlflow.entities import Param

    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items())]
    client = _client(uri)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])


class RunLogger:
    """Logs into an existing run by id; safe inside Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


class NullLogger:
    """What ranks other than 0 get: same methods, no MLflow traffic."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


def make_logger(uri: str | None, run_id: str | None, rank: int) -> RunLogger | NullLogger:
    if rank == 0 and uri and run_id:
        return RunLogger(uri, run_id)
    return NullLogger()


def fetch_history(uri: str, run_id: str, keys: list[str] | None = None) -> list[dict[str, float]]:
    """A run's metric histories merged per step: ``[{"step": 1, "train/loss": ..}, ...]``."""
    client = _client(uri)
    if keys is None:
        keys = list(client.get_run(run_id).data.metrics)
    by_step: dict[int, dict[str, float]] = {}
    for k in keys:
        for m in client.get_metric_history(run_id, k):
            by_step.setdefault(m.step, {"step": m.step})[k] = m.value
    return [by_step[s] for s in sorted(by_step)]


def plot_reward_curves(history: list[dict[str, float]], path: str) -> str:
    """PNG of the loss and reward curves (train and eval) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, key in zip(axes, panels):
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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def log_final_artifacts(uri: str, run_id: str, *, adapter_dir: str | None = None, config_yaml: str | None = None,
                        history: list[dict[str, float]] | None = None) -> None:
    client = _client(uri)
    if adapter_dir:
        client.log_artifacts(run_id, adapter_dir, "adapter")
    with tempfile.TemporaryDirectory() as tmp:
        if config_yaml is not None:
            p = Path(tmp) / "config.yaml"
            p.write_text(config_yaml)
            client.log_artifact(run_id, str(p))
        if history:
            client.log_artifact(run_id, plot_reward_curves(history, str(Path(tmp) / "reward_curves.png")))


def register_model(uri: str, run_id: str, artifact_path: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Register a run's artifact folder (e.g. ``adapter``) as a new Model Registry version."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    return mv.version


def find_runs(uri: str, experiment_name: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment_name])

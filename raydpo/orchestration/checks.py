"""What must hold before a stage or a search trains, each failing with one line (`errors`).

`preflight` runs before Ray starts (storage, tracking store, hub token); once Ray is up, the
cluster's resources are waited for (`raydpo.orchestration.resources.wait_for_resources`: a cold
autoscaling cluster gets them late); `check_batch_fits` once the training data is counted.
`launch.fit_stage` and `tune.run_tune` both call them.
"""

from __future__ import annotations

from pathlib import Path

from raydpo import storage
from raydpo.config import BUILTIN_MODEL, Config, ModelConfig
from raydpo.orchestration.errors import DataError, HubAccessError, StorageError, TrackingError


def check_storage(cfg: Config) -> str | None:
    """One line if ``run.storage_path`` cannot hold checkpoints (not a folder, not writable; a
    URI: an object written and deleted there, with the environment's credentials and endpoint)."""
    import os
    import tempfile

    if storage.is_remote(cfg.run.storage_path):
        return check_remote_storage(cfg.run.storage_path)
    p = Path(storage.root(cfg.run.storage_path))
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"run.storage_path {p}: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"run.storage_path {p} is not writable (checked {probe})"
    if p.exists():
        try:
            with tempfile.NamedTemporaryFile(dir=p, prefix=".raydpo-write-check-"):
                pass
        except OSError as e:
            return f"run.storage_path {p} is not writable ({e.strerror or e})"
    return None


def check_remote_storage(uri: str) -> str | None:
    import uuid

    if "?" in uri:  # raydpo joins names onto the URI: options would end up inside object keys
        return (f"run.storage_path {uri}: options in the URI are not supported; set them in the environment "
                "(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...) and give the bare URI")

    probe = storage.write_check_file(uri, uuid.uuid4().hex[:12])
    try:
        storage.write_text(probe, "raydpo: can this storage take writes?\n")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ValueError (a bad URI), ...
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        return (f"run.storage_path {uri} is not writable ({first}); check the credentials and endpoint in the "
                "environment (AWS_*, AWS_ENDPOINT_URL for an S3-compatible store, GOOGLE_APPLICATION_CREDENTIALS, ...)")
    return None


# Organisations whose models are gated on the Hugging Face Hub (the licence must be accepted,
# downloads need a token). Offline we cannot ask the Hub, so these are known by name.
GATED_ORGS = ("meta-llama/", "mistralai/", "google/gemma")


def check_hub_access(model_cfg: ModelConfig) -> str | None:
    """One line if the model is a gated hub id, not in the local cache, and no token is set;
    else None. Run where the stage runs, before Ray: a worker would only fail after minutes."""
    name = model_cfg.name_or_path
    if name == BUILTIN_MODEL or Path(name).exists() or not name.startswith(GATED_ORGS):
        return None
    from huggingface_hub import get_token, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=model_cfg.revision)
    if isinstance(cached, str) or get_token():
        return None
    return (f"model.name_or_path {name} is gated on the Hugging Face Hub and no token is set: accept its licence on "
            "huggingface.co, then `huggingface-cli login` or set HF_TOKEN (on the cluster: in the job's env)")


def preflight(cfg: Config) -> str:
    """What must hold before Ray starts, each failing with one line: run storage writable, the
    tracking store reachable (<= 5 s), a gated hub model's token present. Returns the store URI."""
    from raydpo import tracking

    problem = check_storage(cfg)
    if problem:
        raise StorageError(problem)
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    problem = tracking.check_store(uri, timeout_s=5.0)
    if problem:
        raise TrackingError(problem)
    problem = check_hub_access(cfg.model)
    if problem:
        raise HubAccessError(problem)
    return uri


def check_batch_fits(who: str, rows: int, unit: str, num_workers: int, per_device_batch_size: int) -> int:
    """The global batch (``num_workers x per_device_batch_size``); a `DataError` naming ``who``
    (the stage, or ``tune``) when ``rows`` training ``unit`` (pairs, blocks) cannot fill one."""
    global_batch = per_device_batch_size * num_workers
    if rows < global_batch:
        raise DataError(f"{who}: {rows} training {unit} remain after filtering and the eval split, fewer than one "
                        f"batch per worker ({num_workers} workers x {per_device_batch_size} = {global_batch}); "
                        "add data or lower the batch size")
    return global_batch

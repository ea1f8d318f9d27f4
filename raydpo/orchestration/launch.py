"""Driver side: builds and fits the TorchTrainer for SFT and DPO, owns the MLflow run lifecycle.

No training maths here: that lives in `raydpo.train.loop`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydpo import storage
from raydpo.config import Config, Stage
from raydpo.tracking.terminal import echo
from raydpo.data.sources import DataSourceError


class ResourceError(RuntimeError):
    pass


@dataclass
class StageResult:
    stage: str
    run_id: str | None
    adapter_path: str
    checkpoint_path: str
    metrics: dict[str, Any]
    base_path: str
    elapsed_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def check_cpu_budget(cfg: Config) -> None:
    """Ray Data needs CPUs of its own while workers train, or ingest stalls at 0 rows forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    s = cfg.scaling
    trainer_cpus = s.trainer_resources()["CPU"]
    if s.slots({"CPU": total}, {"CPU": trainer_cpus}) < 1:
        needed = trainer_cpus + s.data_cpus
        raise ResourceError(
            f"the cluster has {total:g} CPUs; {s.num_workers} workers x {s.cpus_per_worker:g} CPU "
            f"+ {s.data_cpus:g} for Ray Data = {needed:g}. Lower scaling.cpus_per_worker or "
            f"scaling.num_workers (Ray Data must keep >= scaling.data_cpus)"
        )


def resolve_base(cfg: Config) -> tuple[str, str]:
    """(base model path, tokenizer path). 'tiny' is materialized here, once, on the driver."""
    from raydpo.models.factory import resolve_model_path

    p = resolve_model_path(cfg.model)
    if Path(p).exists():
        p = str(Path(p).resolve())
    return p, p


def merged_sft_base(cfg: Config, sft_adapter: str, base_path: str) -> str:
    """DPO's base = the SFT model (base + SFT adapter merged, unquantized), as in stack_llama_2.
    DPO then loads it (4-bit if configured) with a fresh adapter, so the reference
    (adapter disabled) *is* the SFT model. Runs as a Ray task so a 7B merge does not need the
    driver's memory; the output goes to run storage, which workers share.

    The merge is reused only for the same adapter *content* (its files' digest), never because
    the path is the same: a rerun under the same run name writes a new SFT adapter to the same
    path. The marker also records the base's identity, which keys the reference cache. Another
    run's merge of the same content in the same storage (a second DPO run or a search from one
    SFT adapter) is hard-linked instead of merged again: no second copy on disk, and a later
    re-merge there writes new files, never these."""
    import ray

    from raydpo.models.factory import merge_adapter
    from raydpo.orchestration.reference import MERGED_MARKER, files_digest, model_identity

    memo = Path(cfg.run.storage_path).resolve() / "reference"
    out = Path(cfg.run.storage_path).resolve() / cfg.run.name / "sft-merged"
    marker = out / MERGED_MARKER
    want = {"adapter_digest": files_digest(sft_adapter, memo),
            "base_identity": model_identity(base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None,
                                            memo)}
    if marker.exists():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = {}
        if all(have.get(k) == v for k, v in want.items()):
            return str(out)
    if out.exists():
        shutil.rmtree(out)
    if _link_same_merge(Path(cfg.run.storage_path).resolve(), want, out):
        marker.write_text(json.dumps({"adapter": str(Path(sft_adapter).resolve()), "base": base_path, **want}))
        return str(out)
    dtype = cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype
    task = ray.remote(num_cpus=min(1.0, ray.cluster_resources().get("CPU", 1.0)))(merge_adapter)
    ray.get(task.remote(base_path, str(sft_adapter), str(out), dtype))
    marker.write_text(json.dumps({"adapter": str(Path(sft_adapter).resolve()), "base": base_path, **want}))
    return str(out)


def _link_same_merge(storage: Path, want: dict, out: Path) -> bool:
    """Hard-link (copy where links fail) another run's finished merge with the same digests into
    ``out``, its marker excepted; False when there is none or it changed under us."""
    from raydpo.orchestration.reference import MERGED_MARKER

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for marker in sorted(storage.glob(f"*/sft-merged/{MERGED_MARKER}")):
        if marker.parent == out:
            continue
        src = marker.parent
        try:
            if any(json.loads(marker.read_text()).get(k) != v for k, v in want.items()):
                continue
            if not ((src / "config.json").exists() and any(src.glob("*.safetensors"))):
                continue
            shutil.copytree(src, out, copy_function=link, ignore=shutil.ignore_patterns(MERGED_MARKER))
            return True
        except (OSError, ValueError):  # unreadable, or re-merged while we linked: merge ourselves
            shutil.rmtree(out, ignore_errors=True)
    return False


def stage_datasets(cfg: Config, stage: Stage, base_path: str, tok_path: str, progress=echo):
    """(train, eval) lazy Ray datasets of a stage: tokenized pairs, with the reference log-prob
    columns (computed once, `raydpo.orchestration.reference`) when DPO uses ``dpo.reference=precomputed`` and a
    loss that reads a reference (`DPOConfig.precomputed_reference`: none for simpo, orpo, sft)."""
    if stage == "dpo" and cfg.dpo.precomputed_reference:
        from raydpo.orchestration.reference import reference_datasets

        return reference_datasets(cfg, base_path, tok_path, progress=progress)
    if stage == "dpo" and not cfg.dpo.needs_reference:
        progress(f"[dpo] loss {'+'.join(cfg.dpo.loss_types)} reads no reference: no reference pass and no "
                 "reference forward in any step")
    from raydpo.data.pipeline import build_datasets

    return build_datasets(cfg, stage, tok_path)


class Preempted(Exception):
    """The stage stopped early on SIGTERM, after writing a checkpoint; rerun to continue."""

    def __init__(self, stage: str, step: int | None, storage_dir: str):
        self.stage, self.step, self.storage_dir = stage, step, storage_dir
        at = f" at step {step}" if step is not None else ""
        super().__init__(f"{stage} was preempted{at} and checkpointed in {storage_dir}; "
                         "run the same command again to resume from there")


class ResumeConfigError(ValueError):
    """A rerun's config differs from its checkpoint's in keys that change the run."""


RUN_FILE = "raydpo_run.json"


def stage_storage(cfg: Config, stage: str) -> Path:
    """Ray Train's folder of one stage's run: checkpoints, the MLflow run id, the stop file."""
    return Path(cfg.run.storage_path).resolve() / f"{cfg.run.name}-{stage}"


def set_aside(folder: Path) -> Path | None:
    """``--restart``: move a stage's earlier folder out of the way (kept, never deleted)."""
    if not folder.exists():
        return None
    dest = folder.with_name(f"{folder.name}.before-restart-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(dest)
    return dest


def check_storage(cfg: Config) -> str | None:
    """One line if ``run.storage_path`` cannot hold checkpoints (not a folder, not writable)."""
    import os
    import tempfile

    p = Path(cfg.run.storage_path).expanduser().resolve()
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


def preflight(cfg: Config) -> str:
    """What must hold before Ray starts, each failing with one line: run storage writable, the
    tracking store reachable (<= 5 s), a gated hub model's token present. Returns the store URI."""
    from raydpo import tracking
    from raydpo.models.factory import check_hub_access

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


def explain(err: BaseException) -> str:
    """One line for a failed stage: a worker's own message rather than Ray's wrapper and traceback."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, e = sorted(failures.items())[0]
        text = str(e).strip().splitlines()
        msg = next((ln for ln in reversed(text) if ln.strip() and not ln.startswith((" ", "Traceback"))), str(e))
        return f"worker {rank}: {msg.strip()}"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else err.__class__.__name__


def _prior_state(cfg: Config, stage: str, folder: Path) -> tuple[dict | None, dict]:
    """(newest intact checkpoint's trainer state or None, the folder's run record)."""
    from raydpo.config import fingerprint_diff, resume_fingerprint
    from raydpo.train.loop import verify_checkpoint
    from raydpo.train.worker import intact_checkpoints

    record = {}
    if (folder / RUN_FILE).exists():
        try:
            record = json.loads((folder / RUN_FILE).read_text())
        except ValueError:
            record = {}
    ckpts = intact_checkpoints(str(folder))
    state = verify_checkpoint(ckpts[0]) if ckpts else None
    saved_fp = (state or {}).get("config") or record.get("fingerprint")
    if saved_fp:
        diff = fingerprint_diff(saved_fp, resume_fingerprint(cfg))
        if diff:
            shown = ", ".join(f"{k} ({saved_fp.get(k, '<unset>')!r} -> {resume_fingerprint(cfg).get(k, '<unset>')!r})"
                              for k in diff[:8])
            more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
            raise ResumeConfigError(
                f"{stage}: run '{cfg.run.name}' has a checkpoint in {folder} made with another config: {shown}{more}. "
                "Rerun with the same config to resume it, or pass --restart to start over (the old folder is kept)")
    if state is not None:
        state["path"] = str(ckpts[0])
    return state, record


def fit_stage(
    cfg: Config,
    stage: Stage,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    callbacks: list | None = None,
    report_eval_only: bool = False,
    base: tuple[str, str] | None = None,
    datasets: tuple[Any, Any] | None = None,
    restart: bool = False,
    progress=echo,
) -> StageResult:
    """Run one stage as a Ray Train job and track it in MLflow. Returns where the adapter is.

    A stage whose folder (`stage_storage`) holds checkpoints resumes from the newest intact one,
    in the same MLflow run, logging no step twice; one that already finished is not run again.
    ``restart`` sets the folder aside and starts over. ``datasets``: (train, eval) Ray datasets
    prepared by the caller (a Tune search materializes them once for all its trials); by default
    the stage builds its own from ``cfg.data``."""
    import ray.train

    from raydpo import tracking
    from raydpo.config import fingerprint_hash, resume_fingerprint
    from raydpo.train.deepspeed import comm_backend
    from raydpo.orchestration.ray_connect import ensure_ray
    from raydpo.orchestration.ingest import data_config, eval_prompts, ordered_execution, ordered_stream
    from raydpo.train.loop import SCORE_KEY
    from raydpo.train.preempt import install_driver_handler
    from raydpo.orchestration.ray_callbacks import SigtermToStop, fatal_trainer
    from raydpo.train.faults import ENV as FAULTS_ENV
    from raydpo.train.inputs import WorkerInputs
    from raydpo.train.worker import train_loop_per_worker

    t0 = time.perf_counter()
    cfg = cfg.with_absolute_paths()  # workers and Ray Data tasks may not share this cwd
    stage_cfg = cfg.stage(stage)
    uri = preflight(cfg)
    folder = stage_storage(cfg, stage)
    if restart and (moved := set_aside(folder)) is not None:
        progress(f"[{stage}] --restart: the earlier run's folder is kept as {moved}")
    prior, record = _prior_state(cfg, stage, folder)
    fingerprint = resume_fingerprint(cfg)
    adapter_of = lambda p: str(Path(p) / "adapter")  # noqa: E731
    if prior is not None and int(prior["step"]) >= stage_cfg.max_steps and not prior.get("preempted"):
        progress(f"[{stage}] already finished at step {prior['step']} ({prior['path']}): reusing it")
        run_id = record.get("run_id")
        hist = tracking.fetch_history(uri, run_id, None) if run_id and tracking.run_exists(uri, run_id) else []
        if run_id and tracking.run_exists(uri, run_id):
            adapter = adapter_of(prior["path"])
            if tracking.ADAPTER_TAG not in tracking.run_tags(uri, run_id):  # it died before its wrap-up
                if cfg.tracking.log_artifacts:
                    tracking.log_final_artifacts(uri, run_id, adapter_dir=adapter, config_yaml=cfg.to_yaml(),
                                                 history=hist)
                tracking.set_tags(uri, run_id, {tracking.ADAPTER_TAG: str(Path(adapter).resolve())})
            tracking.end_run(uri, run_id, "FINISHED")  # an earlier driver may have died before ending it
        return StageResult(stage=stage, run_id=run_id, adapter_path=adapter_of(prior["path"]),
                           checkpoint_path=prior["path"], metrics=hist[-1] if hist else {},
                           base_path=record.get("base_path", ""), elapsed_s=time.perf_counter() - t0, history=hist)

    ensure_ray()
    check_cpu_budget(cfg)
    base_path, tok_path = base or resolve_base(cfg)
    if base is None and stage == "dpo" and cfg.dpo.sft_adapter:
        progress(f"[dpo] merging SFT adapter {cfg.dpo.sft_adapter} into the base (the DPO reference)")
        base_path = merged_sft_base(cfg, cfg.dpo.sft_adapter, base_path)
        tok_path = base_path

    exp_id = tracking.setup_experiment(uri, cfg.tracking.experiment_name)
    run_name = f"{cfg.tracking.run_name or cfg.run.name}-{stage}"
    run_id = record.get("run_id")
    logged_through = 0
    if run_id and tracking.run_exists(uri, run_id):
        tracking.reopen_run(uri, run_id)
        logged_through = tracking.max_logged_step(uri, run_id)
        at = f"step {prior['step']}" if prior else "step 0 (no checkpoint was written)"
        progress(f"[{stage}] resuming run '{cfg.run.name}' from {at} in MLflow run {run_id} "
                 f"(steps <= {logged_through} are already logged)")
    else:
        run_id = tracking.start_run(uri, exp_id, run_name, parent_run_id=parent_run_id,
                                    tags={tracking.STAGE_TAG: stage, **(tags or {})})
        tracking.log_params(uri, run_id, {**cfg.flat(), **(params or {})})
        progress(f"[{stage}] MLflow run {run_id} in {uri}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "base_path": base_path,
                                               "fingerprint": fingerprint, "config_hash": fingerprint_hash(fingerprint)}))
    for stale in (storage.stop_file(folder), storage.oom_marker(folder)):
        stale.unlink(missing_ok=True)
    restore_handler, sigterm = install_driver_handler(str(storage.stop_file(folder)))

    try:
        train_ds, eval_ds = datasets or stage_datasets(cfg, stage, base_path, tok_path, progress)
        if eval_ds is not None:
            eval_ds = eval_ds.materialize()  # evaluated many times: tokenize it once
            if eval_ds.count() == 0:
                progress(f"[{stage}] warning: the eval split is empty; training runs without evaluation")
                eval_ds = None
        s = cfg.scaling
        with ordered_execution():  # tokenized once, the same blocks on every rerun; each epoch sorts them
            train_ds = train_ds.materialize()
        n_train = train_ds.count()
        global_batch = stage_cfg.per_device_batch_size * s.num_workers
        if n_train < global_batch:
            raise DataError(f"{stage}: {n_train} training {'pairs' if stage == 'dpo' else 'blocks'} remain after "
                            f"filtering and the eval split, fewer than one batch per worker ({s.num_workers} workers x "
                            f"{stage_cfg.per_device_batch_size} = {global_batch}); add data or lower the batch size")
        stream = ordered_stream(train_ds, n_train, seed=cfg.data.seed, global_batch=global_batch,
                                micro_batches=stage_cfg.max_steps * stage_cfg.gradient_accumulation_steps,
                                num_cpus=cfg.data.tokenize_num_cpus)  # sorted once, read whole by every worker
        trainer = fatal_trainer()(
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config=WorkerInputs(
                config=cfg.to_dict(), stage=stage, base_path=base_path, tokenizer_path=tok_path,
                tracking_uri=uri, run_id=run_id, report_eval_only=report_eval_only,
                has_eval=eval_ds is not None, storage_dir=str(folder),
                fingerprint=fingerprint, logged_through_step=logged_through,
                faults=os.environ.get(FAULTS_ENV, ""),
                eval_prompts=eval_prompts(eval_ds, cfg.generations.num_prompts)
                if stage == "dpo" and cfg.generations.enabled and eval_ds is not None else [],
            ).to_dict(),
            scaling_config=ray.train.ScalingConfig(
                num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=s.worker_resources()
            ),
            torch_config=ray.train.torch.TorchConfig(backend=comm_backend(s.use_gpu)),
            datasets={"train": stream, **({"eval": eval_ds} if eval_ds is not None else {})},
            dataset_config=data_config(),
            run_config=ray.train.RunConfig(
                name=folder.name,
                storage_path=str(folder.parent),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                             checkpoint_score_attribute=SCORE_KEY,
                                                             checkpoint_score_order="max"),
                callbacks=[SigtermToStop(), *(callbacks or [])],
            ),
        )
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # noqa: BLE001 - Train V2 raises TrainingFailedError from fit()
            result, error = None, e
        replay_spill(uri, folder, stage, progress)
        oom = storage.oom_marker(folder)
        if oom.exists():
            raise WorkerOOM(json.loads(oom.read_text())["message"]) from None
        try:
            latest, _ = _prior_state(cfg, stage, folder)
        except Exception:  # noqa: BLE001 - never hide the stage's own error behind this one
            if error is not None:
                raise error from None
            raise
        new_ckpt = latest is not None and (prior is None or latest["path"] != prior["path"])
        stopped = (storage.stop_file(folder).exists() or sigterm.is_set()
                   or bool(new_ckpt and latest.get("preempted")))  # this fit's preemption, not an earlier one
        if stopped and latest is not None and int(latest["step"]) < stage_cfg.max_steps:
            raise Preempted(stage, int(latest["step"]), str(folder))
        if error is not None:
            raise error
        if latest is None or int(latest["step"]) < stage_cfg.max_steps:
            raise RuntimeError(f"{stage} finished without a final checkpoint in {folder}")
        ckpt = latest["path"]
        adapter = adapter_of(ckpt)
        history = tracking.fetch_history(uri, run_id, None)
        if cfg.tracking.log_artifacts:
            tracking.log_final_artifacts(uri, run_id, adapter_dir=adapter, config_yaml=cfg.to_yaml(), history=history)
        tracking.set_tags(uri, run_id, {tracking.ADAPTER_TAG: str(Path(adapter).resolve())})
        tracking.end_run(uri, run_id, "FINISHED")
    except Preempted:
        _end_quietly(uri, run_id, "KILLED")
        raise
    except BaseException:
        _end_quietly(uri, run_id, "FAILED")
        raise
    finally:
        restore_handler()
    return StageResult(stage=stage, run_id=run_id, adapter_path=adapter, checkpoint_path=ckpt,
                       metrics=dict(result.metrics or {}), base_path=base_path,
                       elapsed_s=time.perf_counter() - t0, history=history)


def replay_spill(uri: str, folder: Path, stage: str, progress=echo) -> int:
    """Metrics the workers could not send (the store was down when they closed) wait in
    ``mlflow_buffer_<stage>.jsonl``; when the store is back by the time the driver gets here, send
    them now, so the user needs no replay command. Never raises: the file stays for
    ``raydpo tracking replay`` when this fails."""
    from raydpo import tracking

    spill = storage.spill_file(folder, stage)
    if not spill.exists() or tracking.check_store(uri) is not None:
        return 0
    try:
        n = tracking.replay_buffer(str(spill), uri)
    except Exception as e:  # noqa: BLE001 - the stage's own outcome matters more
        echo(f"warning: could not replay {spill} ({e.__class__.__name__}); later: "
             f"{tracking.REPLAY_COMMAND} {spill}")
        return 0
    progress(f"[{stage}] MLflow store reachable again: sent the {n} metric points buffered during the outage")
    return n


def _end_quietly(uri: str, run_id: str, status: str) -> None:
    """End the run on the way out of a failure; the store being down must not hide the error."""
    from raydpo import tracking

    try:
        tracking.end_run(uri, run_id, status)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        echo(f"warning: could not mark MLflow run {run_id} {status}: {e.__class__.__name__}")


class StorageError(RuntimeError):
    """``run.storage_path`` cannot hold checkpoints."""


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached."""


class DataError(ValueError):
    """The data cannot make even one training batch."""


class WorkerOOM(RuntimeError):
    """A worker ran out of memory (never retried)."""


class HubAccessError(RuntimeError):
    """A gated hub model and no token."""


# errors of the setup, not of training: the CLI prints their one line and exits 2 (DataSourceError:
# a source that cannot be read, or whose format cannot be told or rendered, e.g. no chat template)
SETUP_ERRORS = (StorageError, TrackingError, DataError, DataSourceError, HubAccessError, ResumeConfigError)


def run_pipeline(cfg: Config, progress=echo, restart: bool = False) -> tuple[StageResult, StageResult]:
    """SFT, then DPO from the SFT result with the SFT model as the reference. Rerun after a
    failure, a finished SFT is reused and DPO resumes from its latest checkpoint."""
    sft = fit_stage(cfg, "sft", progress=progress, restart=restart)
    dpo_cfg = cfg.with_overrides({"dpo.sft_adapter": sft.adapter_path})
    dpo = fit_stage(dpo_cfg, "dpo", tags={"raydpo.sft_run_id": sft.run_id or ""}, progress=progress, restart=restart)
    return sft, dpo

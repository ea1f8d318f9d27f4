"""Driver side: one stage as a Ray Train job tracked in MLflow, in named steps.

`fit_stage` reads top to bottom: `prepare_stage` (preflight, ``--restart``, the prior state),
`reuse_finished_stage`, Ray, the base (`raydpo.orchestration.base`), `open_run_and_stage_data`,
`build_trainer`, `fit`, `conclude`. No training maths here: that lives in `raydpo.train.loop`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raydpo import storage, storage_copy
from raydpo.config import Config, Stage, TrainStageConfig
from raydpo.orchestration.errors import Preempted, ResumeConfigError, WorkerOOM
from raydpo.tracking.terminal import echo


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


@dataclass
class StageRun:
    """What the steps of one stage share: `prepare_stage` fills the first fields, ``fit_stage``
    the base, `open_mlflow_run` the MLflow run."""

    cfg: Config  # with absolute paths: workers and Ray Data tasks may not share this cwd
    stage: Stage
    uri: str  # the MLflow tracking store
    folder: str  # the stage's folder (`stage_storage`): a local path or a URI
    prior: dict | None  # the newest intact checkpoint's trainer state, its "path" added; None if none
    record: dict  # the run record an earlier driver left in the folder ({} if none)
    fingerprint: dict  # `raydpo.config.resume_fingerprint`: what a resume must not change
    progress: Callable[[str], None]
    t0: float  # `time.perf_counter()` when the stage began
    base_path: str = ""
    tok_path: str = ""
    run_id: str = ""
    logged_through: int = 0  # the last step the MLflow run already has (a resume logs none twice)
    scoring: Any = None  # `raydpo.orchestration.reference.WorkerScoring`: the workers score the reference first
    scored_train: Any = None  # with ``scoring``: the gathered train split they score

    @property
    def stage_cfg(self) -> TrainStageConfig:
        return self.cfg.stage(self.stage)


def stage_datasets(cfg: Config, stage: Stage, base_path: str, tok_path: str, progress=echo):
    """(train, eval) lazy Ray datasets of a stage (SFT: its tokenized examples, packed by
    `raydpo.orchestration.ingest.sft_data`): the tokenized pairs the run reads, with the reference log-prob
    columns (computed once, `raydpo.orchestration.reference`) when DPO uses ``dpo.reference=precomputed`` and a
    loss that reads a reference (`DPOConfig.precomputed_reference`: none for simpo, orpo, sft)."""
    if stage == "dpo" and cfg.dpo.precomputed_reference:
        from raydpo.orchestration.reference import reference_datasets

        return reference_datasets(cfg, base_path, tok_path, progress=progress)
    if stage == "dpo" and not cfg.dpo.needs_reference:
        progress(f"[dpo] loss {'+'.join(cfg.dpo.loss_types)} reads no reference: no reference pass and no "
                 "reference forward in any step")
    from raydpo.data.pipeline import build_datasets, find_reach

    reach = find_reach(cfg, stage, tok_path)
    progress(f"[{stage}] the run reads {reach.describe()}: only those are tokenized")
    return build_datasets(cfg, stage, tok_path, reach)


def stage_storage(cfg: Config, stage: str) -> str:
    """Ray Train's folder of one stage's run: checkpoints, the MLflow run id, the stop file."""
    return storage.stage_dir(cfg.run.storage_path, cfg.run.name, stage)


def set_aside(folder: str) -> str | None:
    """``--restart``: move a stage's earlier folder out of the way (kept, never deleted)."""
    if not storage.exists(folder):
        return None
    dest = storage.set_aside_name(folder, time.strftime("%Y%m%d-%H%M%S"))
    storage.move(folder, dest)
    return dest


def _prior_state(folder: str, stage: str, run_name: str, fingerprint: dict) -> tuple[dict | None, dict]:
    """(newest intact checkpoint's trainer state or None, the folder's run record); a checkpoint
    of another ``fingerprint`` is a `ResumeConfigError` (not one on another number of workers:
    `resume_shape` keeps its global batch)."""
    from raydpo.config import fingerprint_diff
    from raydpo.train.checkpoint import verify_checkpoint
    from raydpo.train.worker import intact_checkpoints

    record = storage.read_json(storage.run_record(folder)) or {}
    ckpts = intact_checkpoints(folder)
    state = verify_checkpoint(ckpts[0]) if ckpts else None
    saved_fp = (state or {}).get("config") or record.get("fingerprint")
    if saved_fp:
        diff = fingerprint_diff(saved_fp, fingerprint)
        if diff:
            shown = ", ".join(f"{k} ({_fp_value(saved_fp, k)!r} -> {_fp_value(fingerprint, k)!r})" for k in diff[:8])
            more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
            raise ResumeConfigError(
                f"{stage}: run '{run_name}' has a checkpoint in {folder} made with another config: {shown}{more}. "
                "Rerun with the same config to resume it, or pass --restart to start over (the old folder is kept)")
    if state is not None:
        state["path"] = str(ckpts[0])
    return state, record


def _fp_value(fp: dict, key: str) -> Any:
    from raydpo.config.fingerprint import STAGES, global_batch

    stage = key.split(".")[0]
    if key == f"{stage}.global_batch" and stage in STAGES:  # older fingerprints lack it
        return global_batch(fp, stage)
    return fp.get(key, "<unset>")


def resume_shape(cfg: Config, stage: Stage, prior: dict | None, fingerprint: dict,
                 progress) -> tuple[Config, dict]:
    """(config, fingerprint) a stage resumes ``prior`` (`_prior_state`'s checkpoint) with: on
    another number of workers, the gradient accumulation that keeps the checkpoint's global batch
    (`raydpo.config.fingerprint.keep_global_batch`, said in one line), or a `ResumeConfigError`
    naming the numbers and the choices. A finished stage, reused as it is, keeps both."""
    from raydpo.config.fingerprint import keep_global_batch

    if not (prior or {}).get("config") or (int(prior["step"]) >= cfg.stage(stage).max_steps
                                           and not prior.get("preempted")):
        return cfg, fingerprint
    try:
        cfg, fingerprint, line = keep_global_batch(cfg, stage, prior["config"], fingerprint)
    except ValueError as e:
        raise ResumeConfigError(str(e)) from None
    if line:
        progress(line)
    return cfg, fingerprint


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
    the stage builds its own from ``cfg.data``. ``base``: (base, tokenizer) paths resolved by the
    caller (a search merges the SFT adapter once); by default `stage_base`."""
    from raydpo.config import resume_fingerprint
    from raydpo.orchestration.base import stage_base
    from raydpo.orchestration.resources import training_needs, wait_for_resources
    from raydpo.orchestration.nodes import check_job_storage, check_nodes_share
    from raydpo.orchestration.ray_connect import ensure_ray

    t0 = time.perf_counter()
    check_job_storage(cfg)
    run = prepare_stage(cfg.with_absolute_paths(), stage, restart, progress, t0, resume_fingerprint(cfg))
    finished = reuse_finished_stage(run)
    if finished is not None:
        return finished
    warm = threading.Thread(target=warm_imports, name="raydpo-warm-imports", daemon=True)
    warm.start()  # the driver's own heavy imports load while Ray starts (its processes, not this one, are busy)
    ensure_ray()
    warm.join()
    wait_for_resources(run.cfg, training_needs(run.cfg), stage, progress)  # a cold cluster: ask, wait
    check_nodes_share(run.cfg, run.uri)  # after the wait: the worker nodes exist
    run.base_path, run.tok_path = base or stage_base(run.cfg, stage, progress)
    stream, eval_ds, restore_handler, sigterm = open_run_and_stage_data(run, datasets, parent_run_id, tags, params)
    try:
        trainer = build_trainer(run, stream, eval_ds, callbacks or [], report_eval_only)
        result, error = fit(trainer)
        if run.scoring is not None:
            from raydpo.orchestration.reference import commit_scoring

            commit_scoring(run.scoring, progress)
        return conclude(run, result, error, sigterm)
    except Preempted:
        _end_quietly(run.uri, run.run_id, "KILLED")
        raise
    except BaseException:
        _end_quietly(run.uri, run.run_id, "FAILED")
        raise
    finally:
        restore_handler()


def warm_imports() -> None:
    """Import what the driver needs next (torch for Ray Train, MLflow for the run, transformers
    for the tokenizer: about 4 s on 2 cores) in a thread while ``ray.init`` waits for Ray's
    processes to start. Joined before anything else imports, so no two threads import the same
    module at once."""
    try:
        import torch  # noqa: F401
        import mlflow  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
    except Exception:  # noqa: BLE001 - only a head start: the real imports later raise what is wrong
        pass


def prepare_stage(cfg: Config, stage: Stage, restart: bool, progress, t0: float, fingerprint: dict) -> StageRun:
    """Before Ray starts: `preflight` (one line per problem), ``--restart``'s set-aside, and what
    an earlier run of the stage left (a ``fingerprint`` other than its checkpoint's is a
    `ResumeConfigError`)."""
    from raydpo.orchestration.checks import preflight

    uri = preflight(cfg)
    folder = stage_storage(cfg, stage)
    if restart and (moved := set_aside(folder)) is not None:
        progress(f"[{stage}] --restart: the earlier run's folder is kept as {moved}")
    prior, record = _prior_state(folder, stage, cfg.run.name, fingerprint)
    cfg, fingerprint = resume_shape(cfg, stage, prior, fingerprint, progress)  # another number of workers
    return StageRun(cfg=cfg, stage=stage, uri=uri, folder=folder, prior=prior, record=record,
                    fingerprint=fingerprint, progress=progress, t0=t0)


def reuse_finished_stage(run: StageRun) -> StageResult | None:
    """The result of a stage whose newest checkpoint is its last step (not a preemption's), which
    is not run again: its MLflow run gets the wrap-up an earlier driver died before; else None."""
    from raydpo import tracking

    prior, uri = run.prior, run.uri
    if prior is None or int(prior["step"]) < run.stage_cfg.max_steps or prior.get("preempted"):
        return None
    run.progress(f"[{run.stage}] already finished at step {prior['step']} ({prior['path']}): reusing it")
    run_id = run.record.get("run_id")
    adapter = str(storage.adapter_dir(prior["path"]))
    hist = tracking.fetch_history(uri, run_id, None) if run_id and tracking.run_exists(uri, run_id) else []
    if run_id and tracking.run_exists(uri, run_id):
        if tracking.ADAPTER_TAG not in tracking.run_tags(uri, run_id):  # it died before its wrap-up
            _log_adapter(run.cfg, uri, run_id, adapter, hist)
        tracking.end_run(uri, run_id, "FINISHED")  # an earlier driver may have died before ending it
    return StageResult(stage=run.stage, run_id=run_id, adapter_path=adapter,
                       checkpoint_path=prior["path"], metrics=hist[-1] if hist else {},
                       base_path=run.record.get("base_path", ""), elapsed_s=time.perf_counter() - run.t0,
                       history=hist)


def open_run_and_stage_data(run: StageRun, datasets: tuple[Any, Any] | None, parent_run_id: str | None,
                            tags: dict[str, str] | None, params: dict[str, str] | None):
    """`open_mlflow_run` (a new store's tables alone take ~2 s) in a thread while this one runs
    `stage_data` (mostly waiting on Ray Data); then `_claim_folder`. Returns (stream, eval split,
    SIGTERM handler's restore, its event). A data error ends an opened MLflow run FAILED."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raydpo-mlflow") as pool:
        opened = pool.submit(open_mlflow_run, run, parent_run_id, tags, params)
        try:
            stream, eval_ds = stage_data(run, datasets)
        except BaseException:
            if opened.exception() is None:
                _end_quietly(run.uri, run.run_id, "FAILED")
            raise
        run.progress(opened.result())
    return (stream, eval_ds, *_claim_folder(run))


def open_mlflow_run(run: StageRun, parent_run_id: str | None, tags: dict[str, str] | None,
                    params: dict[str, str] | None) -> str:
    """``run.run_id``: the MLflow run the run record names, reopened (``run.logged_through`` set),
    or a new one with the config as params; returns the line that says which."""
    from raydpo import tracking

    cfg, stage, uri, prior = run.cfg, run.stage, run.uri, run.prior
    exp_id = tracking.setup_experiment(uri, cfg.tracking.experiment_name)
    run_id = run.record.get("run_id")
    if run_id and tracking.run_exists(uri, run_id):
        tracking.reopen_run(uri, run_id)
        run.logged_through = tracking.max_logged_step(uri, run_id)
        at = f"step {prior['step']}" if prior else "step 0 (no checkpoint was written)"
        line = (f"[{stage}] resuming run '{cfg.run.name}' from {at} in MLflow run {run_id} "
                f"(steps <= {run.logged_through} are already logged)")
    else:
        run_id = tracking.start_run(uri, exp_id, f"{cfg.tracking.run_name or cfg.run.name}-{stage}",
                                    parent_run_id=parent_run_id, tags={tracking.STAGE_TAG: stage, **(tags or {})})
        tracking.log_params(uri, run_id, {**cfg.flat(), **(params or {})})
        line = f"[{stage}] MLflow run {run_id} in {uri}"
    run.run_id = run_id
    return line


def _claim_folder(run: StageRun) -> tuple[Callable[[], None], threading.Event]:
    """The run record (a rerun finds its MLflow run and checks its config against it), no stop
    file or OOM marker left from an earlier fit, and SIGTERM on the driver -> the stop file."""
    from raydpo.config import fingerprint_hash
    from raydpo.orchestration.preemption import install_driver_handler

    folder = run.folder
    storage.makedirs(folder)
    storage.write_text(storage.run_record(folder), json.dumps({
        "run_id": run.run_id, "tracking_uri": run.uri, "base_path": run.base_path,
        "fingerprint": run.fingerprint, "config_hash": fingerprint_hash(run.fingerprint)}))
    for stale in (storage.stop_file(folder), storage.oom_marker(folder)):
        storage.remove(stale)
    return install_driver_handler(storage.stop_file(folder))


def stage_data(run: StageRun, datasets: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """(the ordered training stream, the materialized eval split or None). An empty eval split is
    dropped with a warning; too few training rows for one batch is a `DataError`."""
    from raydpo.orchestration.checks import check_batch_fits
    from raydpo.orchestration.ingest import gather_split, ordered_stream, sft_data

    cfg, stage, stage_cfg = run.cfg, run.stage, run.stage_cfg
    if stage == "sft" and datasets is None:  # packed after the order (raydpo.data.packing)
        stream, eval_ds = sft_data(cfg, run.tok_path, run.progress)
        if eval_ds is None:
            run.progress("[sft] warning: the eval split is empty; training runs without evaluation")
        return stream, eval_ds
    if datasets is None and stage == "dpo" and cfg.dpo.precomputed_reference:
        from raydpo.orchestration.reference import fit_reference

        datasets = fit_reference(cfg, run.base_path, run.tok_path, run.progress)
        run.scoring, datasets = datasets[2], datasets[:2]
    train_ds, eval_ds = datasets or stage_datasets(cfg, stage, run.base_path, run.tok_path, run.progress)
    if eval_ds is not None:
        eval_ds = eval_ds.materialize()  # evaluated many times: tokenize it once
        if eval_ds.count() == 0:
            run.progress(f"[{stage}] warning: the eval split is empty; training runs without evaluation")
            eval_ds = None
    train_ds = gather_split(train_ds)
    run.scored_train = train_ds if run.scoring is not None else None
    n_train = train_ds.count()
    global_batch = check_batch_fits(stage, n_train, "pairs", cfg.scaling.num_workers, stage_cfg.per_device_batch_size)
    stream = ordered_stream(train_ds, n_train, seed=cfg.data.seed, global_batch=global_batch,
                            micro_batches=stage_cfg.max_steps * stage_cfg.gradient_accumulation_steps,
                            num_cpus=cfg.data.tokenize_num_cpus)  # sorted once, read whole by every worker
    return stream, eval_ds


def build_trainer(run: StageRun, stream, eval_ds, callbacks: list, report_eval_only: bool):
    """The stage's TorchTrainer: every worker gets `WorkerInputs`, the stream and the eval split;
    checkpoints land in the stage folder, ranked by `SCORE_KEY`; fatal errors are not retried."""
    import ray.train

    from raydpo.orchestration.ingest import data_config, eval_prompts
    from raydpo.orchestration.ray_callbacks import SigtermToStop, fatal_trainer
    from raydpo.train.deepspeed import comm_backend
    from raydpo.train.faults import ENV as FAULTS_ENV
    from raydpo.train.inputs import WorkerInputs
    from raydpo.train.checkpoint import SCORE_KEY
    from raydpo.train.worker import train_loop_per_worker

    cfg, stage, folder, s = run.cfg, run.stage, run.folder, run.cfg.scaling
    return fatal_trainer()(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config=WorkerInputs(
            config=cfg.to_dict(), stage=stage, base_path=run.base_path, tokenizer_path=run.tok_path,
            tracking_uri=run.uri, run_id=run.run_id, report_eval_only=report_eval_only,
            has_eval=eval_ds is not None, storage_dir=folder,
            fingerprint=run.fingerprint, logged_through_step=run.logged_through,
            faults=os.environ.get(FAULTS_ENV, ""),
            eval_prompts=eval_prompts(eval_ds, cfg.generations.num_prompts)
            if stage == "dpo" and cfg.generations.enabled and eval_ds is not None else [],
            score_reference=run.scoring.building if run.scoring is not None else "",
        ).to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=s.worker_resources()
        ),
        torch_config=ray.train.torch.TorchConfig(backend=comm_backend(s.use_gpu),
                                                 timeout_s=math.ceil(s.collective_timeout())),
        datasets={"train": stream, **({"eval": eval_ds} if eval_ds is not None else {}), **scored_splits(run, eval_ds)},
        dataset_config=data_config(),
        run_config=ray.train.RunConfig(
            name=storage.name(folder),
            storage_path=storage.parent(folder),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                         checkpoint_score_attribute=SCORE_KEY,
                                                         checkpoint_score_order="max"),
            callbacks=[SigtermToStop(), *callbacks],
        ),
    )


def scored_splits(run: StageRun, eval_ds) -> dict[str, Any]:
    """The splits the workers score at the fit's start (`WorkerScoring`), each read whole by every
    worker (`raydpo.train.ref_scoring`): the train split (before its ordering) and the eval split."""
    if run.scoring is None:
        return {}
    from raydpo.train.ref_scoring import dataset_name

    return {dataset_name("train"): run.scored_train, **({dataset_name("eval"): eval_ds} if eval_ds is not None else {})}


def fit(trainer) -> tuple[Any, BaseException | None]:
    """(Ray's result or None, the stage's error or None)."""
    try:
        result = trainer.fit()
        return result, result.error
    except Exception as e:  # noqa: BLE001 - Train V2 raises TrainingFailedError from fit()
        return None, e


def conclude(run: StageRun, result, error: BaseException | None, sigterm: threading.Event) -> StageResult:
    """After the fit: buffered metrics sent, then the first outcome that holds: a worker's OOM
    (`WorkerOOM`), a stop before the last step (`Preempted`), the fit's own error, no final
    checkpoint; else the final adapter is logged and the MLflow run ends FINISHED."""
    from raydpo import tracking

    cfg, stage, folder, uri = run.cfg, run.stage, run.folder, run.uri
    tracking.replay_spill(uri, folder, stage, run.progress)
    oom = storage.read_json(storage.oom_marker(folder))
    if oom is not None:
        raise WorkerOOM(oom["message"]) from None
    try:
        latest, _ = _prior_state(folder, stage, cfg.run.name, run.fingerprint)
    except Exception:  # noqa: BLE001 - never hide the stage's own error behind this one
        if error is not None:
            raise error from None
        raise
    max_steps = run.stage_cfg.max_steps
    new_ckpt = latest is not None and (run.prior is None or latest["path"] != run.prior["path"])
    stopped = (storage.exists(storage.stop_file(folder)) or sigterm.is_set()
               or bool(new_ckpt and latest.get("preempted")))  # this fit's preemption, not an earlier one
    if stopped and latest is not None and int(latest["step"]) < max_steps:
        raise Preempted(stage, int(latest["step"]), folder)
    if error is not None:
        raise error
    if latest is None or int(latest["step"]) < max_steps:
        raise RuntimeError(f"{stage} finished without a final checkpoint in {folder}")
    ckpt = latest["path"]
    adapter = str(storage.adapter_dir(ckpt))
    history = tracking.fetch_history(uri, run.run_id, None)
    _log_adapter(cfg, uri, run.run_id, adapter, history)
    tracking.end_run(uri, run.run_id, "FINISHED")
    return StageResult(stage=stage, run_id=run.run_id, adapter_path=adapter, checkpoint_path=ckpt,
                       metrics=dict(result.metrics or {}), base_path=run.base_path,
                       elapsed_s=time.perf_counter() - run.t0, history=history)


def _log_adapter(cfg: Config, uri: str, run_id: str, adapter: str, history: list[dict[str, float]]) -> None:
    """A finished stage's wrap-up: its artifacts (if ``tracking.log_artifacts``) and the adapter
    tag, which marks the wrap-up as done."""
    from raydpo import tracking

    if cfg.tracking.log_artifacts:
        tracking.log_final_artifacts(uri, run_id, adapter_dir=storage_copy.local_copy(adapter), config_yaml=cfg.to_yaml(), history=history)
    tracking.set_tags(uri, run_id, {tracking.ADAPTER_TAG: adapter})


def _end_quietly(uri: str, run_id: str, status: str) -> None:
    """End the run on the way out of a failure; the store being down must not hide the error."""
    from raydpo import tracking

    try:
        tracking.end_run(uri, run_id, status)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        echo(f"warning: could not mark MLflow run {run_id} {status}: {e.__class__.__name__}")


def run_pipeline(cfg: Config, progress=echo, restart: bool = False) -> tuple[StageResult, StageResult]:
    """SFT, then DPO from the SFT result with the SFT model as the reference. Rerun after a
    failure, a finished SFT is reused and DPO resumes from its latest checkpoint."""
    from raydpo import tracking

    sft = fit_stage(cfg, "sft", progress=progress, restart=restart)
    dpo_cfg = cfg.with_overrides({"dpo.sft_adapter": sft.adapter_path})
    dpo = fit_stage(dpo_cfg, "dpo", tags={tracking.SFT_RUN_TAG: sft.run_id or ""}, progress=progress, restart=restart)
    return sft, dpo

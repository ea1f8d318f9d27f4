"""Ray Train adapter: the only code that calls ``ray.train.*`` inside workers.

``train_loop_per_worker`` receives everything as plain data (the config dict, paths, the MLflow
run id), rebuilds the typed config first thing, and hands the stage to `raydpo.train.loop`.

Where it resumes from: Ray's restored checkpoint (after a worker failure, or a rerun under the
same ``run.name``), verified file by file; if that one is damaged, the newest intact checkpoint
of the stage's storage folder; never a half-written one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from raydpo import storage
from raydpo.train.inputs import WorkerInputs


def oom_message(stage: str, cfg) -> str:
    st = cfg.stage(stage)
    return (f"{stage}: out of memory on a worker (not retried: a restart would run out again). Make a step smaller: "
            f"{stage}.per_device_batch_size={st.per_device_batch_size} (raise gradient_accumulation_steps="
            f"{st.gradient_accumulation_steps} to keep the batch), data.max_length={cfg.data.max_length}, "
            f"model.gradient_checkpointing={cfg.model.gradient_checkpointing}, deepspeed.stage={cfg.deepspeed.stage} "
            f"(3 shards the weights), deepspeed.offload_optimizer={cfg.deepspeed.offload_optimizer}, "
            f"quantization.mode={cfg.quantization.mode}")


def resume_candidates(restored, storage_dir: str | None, progress) -> list[tuple[int, str, bool]]:
    """This rank's intact checkpoints as (step, folder, is a temporary copy), newest first: Ray's
    restored one (the checkpoint it registered last, verified file by file) and those of the
    stage folder (a preemption checkpoint whose report never reached Ray, or older intact ones
    when Ray's is damaged)."""
    from raydpo.train.loop import CheckpointError, verify_checkpoint

    found: list[tuple[int, str, bool]] = []
    if restored is not None:
        local = restored.to_directory(tempfile.mkdtemp(prefix="raydpo-resume-"))
        try:
            found.append((int(verify_checkpoint(local)["step"]), local, True))
        except CheckpointError as e:
            progress(f"warning: the latest checkpoint is unusable ({e}); looking for an older intact one")
            shutil.rmtree(local, ignore_errors=True)
    for cand in intact_checkpoints(storage_dir):
        found.append((int(verify_checkpoint(cand)["step"]), str(cand), False))
    return sorted(found, key=lambda t: (-t[0], t[2]))


def agree_on_resume(found: list[tuple[int, str, bool]], device, rank: int) -> tuple[str | None, bool]:
    """Every rank resumes from the same step: rank 0's newest; each rank then loads its own
    intact copy of that step (or fails, naming it, rather than train from another step)."""
    import torch
    import torch.distributed as dist

    from raydpo.train.loop import CheckpointError

    want = torch.tensor([found[0][0] if found else -1], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(want, src=0)
    step = int(want.item())
    for s, path, is_copy in found:
        if s == step:
            break
    else:
        path, is_copy = None, False
        if step >= 0:
            raise CheckpointError(f"rank {rank} has no intact copy of the step-{step} checkpoint rank 0 resumes from")
    for s, other, copy in found:  # the temporary copies this rank does not use
        if copy and other != path:
            shutil.rmtree(other, ignore_errors=True)
    return path, is_copy


def intact_checkpoints(storage_dir: str | None) -> list[Path]:
    """The stage's checkpoint folders that pass `verify_checkpoint`, newest step first."""
    from raydpo.train.loop import CheckpointError, verify_checkpoint

    if not storage_dir or not Path(storage_dir).is_dir():
        return []
    found = []
    for d in storage.checkpoints(storage_dir):
        try:
            found.append((int(verify_checkpoint(d)["step"]), d))
        except CheckpointError:
            continue
    return [d for _, d in sorted(found, key=lambda t: -t[0])]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function; ``config`` is `WorkerInputs.to_dict()`."""
    import json
    import os

    import ray.train
    import ray.train.torch
    import torch

    from raydpo.config import Config
    from raydpo.data.ray_collate import DPOCollate, SFTCollate
    from raydpo.models.factory import load_model
    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.tracking import make_logger
    from raydpo.data.order import rank_batches
    from raydpo.train.loop import Hooks, env_from_torch, run_stage, set_torch_threads
    from raydpo.train.preempt import StopWatch

    inputs = WorkerInputs.from_dict(config)
    cfg = Config.from_dict(inputs.config)
    stage = inputs.stage
    stage_cfg = cfg.stage(stage)
    env = env_from_torch(cfg.scaling.use_gpu)
    threads = set_torch_threads(cfg.scaling)
    if cfg.scaling.use_gpu:
        env.device = ray.train.torch.get_device()
    storage_dir = inputs.storage_dir

    def progress(line: str) -> None:
        if env.rank == 0:
            print(line, flush=True)

    oom = storage.oom_marker(storage_dir) if storage_dir else None
    if oom is not None and oom.exists():  # a restart after an OOM would only run out again
        raise RuntimeError(json.loads(oom.read_text())["message"])

    tokenizer = load_tokenizer(inputs.tokenizer_path, revision=cfg.model.revision)
    torch.manual_seed(stage_cfg.seed)  # the fresh adapter's init: the same on every rank and every run
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=inputs.base_path, device=env.device)

    collate = (DPOCollate(tokenizer.pad_token_id, cfg.dpo.share_prefix, cfg.dpo.padding_free) if stage == "dpo"
               else SFTCollate())
    train_shard = ray.train.get_dataset_shard("train")  # the whole ordered stream (raydpo.orchestration.ingest)
    # an empty eval split is not passed (launch.fit_stage warns): train without evaluation
    eval_shard = ray.train.get_dataset_shard("eval") if inputs.has_eval else None
    bs = stage_cfg.per_device_batch_size

    def train_batches(skip: int):
        return rank_batches(lambda n: train_shard.iter_batches(batch_size=n, batch_format="numpy", drop_last=True),
                            bs, env.world_size, env.rank, collate, skip)

    def eval_batches():
        return iter(eval_shard.iter_torch_batches(batch_size=bs, collate_fn=collate)) if eval_shard else iter(())

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    found = resume_candidates(ray.train.get_checkpoint(), storage_dir, progress)
    resume_dir, resume_copy = agree_on_resume(found, env.device, env.rank)
    progress(f"[{stage}] {env.world_size} worker(s), {threads} torch thread(s) each")

    # steps an earlier attempt already logged are not logged again: ask the store (a worker
    # restart within this fit logged past what the driver saw); if it is down, what the driver saw
    skip_through = inputs.logged_through_step
    if env.rank == 0 and inputs.run_id and (resume_dir or skip_through):
        from raydpo.tracking import check_store, max_logged_step

        if check_store(inputs.tracking_uri, timeout_s=5) is None:
            skip_through = max(skip_through, max_logged_step(inputs.tracking_uri, inputs.run_id))
    logger = make_logger(inputs.tracking_uri, inputs.run_id, env.rank, buffered=True,
                         skip_through_step=skip_through or None)
    log, exporter = logger.log_metrics, None
    if env.rank == 0:  # metrics are already all-reduced: one exporter, as one MLflow logger
        from raydpo.tracking.prometheus import TrainMetricsExporter

        exporter = TrainMetricsExporter(stage, cfg.tracking.experiment_name, cfg.tracking.run_name or cfg.run.name)
        log = exporter.wrap(log)

    watch = StopWatch(str(storage.stop_file(storage_dir)) if storage_dir else None)
    hooks = Hooks(train_batches=train_batches, eval_batches=eval_batches, report=report,
                  log=log, resume_dir=resume_dir, progress=progress,
                  report_eval_only=inputs.report_eval_only,
                  stop_requested=watch.requested, config_fingerprint=inputs.fingerprint,
                  faults=inputs.faults, faults_dir=str(storage.faults_dir(storage_dir)) if storage_dir else None,
                  # chosen once on the driver (launch.fit_stage): every rank generates the same prompts
                  eval_prompts=lambda k: list(inputs.eval_prompts)[:k],
                  log_generations=logger.log_generations)
    try:
        run_stage(stage, cfg, model, tokenizer, env, hooks)
    except torch.OutOfMemoryError:
        msg = oom_message(stage, cfg)
        if oom is not None:
            oom.parent.mkdir(parents=True, exist_ok=True)
            oom.write_text(json.dumps({"message": msg, "rank": env.rank, "pid": os.getpid()}))
        raise RuntimeError(msg) from None
    finally:
        watch.close()
        spill = str(storage.spill_file(storage_dir, stage)) if storage_dir else None
        if hasattr(logger, "close"):
            logger.close(timeout_s=10, spill_path=spill)
        if exporter is not None:
            exporter.close()
        if resume_dir and resume_copy:
            shutil.rmtree(resume_dir, ignore_errors=True)

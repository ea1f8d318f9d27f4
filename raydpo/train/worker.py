"""Ray Train adapter: the only code that calls ``ray.train.*`` inside workers.

``train_loop_per_worker`` receives everything as plain data (the config dict, paths, the MLflow
run id), rebuilds the typed config first thing, and hands the stage to `raydpo.train.loop`.

Where it resumes from: Ray's restored checkpoint (after a worker failure, or a rerun under the
same ``run.name``), verified file by file; if that one is damaged, the newest intact checkpoint
of the stage's storage folder; never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from raydpo import storage
from raydpo.train.inputs import WorkerInputs

if TYPE_CHECKING:
    from raydpo.config import Config
    from raydpo.train.engine import WorkerEnv


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
    when Ray's is damaged; in an object store until `agree_on_resume` downloads the one used)."""
    from raydpo.train.checkpoint import CheckpointError, verify_checkpoint

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
    intact copy of that step (or fails, naming it, rather than train from another step). A copy
    in an object store is downloaded to a temporary folder first."""
    import torch
    import torch.distributed as dist

    from raydpo.train.checkpoint import CheckpointError

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
    if path is not None and storage.is_remote(path):
        local = tempfile.mkdtemp(prefix="raydpo-resume-")
        storage.copy_tree(path, local)
        path, is_copy = local, True
    return path, is_copy


def intact_checkpoints(storage_dir: str | None) -> list[Path]:
    """The stage's checkpoint folders that pass `verify_checkpoint`, newest step first."""
    from raydpo.train.checkpoint import CheckpointError, verify_checkpoint

    if not storage_dir or not storage.is_dir(storage_dir):
        return []
    found = []
    for d in storage.checkpoints(storage_dir):
        try:
            found.append((int(verify_checkpoint(d)["step"]), d))
        except CheckpointError:
            continue
    return [d for _, d in sorted(found, key=lambda t: -t[0])]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function; ``config`` is `WorkerInputs.to_dict()`. Every rank takes these
    steps in this order: agreeing on the resume step is a collective."""
    import ray.train
    import torch

    from raydpo.train.loop import Hooks, run_stage
    from raydpo.train.preempt import StopWatch, drain_notice

    inputs = WorkerInputs.from_dict(config)
    cfg, env, threads = worker_setup(inputs)
    progress = rank0_printer(env.rank)
    refuse_after_oom(inputs.storage_dir)
    tokenizer, model = load_policy(inputs, cfg, env)
    refs = score_reference(inputs, cfg, model, tokenizer.pad_token_id, env, progress)
    train_batches, eval_batches = ray_batches(inputs, cfg, tokenizer.pad_token_id, env, refs)
    found = resume_candidates(ray.train.get_checkpoint(), inputs.storage_dir, progress)
    resume_dir, resume_copy = agree_on_resume(found, env.device, env.rank)
    progress(f"[{inputs.stage}] {env.world_size} worker(s), {threads} torch thread(s) each")
    logger, exporter, log = open_logging(inputs, cfg, env.rank, resume_dir)

    storage_dir = inputs.storage_dir
    watch = StopWatch(storage.stop_file(storage_dir) if storage_dir else None, drain=drain_notice, say=progress)
    hooks = Hooks(train_batches=train_batches, eval_batches=eval_batches, report=report_to_ray,
                  log=log, resume_dir=resume_dir, progress=progress,
                  report_eval_only=inputs.report_eval_only,
                  stop_requested=watch.requested, config_fingerprint=inputs.fingerprint,
                  faults=inputs.faults, faults_dir=storage.faults_dir(storage_dir) if storage_dir else None,
                  # chosen once on the driver (launch.build_trainer): every rank generates the same prompts
                  eval_prompts=lambda k: list(inputs.eval_prompts)[:k],
                  log_generations=logger.log_generations)
    try:
        run_stage(inputs.stage, cfg, model, tokenizer, env, hooks)
    except torch.OutOfMemoryError:
        raise RuntimeError(record_oom(inputs, cfg, env.rank)) from None
    finally:
        watch.close()
        close_logging(logger, exporter, inputs)
        if resume_dir and resume_copy:
            shutil.rmtree(resume_dir, ignore_errors=True)


def worker_setup(inputs: WorkerInputs) -> tuple[Config, WorkerEnv, int]:
    """The typed config, this rank's `WorkerEnv` (on GPU, the device Ray Train gave it) and the
    number of torch threads it runs."""
    import ray.train.torch

    from raydpo.config import Config
    from raydpo.train.engine import env_from_torch, set_torch_threads

    cfg = Config.from_dict(inputs.config)
    env = env_from_torch(cfg.scaling.use_gpu)
    threads = set_torch_threads(cfg.scaling)
    if cfg.scaling.use_gpu:
        env.device = ray.train.torch.get_device()
    return cfg, env, threads


def rank0_printer(rank: int) -> Callable[[str], None]:
    def progress(line: str) -> None:
        if rank == 0:
            print(line, flush=True)
    return progress


def refuse_after_oom(storage_dir: str | None) -> None:
    """A restart after an out-of-memory failure would only run out again: fail with its message."""
    oom = storage.read_json(storage.oom_marker(storage_dir)) if storage_dir else None
    if oom is not None:
        raise RuntimeError(oom["message"])


def record_oom(inputs: WorkerInputs, cfg: Config, rank: int) -> str:
    """The out-of-memory message, written where a restarted worker finds it (`refuse_after_oom`)."""
    msg = oom_message(inputs.stage, cfg)
    if inputs.storage_dir:
        storage.write_text(storage.oom_marker(inputs.storage_dir),
                           json.dumps({"message": msg, "rank": rank, "pid": os.getpid()}))
    return msg


def load_policy(inputs: WorkerInputs, cfg: Config, env: WorkerEnv):
    """The tokenizer and the model the stage trains, on this rank's device: a fresh adapter, or
    for DPO with ``dpo.sft_reference: adapter`` the SFT adapter and its frozen reference copy
    (`raydpo.models.factory.load_stage_model`)."""
    import torch

    from raydpo.data.tokenizer import load_tokenizer
    from raydpo.models.factory import load_stage_model
    from raydpo.train.deepspeed import engine_cast_dtype

    tokenizer = load_tokenizer(inputs.tokenizer_path, revision=cfg.model.revision)
    torch.manual_seed(cfg.stage(inputs.stage).seed)  # the fresh adapter's init: the same on every rank and every run
    model = load_stage_model(cfg, inputs.stage, base_path=inputs.base_path, device=env.device,
                             engine_dtype=engine_cast_dtype(cfg, env.use_gpu))
    return tokenizer, model


def score_reference(inputs: WorkerInputs, cfg: Config, model, pad_token_id: int, env: WorkerEnv, progress):
    """The reference log-probs this fit's workers score before training (`raydpo.train.ref_scoring`),
    or None when the data carries them or the loss reads none."""
    if not inputs.score_reference:
        return None
    import ray.train

    from raydpo.train.ref_scoring import dataset_name, score_reference as score

    def rows(split: str):
        return lambda n: ray.train.get_dataset_shard(dataset_name(split)).iter_batches(batch_size=n,
                                                                                        batch_format="numpy")

    splits = {"train": rows("train"), **({"eval": rows("eval")} if inputs.has_eval else {})}
    return score(model, splits, inputs.score_reference, pad_token_id=pad_token_id, dpo=cfg.dpo, device=env.device,
                 rank=env.rank, world=env.world_size, progress=progress)


def ray_batches(inputs: WorkerInputs, cfg: Config, pad_token_id: int, env: WorkerEnv, refs=None):
    """``(train_batches(skip), eval_batches())`` of `Hooks`, read from this worker's Ray Data shards;
    with ``refs`` (`raydpo.train.ref_scoring.RefTable`) each batch gets its reference columns by ``row_id``."""
    import ray.train

    from raydpo.data.collate import rank_cost
    from raydpo.data.order import rank_batches, rank_eval_batches
    from raydpo.data.ray_collate import DPOCollate, SFTCollate

    collate = (DPOCollate(pad_token_id, cfg.dpo.share_prefix, cfg.dpo.padding_free) if inputs.stage == "dpo"
               else SFTCollate())
    train_shard = ray.train.get_dataset_shard("train")  # the whole ordered stream (raydpo.orchestration.ingest)
    # an empty eval split is not passed (launch.stage_data warns): train without evaluation
    eval_shard = ray.train.get_dataset_shard("eval") if inputs.has_eval else None  # whole too: rank_eval_batches
    bs = cfg.stage(inputs.stage).per_device_batch_size

    def train_batches(skip: int):
        def numpy_batches(n: int):
            it = train_shard.iter_batches(batch_size=n, batch_format="numpy", drop_last=True)
            return it if refs is None else map(refs.attach, it)

        return rank_batches(numpy_batches, bs, env.world_size, env.rank, collate, skip, cost=rank_cost(inputs.stage, cfg.dpo))

    def eval_batches():
        if eval_shard is None:
            return iter(())
        return rank_eval_batches(lambda n: eval_shard.iter_batches(batch_size=n, batch_format="numpy"), bs,
                                 env.world_size, env.rank, collate if refs is None else lambda b: collate(refs.attach(b)))

    return train_batches, eval_batches


def report_to_ray(metrics: dict[str, float], ckpt_dir: str | None) -> None:
    """`Hooks.report`: Ray Train takes the metrics and a copy of the checkpoint; the local one goes."""
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
    ray.train.report(metrics, checkpoint=ckpt)
    if ckpt_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def open_logging(inputs: WorkerInputs, cfg: Config, rank: int, resume_dir: str | None):
    """``(logger, exporter or None, log)``: rank 0's buffered MLflow logger, whose ``log`` also feeds
    the Prometheus exporter; other ranks' no-op logger."""
    from raydpo.tracking import make_logger

    # steps an earlier attempt already logged are not logged again: ask the store (a worker
    # restart within this fit logged past what the driver saw); if it is down, what the driver saw
    skip_through = inputs.logged_through_step
    if rank == 0 and inputs.run_id and (resume_dir or skip_through):
        from raydpo.tracking import check_store, max_logged_step

        if check_store(inputs.tracking_uri, timeout_s=5) is None:
            skip_through = max(skip_through, max_logged_step(inputs.tracking_uri, inputs.run_id))
    logger = make_logger(inputs.tracking_uri, inputs.run_id, rank, buffered=True,
                         skip_through_step=skip_through or None)
    log, exporter = logger.log_metrics, None
    if rank == 0:  # metrics are already all-reduced: one exporter, as one MLflow logger
        from raydpo.tracking.prometheus import TrainMetricsExporter

        exporter = TrainMetricsExporter(inputs.stage, cfg.tracking.experiment_name,
                                        cfg.tracking.run_name or cfg.run.name)
        log = exporter.wrap(log)
    return logger, exporter, log


def close_logging(logger, exporter, inputs: WorkerInputs) -> None:
    """Flush what the logger holds (what the store does not take in time is spilled to the stage
    folder), then stop the exporter."""
    spill = storage.spill_file(inputs.storage_dir, inputs.stage) if inputs.storage_dir else None
    if hasattr(logger, "close"):
        logger.close(timeout_s=10, spill_path=spill)
    if exporter is not None:
        exporter.close()

"""Ray Train adapter: the only code that calls ``ray.train.*`` inside workers.

``train_loop_per_worker`` receives everything as plain data (the config dict, paths, the MLflow
run id), rebuilds the typed config first thing, and hands the stage to `raydpo.train.loop`.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raydpo.config import Config
    from raydpo.data.ray_collate import DPOCollate, SFTCollate
    from raydpo.models import load_model, load_tokenizer
    from raydpo.tracking import make_logger
    from raydpo.train.loop import Hooks, env_from_torch, run_stage, set_torch_threads

    cfg = Config.from_dict(config["config"])
    stage = config["stage"]
    stage_cfg = cfg.sft if stage == "sft" else cfg.dpo
    env = env_from_torch(cfg.scaling.use_gpu)
    threads = set_torch_threads(cfg.scaling)
    if cfg.scaling.use_gpu:
        env.device = ray.train.torch.get_device()

    tokenizer = load_tokenizer(config["tokenizer_path"], revision=cfg.model.revision)
    model = load_model(cfg.model, cfg.quantization, cfg.lora, base_path=config["base_path"], device=env.device)
    logger = make_logger(config.get("tracking_uri"), config.get("run_id"), env.rank)

    collate = (DPOCollate(tokenizer.pad_token_id, cfg.dpo.share_prefix, cfg.dpo.padding_free) if stage == "dpo"
               else SFTCollate())
    train_shard = ray.train.get_dataset_shard("train")
    # an empty eval split is not passed (launch.fit_stage warns): train without evaluation
    eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval", True) else None
    bs = stage_cfg.per_device_batch_size

    def train_batches():
        return iter(train_shard.iter_torch_batches(batch_size=bs, collate_fn=collate, drop_last=True))

    def eval_batches():
        return iter(eval_shard.iter_torch_batches(batch_size=bs, collate_fn=collate)) if eval_shard else iter(())

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)

    resume_dir = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        resume_dir = restored.to_directory(tempfile.mkdtemp(prefix="raydpo-resume-"))

    def progress(line: str) -> None:
        if env.rank == 0:
            print(line, flush=True)

    progress(f"[{stage}] {env.world_size} worker(s), {threads} torch thread(s) each")

    log, exporter = logger.log_metrics, None
    if env.rank == 0:  # metrics are already all-reduced: one exporter, as one MLflow logger
        from raydpo.metrics import TrainMetricsExporter

        exporter = TrainMetricsExporter(stage, cfg.tracking.experiment_name, cfg.tracking.run_name or cfg.run.name)
        log = exporter.wrap(log)

    hooks = Hooks(train_batches=train_batches, eval_batches=eval_batches, report=report,
                  log=log, resume_dir=resume_dir, progress=progress,
                  report_eval_only=bool(config.get("report_eval_only", False)))
    try:
        run_stage(stage, cfg, model, tokenizer, env, hooks)
    finally:
        if exporter is not None:
            exporter.close()
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)

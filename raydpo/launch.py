"""Driver side: builds and fits the TorchTrainer for SFT and DPO, owns the MLflow run lifecycle.

No training maths here: that lives in `raydpo.train.loop`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raydpo.config import Config

Stage = Literal["sft", "dpo"]


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
    needed = s.num_workers * s.cpus_per_worker + s.data_cpus
    if total + 1e-9 < needed:
        raise ResourceError(
            f"the cluster has {total:g} CPUs; {s.num_workers} workers x {s.cpus_per_worker:g} CPU "
            f"+ {s.data_cpus:g} for Ray Data = {needed:g}. Lower scaling.cpus_per_worker or "
            f"scaling.num_workers (Ray Data must keep >= scaling.data_cpus)"
        )


def resolve_base(cfg: Config) -> tuple[str, str]:
    """(base model path, tokenizer path). 'tiny' is materialized here, once, on the driver."""
    from raydpo.models import resolve_model_path

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
    path. The marker also records the base's identity, which keys the reference cache."""
    import ray

    from raydpo.models import merge_adapter
    from raydpo.reference import MERGED_MARKER, files_digest, model_identity

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
    dtype = cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype
    task = ray.remote(num_cpus=min(1.0, ray.cluster_resources().get("CPU", 1.0)))(merge_adapter)
    ray.get(task.remote(base_path, str(sft_adapter), str(out), dtype))
    marker.write_text(json.dumps({"adapter": str(Path(sft_adapter).resolve()), "base": base_path, **want}))
    return str(out)


def stage_datasets(cfg: Config, stage: Stage, base_path: str, tok_path: str, progress=print):
    """(train, eval) lazy Ray datasets of a stage: tokenized pairs, with the reference log-prob
    columns (computed once, `raydpo.reference`) when DPO uses ``dpo.reference=precomputed``."""
    if stage == "dpo" and cfg.dpo.reference == "precomputed":
        from raydpo.reference import reference_datasets

        return reference_datasets(cfg, base_path, tok_path, progress=progress)
    from raydpo.data.pipeline import build_datasets

    return build_datasets(cfg, stage, tok_path)


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
    progress=print,
) -> StageResult:
    """Run one stage as a Ray Train job and track it in MLflow. Returns where the adapter is.

    ``datasets``: (train, eval) Ray datasets prepared by the caller (a Tune search materializes
    them once for all its trials); by default the stage builds its own from ``cfg.data``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raydpo import tracking
    from raydpo.raycluster import ensure_ray
    from raydpo.train.worker import train_loop_per_worker

    t0 = time.perf_counter()
    cfg = cfg.with_absolute_paths()  # workers and Ray Data tasks may not share this cwd
    ensure_ray()
    check_cpu_budget(cfg)
    base_path, tok_path = base or resolve_base(cfg)
    if base is None and stage == "dpo" and cfg.dpo.sft_adapter:
        progress(f"[dpo] merging SFT adapter {cfg.dpo.sft_adapter} into the base (the DPO reference)")
        base_path = merged_sft_base(cfg, cfg.dpo.sft_adapter, base_path)
        tok_path = base_path

    uri = tracking.resolve_tracking_uri(cfg.tracking)
    exp_id = tracking.setup_experiment(uri, cfg.tracking.experiment_name)
    run_name = f"{cfg.tracking.run_name or cfg.run.name}-{stage}"
    run_id = tracking.start_run(uri, exp_id, run_name, parent_run_id=parent_run_id,
                                tags={"raydpo.stage": stage, **(tags or {})})
    tracking.log_params(uri, run_id, {**cfg.flat(), **(params or {})})
    progress(f"[{stage}] MLflow run {run_id} in {uri}")

    try:
        train_ds, eval_ds = datasets or stage_datasets(cfg, stage, base_path, tok_path, progress)
        if eval_ds is not None:
            eval_ds = eval_ds.materialize()  # evaluated many times: tokenize it once
            if eval_ds.count() == 0:
                progress(f"[{stage}] warning: the eval split is empty; training runs without evaluation")
                eval_ds = None
        s = cfg.scaling
        resources = {"CPU": s.cpus_per_worker}
        if s.use_gpu:
            resources["GPU"] = s.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config={
                "config": cfg.to_dict(), "stage": stage, "base_path": base_path, "tokenizer_path": tok_path,
                "tracking_uri": uri, "run_id": run_id, "report_eval_only": report_eval_only,
                "has_eval": eval_ds is not None,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
            ),
            torch_config=ray.train.torch.TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            datasets={"train": train_ds, **({"eval": eval_ds} if eval_ds is not None else {})},
            run_config=ray.train.RunConfig(
                name=f"{cfg.run.name}-{stage}",
                storage_path=str(Path(cfg.run.storage_path).resolve()),
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        if result.checkpoint is None:
            raise RuntimeError(f"{stage} finished without a checkpoint")
        ckpt = result.checkpoint.path
        adapter = str(Path(ckpt) / "adapter")
        history = tracking.fetch_history(uri, run_id, None)
        if cfg.tracking.log_artifacts:
            tracking.log_final_artifacts(uri, run_id, adapter_dir=adapter, config_yaml=cfg.to_yaml(), history=history)
        tracking.set_tags(uri, run_id, {tracking.ADAPTER_TAG: str(Path(adapter).resolve())})
        tracking.end_run(uri, run_id, "FINISHED")
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    return StageResult(stage=stage, run_id=run_id, adapter_path=adapter, checkpoint_path=ckpt,
                       metrics=dict(result.metrics or {}), base_path=base_path,
                       elapsed_s=time.perf_counter() - t0, history=history)


def run_pipeline(cfg: Config, progress=print) -> tuple[StageResult, StageResult]:
    """SFT, then DPO from the SFT result with the SFT model as the reference."""
    sft = fit_stage(cfg, "sft", progress=progress)
    dpo_cfg = cfg.with_overrides({"dpo.sft_adapter": sft.adapter_path})
    dpo = fit_stage(dpo_cfg, "dpo", tags={"raydpo.sft_run_id": sft.run_id or ""}, progress=progress)
    return sft, dpo


def export_adapter(adapter_path: str, out_dir: str, merge: bool, dtype: str = "float32") -> str:
    """Copy an adapter, or merge it into its base (``--merge``) as a plain HF model folder."""
    from raydpo.models import merge_adapter

    cfg_file = Path(adapter_path) / "adapter_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
    if not merge:
        shutil.copytree(adapter_path, out_dir, dirs_exist_ok=True)
        return out_dir
    base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    return merge_adapter(base, adapter_path, out_dir, dtype)


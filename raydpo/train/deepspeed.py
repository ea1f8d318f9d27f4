"""DeepSpeed ZeRO config as a pure function of the raydpo config (no imports of deepspeed here).

Kept pure so it is unit-testable and identical on every worker: the same inputs give the same
dict on a laptop (gloo, fp32) and on a GPU cluster (NCCL, bf16).
"""

from __future__ import annotations

from typing import Any

from raydpo.config import Config, TrainStageConfig, resolve_precision

# elements per ZeRO gradient bucket (the memory estimate counts these buckets on GPU)
REDUCE_BUCKET_SIZE = 5e7


def build_ds_config(cfg: Config, stage: TrainStageConfig, *, use_gpu: bool, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for one training stage.

    The optimizer and LR schedule are torch objects handed to ``deepspeed.initialize`` (so no
    fused op has to be compiled with gcc at start-up); this dict only sets batch geometry,
    precision, clipping and ZeRO partitioning/offload.
    """
    ds = cfg.deepspeed
    precision = resolve_precision(cfg, use_gpu)
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "contiguous_gradients": True,
        # overlapping communication only pays off with a real interconnect
        "overlap_comm": bool(use_gpu),
        "reduce_bucket_size": REDUCE_BUCKET_SIZE,
    }
    if ds.stage >= 2:
        zero["allgather_bucket_size"] = REDUCE_BUCKET_SIZE
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    if ds.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if ds.stage3_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    return {
        "train_micro_batch_size_per_gpu": stage.per_device_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "train_batch_size": stage.per_device_batch_size * stage.gradient_accumulation_steps * world_size,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        # a non-finite gradient norm drops the step (no update) in bf16 too, as fp16/fp32 ZeRO already do
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # a torch AdamW is passed in; allow it under ZeRO and with CPU offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def engine_cast_dtype(cfg: Config, use_gpu: bool) -> str | None:
    """The dtype (a `raydpo.config.DTYPES` name) the training engine casts every floating parameter
    of the model to: DeepSpeed bf16 / fp16 (the ``bf16`` / ``fp16`` sections above); None where
    nothing is cast (DeepSpeed fp32, the plain engine). The policy and the reference model are
    both loaded in it (`raydpo.models.factory.cast_like_engine`), and the reference cache is keyed
    on it. A pure function of the config: no torch here."""
    if not cfg.deepspeed.enabled:
        return None
    return {"bf16": "bfloat16", "fp16": "float16"}.get(resolve_precision(cfg, use_gpu))


def comm_backend(use_gpu: bool) -> str:
    """The torch.distributed backend: NCCL between GPUs, gloo on CPU. The one rule: the Ray
    TorchTrainer (`raydpo.orchestration.launch`), the torchrun runner (`raydpo.train.standalone`) and the
    memory benchmark all call it."""
    return "nccl" if use_gpu else "gloo"

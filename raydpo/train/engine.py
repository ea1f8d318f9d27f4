"""The training engine the loop drives, behind one `Engine` Protocol: DeepSpeed's, or with
``deepspeed.enabled: false`` the plain torch one (`raydpo.train.plain.PlainEngine`).

The loop (`raydpo.train.loop`) and the checkpoint (`raydpo.train.checkpoint`) call only what
`Engine` lists, so they never ask which engine they hold. DeepSpeed's ``DeepSpeedEngine`` has
every member (structurally: nothing here imports DeepSpeed until `build_engine` needs it);
`PlainEngine` copies their semantics. Also here: where the engine runs (`WorkerEnv`, from the
torch.distributed group: `env_from_torch`; `set_torch_threads`), the learning-rate schedule both
engines step (`lr_lambda`) and how the loop drops a partly accumulated step (`discard_accumulated`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from raydpo.config import Config, TrainStageConfig
from raydpo.train.deepspeed import build_ds_config


@dataclass
class WorkerEnv:
    """What a loop needs to know about where it runs."""

    rank: int
    world_size: int
    device: torch.device
    use_gpu: bool


def set_torch_threads(scaling) -> int:
    """A worker runs torch with as many threads as the CPUs it was given (at least 1), or
    ``scaling.torch_threads``. Ray only sets ``OMP_NUM_THREADS`` from the CPU request; say it
    here, once, where the loop runs, and report what torch got."""
    n = scaling.torch_threads or max(1, int(scaling.cpus_per_worker))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def env_from_torch(use_gpu: bool) -> WorkerEnv:
    """WorkerEnv from an initialised torch.distributed group (Ray Train or torchrun)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerEnv(rank=rank, world_size=world, device=device, use_gpu=use_gpu)


class Engine(Protocol):
    """The engine calls the loop and the checkpoint make, with DeepSpeed's semantics: calling it
    runs the model's forward; ``backward`` scales the loss by ``1 / gradient_accumulation_steps``;
    ``step`` is called after every micro-batch and updates only at the accumulation boundary,
    dropping an update whose gradient norm is not finite (counted in ``skipped_steps``)."""

    module: torch.nn.Module  # the PEFT model
    optimizer: Any  # the torch optimizer, or DeepSpeed's ZeRO wrapper around it
    micro_steps: int  # micro-batches stepped so far
    skipped_steps: int  # updates dropped for a non-finite gradient norm

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self) -> Any: ...

    def eval(self) -> Any: ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def zero_optimization_stage(self) -> int:
        """0 without ZeRO (the plain engine: 0 always); 1-3 partition optimizer state and more."""

    def save_checkpoint(self, save_dir: str, tag: str, *, client_state: dict[str, Any],
                        exclude_frozen_parameters: bool) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, *, load_module_strict: bool, load_optimizer_states: bool,
                        load_lr_scheduler_states: bool) -> tuple[str | None, dict[str, Any] | None]:
        """(where it loaded from, the saved ``client_state``), or (None, None) when ``load_dir``
        holds no state this engine can load."""


def lr_lambda(stage: TrainStageConfig) -> Callable[[int], float]:
    """Linear warmup then cosine / linear decay to 0 (or constant), as a LambdaLR factor."""

    def f(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.lr_scheduler == "constant":
            return 1.0
        span = max(1, stage.max_steps - stage.warmup_steps)
        progress = min(1.0, (step - stage.warmup_steps) / span)
        if stage.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op when its comm backend
    starts: a gcc and ninja build, once per machine and toolchain, for an op that only
    DeepSpeed's ``inference_all_reduce`` calls. raydpo never calls it (gradients are reduced through
    torch.distributed on gloo). DeepSpeed builds the op only when its table of compatible ops
    (``deepspeed.ops.__compatible_ops__``, probed on first read) says so: marking the op
    incompatible, before the first comm start in this process, leaves the table unprobed and the
    op unbuilt. On GPU the accelerator has no such op and this is not called."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})[ShareMemCommBuilder.NAME] = False


def build_engine(model, cfg: Config, stage_cfg: TrainStageConfig, env: WorkerEnv) -> tuple[Engine, Any, Any]:
    """(engine, optimizer, LR scheduler) over the trainable (LoRA) parameters with torch AdamW +
    LambdaLR: DeepSpeed's engine, or with ``deepspeed.enabled: false`` the plain torch one
    (`raydpo.train.plain`, DDP across ranks), which needs no DeepSpeed installed (imported only
    here, only when enabled)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: LoRA target_modules matched nothing?")
    opt = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage_cfg))
    if not cfg.deepspeed.enabled:
        from raydpo.train.plain import PlainEngine

        engine = PlainEngine(model, opt, sched, accum=stage_cfg.gradient_accumulation_steps,
                             max_grad_norm=stage_cfg.max_grad_norm, rank=env.rank, world_size=env.world_size,
                             device=env.device)
        return engine, opt, sched
    import deepspeed

    if not env.use_gpu:
        skip_cpu_shm_comm_op()
    ds_config = build_ds_config(cfg, stage_cfg, use_gpu=env.use_gpu, world_size=env.world_size)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, opt, sched


def discard_accumulated(engine: Engine, micro_done: int) -> None:
    """Without ZeRO: drop the gradients (plain ``p.grad``) a step accumulated before one of its
    micro-batches went non-finite, and rewind the engine's micro-step counter so the next step's
    accumulation boundary is where it was: weights, optimizer and scheduler stay untouched."""
    if micro_done == 0:
        return
    engine.optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    engine.micro_steps -= micro_done

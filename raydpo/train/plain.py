"""The training engine without DeepSpeed (``deepspeed.enabled: false``): a torch optimizer and
LR scheduler around the PEFT model, DDP when the world size is above 1.

It offers the engine calls the loop makes (`raydpo.train.engine.Engine`: call, ``backward``,
``step``, ``train``/``eval``, ``save_checkpoint``/``load_checkpoint``, ``module``, ``micro_steps``,
``skipped_steps``, ``zero_optimization_stage``) with DeepSpeed's semantics, so
`raydpo.train.loop` runs the same code either way and the two give the same numbers
(``tests/test_resume.py``): ``backward`` divides the loss by the accumulation steps (as
DeepSpeed's ``scale_wrt_gas``); ``step`` updates only at the accumulation boundary, clipping the
global gradient norm to ``max_grad_norm`` first, then steps the scheduler. No ZeRO: every rank
holds all optimizer states (LoRA's are small). Nothing here imports DeepSpeed, so a host without
it runs the standalone path (``tests/test_gpu_check.py``).

Checkpoint: in the checkpoint's ``deepspeed/`` folder (`raydpo.storage.deepspeed_dir`),
``state/plain_r{rank}.pt`` holds the trainable weights, optimizer, scheduler and the client
state (whole on every rank: a rank the checkpoint's world lacked loads rank 0's); the adapter
folder beside it is the same Hugging Face PEFT folder as with DeepSpeed. A DeepSpeed checkpoint
does not resume a plain run or the reverse (the optimizer layouts differ);
`raydpo.train.checkpoint.load_state` says so in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PLAIN_FILE = "plain_r{rank}.pt"


class PlainEngine:
    def __init__(self, model, optimizer, scheduler, *, accum: int, max_grad_norm: float, rank: int, world_size: int,
                 device: torch.device):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.accum = accum
        self.max_grad_norm = max_grad_norm
        self.rank = rank
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # DDP syncs only the adapters: the frozen (maybe 4-bit packed) base is loaded alike on
            # every rank, and broadcasting it would cost a model's worth of traffic at start-up
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            self._forward = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
        else:
            self._forward = model

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def train(self):
        self.module.train()
        return self

    def eval(self):
        self.module.eval()
        return self

    def zero_optimization_stage(self) -> int:
        return 0  # no ZeRO: the loop itself drops a step whose loss went non-finite

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def is_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        """As DeepSpeed: the loss of a micro-batch is scaled by ``1 / accum`` before its backward;
        DDP averages the gradients over the ranks (DeepSpeed's ZeRO reduction averages too)."""
        (loss / self.accum if self.accum > 1 else loss).backward()

    def step(self) -> None:
        """At the accumulation boundary: clip, then optimizer and scheduler step; a non-finite
        gradient norm (the same on every rank: DDP averaged the gradients) drops the step as ZeRO
        does, gradients cleared, weights, optimizer and scheduler untouched (``skipped_steps``)."""
        if self.is_boundary():
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
            if torch.isfinite(norm):
                self.optimizer.step()
                self.lr_scheduler.step()
            else:
                self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1

    # -- checkpoints: the loop's call shapes (tag, client_state) ------------------------------
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any] | None = None, **_) -> None:
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in self.module.named_parameters()}
        torch.save({"params": {names[id(p)]: p.detach().cpu() for p in self._params},
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                    "micro_steps": self.micro_steps, "global_steps": self.global_steps,
                    "client_state": client_state or {}}, out / PLAIN_FILE.format(rank=self.rank))

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str | None, dict[str, Any] | None]:
        f = Path(load_dir) / tag / PLAIN_FILE.format(rank=self.rank)
        if not f.exists():  # a rank the checkpoint's world did not have: every rank's state is whole alike
            f = Path(load_dir) / tag / PLAIN_FILE.format(rank=0)
        if not f.exists():  # e.g. a DeepSpeed checkpoint: its optimizer layout is not ours
            return None, None
        st = torch.load(f, map_location="cpu", weights_only=False)
        by_name = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, t in st["params"].items():
                by_name[n].copy_(t)
        self.optimizer.load_state_dict(st["optimizer"])
        self.lr_scheduler.load_state_dict(st["scheduler"])
        # a checkpoint is taken at an accumulation boundary; counted in this run's accumulation, which
        # differs from the saved run's when the number of workers did (the global batch is kept)
        self.global_steps = st["global_steps"]
        self.micro_steps = self.global_steps * self.accum
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return str(f), st["client_state"]

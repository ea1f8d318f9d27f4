"""A training checkpoint: what each rank writes, how it is verified, how a run resumes from it.

One checkpoint folder (its file names are `raydpo.storage`'s ``adapter_dir``, ``deepspeed_dir``,
``state_file``, ``rng_file``, ``manifest_file``) holds the PEFT adapter and tokenizer (rank 0,
Hugging Face format, loadable as is), the trainer state (rank 0: step, data position, last eval,
config fingerprint), and per rank the engine's optimizer/scheduler shard, the RNG state and, written
last, a manifest of the files that rank wrote. A checkpoint is used only when every rank's
manifest is there and matches (`verify_checkpoint`): a rank that died mid-save leaves none.

Also here: the score Ray keeps the best checkpoint by (`checkpoint_score`, reported as `SCORE_KEY`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from raydpo import losses, storage
from raydpo.config import Stage
from raydpo.metric_names import EVAL_ACCURACY
from raydpo.train.engine import Engine, WorkerEnv

SCORE_KEY = "checkpoint_score"
SCORE_FLOOR = -1e30


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or damaged."""


def checkpoint_score(stage: Stage, last_eval: dict[str, float]) -> float:
    """The number Ray keeps the best checkpoint by (higher is better): the latest eval reward
    accuracy for DPO, minus the latest eval loss for SFT. A checkpoint taken between evaluations
    carries the latest one; before the first, a floor (never missing, never NaN)."""
    key = EVAL_ACCURACY if stage == "dpo" else f"eval/{losses.LOSS}"
    if key not in last_eval or not math.isfinite(last_eval[key]):
        return SCORE_FLOOR
    return last_eval[key] if stage == "dpo" else -last_eval[key]


def _rng_state() -> dict[str, Any]:
    import numpy as np

    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _sha256(loc: str | Path) -> str:
    """Of a local file or one in run storage (streamed, never whole in memory)."""
    h = hashlib.sha256()
    fs, path = storage.filesystem(loc)
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, rank: int) -> None:
    """Last file a rank writes: the size and digest of every file it wrote. A checkpoint is
    complete only when every rank's manifest is there and matches (`verify_checkpoint`)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    storage.write_text(storage.manifest_file(folder, rank), json.dumps(files))  # whole or not at all


def verify_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's state (``trainer_state.json``) if every rank's files are present and
    intact, else `CheckpointError` naming what is wrong. ``ckpt_dir``: a local folder or one in
    run storage (`raydpo.storage`)."""
    d = str(ckpt_dir)
    try:
        state = json.loads(storage.read_text(storage.state_file(d)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: no readable {storage.STATE_FILE} ({e.__class__.__name__})") from None
    have = storage.walk_files(d)
    for r in range(int(state.get("world_size", 1))):
        try:
            files = json.loads(storage.read_text(storage.manifest_file(d, r)))
        except (OSError, ValueError):
            raise CheckpointError(f"{d}: rank {r}'s manifest is missing or unreadable (a half-written checkpoint)") from None
        for name, want in files.items():
            if have.get(name, (-1, 0))[0] != want["size"] or _sha256(storage.join(d, name)) != want["sha256"]:
                raise CheckpointError(f"{d}: {name} is missing or damaged")
    return state


def save_state(engine: Engine, model, tokenizer, step: int, stage: str, env: WorkerEnv,
               extra: dict[str, Any] | None = None) -> str:
    """Write this rank's part of a checkpoint into a fresh local folder and return it.

    Rank 0 writes the PEFT adapter + tokenizer and the trainer state (``step``, ``stage``,
    ``world_size``, then ``extra``); every rank writes its engine shard (optimizer, scheduler,
    ``client_state={"step": step}``), its RNG state and, last, its manifest. Ray Train merges the
    ranks' folders into one checkpoint directory in storage.
    """
    out = Path(tempfile.mkdtemp(prefix=f"raydpo-{stage}-ckpt-{step}-r{env.rank}-"))
    engine.save_checkpoint(str(storage.deepspeed_dir(out)), tag="state", exclude_frozen_parameters=True,
                           client_state={"step": step})
    torch.save(_rng_state(), storage.rng_file(out, env.rank))
    with gathered_adapter(model):
        if env.rank == 0:
            # the trained adapter only, not the frozen reference copy (dpo.sft_reference: adapter)
            model.save_pretrained(str(storage.adapter_dir(out)), selected_adapters=["default"])
            tokenizer.save_pretrained(str(storage.adapter_dir(out)))
            state = {"step": step, "stage": stage, "world_size": env.world_size, **(extra or {})}
            storage.write_text(storage.state_file(out), json.dumps(state))
    _write_manifest(out, env.rank)
    return str(out)


def load_state(engine: Engine, ckpt_dir: str, rank: int = 0) -> dict[str, Any]:
    """Restore the engine (LoRA weights, optimizer, scheduler) and this rank's RNG from a
    verified checkpoint; returns the trainer state."""
    state = verify_checkpoint(ckpt_dir)
    _, client = engine.load_checkpoint(
        str(storage.deepspeed_dir(ckpt_dir)), tag="state", load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=True,
    )
    if client is None:
        raise CheckpointError(f"could not load the engine state from {ckpt_dir} (a DeepSpeed checkpoint and a plain "
                              "one, deepspeed.enabled=false, do not resume each other)")
    rng = storage.rng_file(ckpt_dir, rank)
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


class gathered_adapter:
    """Under ZeRO-3 the LoRA weights are partitioned; gather them (on every rank) to save."""

    def __init__(self, model):
        self.model = model
        self.ctx = None

    def __enter__(self):
        # a parameter DeepSpeed partitioned carries its ``ds_id``
        params = [p for p in self.model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
        if params:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        return False

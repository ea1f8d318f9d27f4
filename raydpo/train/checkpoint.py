"""A training checkpoint: what each rank writes, how it is verified, how a run resumes from it.

One checkpoint folder (its file names are `raydpo.storage`'s ``adapter_dir``, ``deepspeed_dir``,
``state_file``, ``rng_file``, ``manifest_file``) holds the PEFT adapter and tokenizer (rank 0,
Hugging Face format, loadable as is), the trainer state (rank 0: step, data position, last eval,
config fingerprint), and per rank the engine's optimizer/scheduler shard, the RNG state and, written
last, a manifest of the files that rank wrote. A checkpoint is used only when every rank's
manifest is there and matches (`verify_checkpoint`): a rank that died mid-save leaves none.

Another number of workers: under ZeRO (stages 1-3) rank 0 also writes the trainable weights in
fp32 and their Adam moments whole (`FULL_STATE`), which a resume on another world size loads
instead of the shards DeepSpeed refuses there (`load_resharded`). Without ZeRO every rank's state
is whole already. RNG states are per rank: a rank that has none in the checkpoint keeps its seed's.

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
TAG = "state"  # the engine's checkpoint tag: its files are in deepspeed/state/
# rank 0's world-size-free copy of the trainable state under ZeRO, beside the engine's shards
FULL_STATE = "full_state.pt"
# DeepSpeed's name for data-parallel rank 0's model-states file under ZeRO-3 (scheduler, counters)
Z3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
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
    engine.save_checkpoint(str(storage.deepspeed_dir(out)), tag=TAG, exclude_frozen_parameters=True,
                           client_state={"step": step})
    if engine.zero_optimization_stage() >= 1:
        full = full_state(engine)  # a collective: every rank takes part, rank 0 writes it
        if env.rank == 0:
            torch.save(full, _full_state_file(out))
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
    verified checkpoint; returns the trainer state. A checkpoint of another world size under
    ZeRO is re-partitioned (`load_resharded`); a rank without an RNG state in it (more
    workers than wrote it) keeps the one its seed gave."""
    state = verify_checkpoint(ckpt_dir)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world != int(state.get("world_size", 1)) and engine.zero_optimization_stage() >= 1:
        client = load_resharded(engine, ckpt_dir, int(state.get("world_size", 1)), world)
    else:
        _, client = engine.load_checkpoint(
            str(storage.deepspeed_dir(ckpt_dir)), tag=TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    if client is None:
        raise CheckpointError(f"could not load the engine state from {ckpt_dir} (a DeepSpeed checkpoint and a plain "
                              "one, deepspeed.enabled=false, do not resume each other)")
    rng = storage.rng_file(ckpt_dir, rank)
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def _full_state_file(ckpt_dir: str | Path) -> Path:
    return Path(storage.deepspeed_dir(ckpt_dir)) / TAG / FULL_STATE


def _trainable(engine: Engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def full_state(engine: Engine) -> dict[str, Any]:
    """The trainable weights in fp32 and their Adam moments, whole (by parameter name), Adam's step
    count and its parameter groups' settings (the learning rate the scheduler last set): gathered
    from every rank's ZeRO partition, stages 1-3 (`deepspeed.utils.safe_get_full_*`, collectives
    every rank calls). No moments before the optimizer's first update."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = _trainable(engine)
    opt_state = engine.optimizer.optimizer.state  # the torch AdamW over this rank's fp32 partition
    step = next((float(st["step"]) for st in opt_state.values() if "step" in st), None)
    return {
        "weights": {n: safe_get_full_fp32_param(p).detach().cpu() for n, p in named},
        "moments": {k: {n: safe_get_full_optimizer_state(p, k).detach().cpu() for n, p in named}
                    for k in (ADAM_MOMENTS if step is not None else ())},
        "step": step,
        # the LR the scheduler last set lives in the optimizer's groups, not in the scheduler's state
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.optimizer.param_groups],
    }


def load_resharded(engine: Engine, ckpt_dir: str, saved_world: int, world: int) -> dict[str, Any] | None:
    """Load a ZeRO checkpoint written by ``saved_world`` ranks on ``world`` ranks: what is not
    partitioned first (the LR scheduler, the step counters; under ZeRO-1/2 also the weights it
    saved, through DeepSpeed with ``load_optimizer_states=False``, as its partitioned shards load
    only on their own world size; under ZeRO-3 even the module states are partitioned, so from
    rank 0's model-states file, `_load_unpartitioned_z3`), then `set_full_state` re-partitions rank
    0's `FULL_STATE` for this world. Returns DeepSpeed's client state (None: nothing it could load)."""
    if not _full_state_file(ckpt_dir).exists():
        raise CheckpointError(
            f"{ckpt_dir} was written by {saved_world} workers and resumes only on {saved_world} (it has no whole "
            f"copy of its partitioned optimizer state, {FULL_STATE}); set scaling.num_workers={saved_world}")
    full = torch.load(_full_state_file(ckpt_dir), map_location="cpu", weights_only=False)
    if engine.zero_optimization_stage() == 3:
        client = _load_unpartitioned_z3(engine, ckpt_dir)
        set_full_state_z3(engine, full)
        return client
    _, client = engine.load_checkpoint(
        str(storage.deepspeed_dir(ckpt_dir)), tag=TAG, load_module_strict=False,
        load_optimizer_states=False, load_lr_scheduler_states=True,
    )
    set_full_state(engine, full)
    return client


def _load_unpartitioned_z3(engine: Engine, ckpt_dir: str) -> dict[str, Any]:
    """The LR scheduler and step counters from rank 0's ZeRO-3 model-states file, as DeepSpeed's
    ``_load_checkpoint`` restores them; returns the client state (``{"step": ...}``). DeepSpeed's
    own load would also read each rank's partition of the weights, which exist only on the
    world size that wrote them."""
    sd = torch.load(Path(storage.deepspeed_dir(ckpt_dir)) / TAG / Z3_MODEL_STATES, map_location="cpu",
                    weights_only=False)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(sd["lr_scheduler"])
    engine.global_steps = sd["global_steps"]
    engine.global_samples = sd.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = sd["skipped_steps"]
    return {"step": sd["step"]}


def set_full_state(engine: Engine, full: dict[str, Any]) -> None:
    """Put `full_state`'s whole weights and moments into this rank's ZeRO-1/2 partition, as
    DeepSpeed's universal-checkpoint loader does (``load_hp_checkpoint_state_from_checkpoint_dir``):
    each parameter's fragment of the fp32 partition and of each moment, then the partition's flat
    optimizer state (`deepspeed.utils.tensor_fragment.map_to_flat_opt_states`) with Adam's step, and
    the groups' settings (DeepSpeed's scheduler state alone leaves the initial learning rate there)."""
    from deepspeed.utils import safe_set_full_fp32_param
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    zero = engine.optimizer
    names = {id(p): n for n, p in _trainable(engine)}
    with torch.no_grad():
        for i, group in enumerate(zero.optimizer.param_groups):
            flat, params = group["params"][0], zero.bit16_groups[i]
            for p in params:
                w = full["weights"][names[id(p)]]
                safe_set_full_fp32_param(p, w.to(flat.device))
                p.data.copy_(w.to(p.dtype))  # the model's copy, as DeepSpeed's all-gather after a step leaves it
                if p._hp_mapping is not None and full["step"] is not None:
                    at = p._hp_mapping.lp_fragment_address
                    p._hp_mapping.optim_fragment = {
                        k: full["moments"][k][names[id(p)]].flatten().narrow(0, at.start, at.numel).to(flat.device)
                        for k in ADAM_MOMENTS}
            if full["step"] is not None:
                map_to_flat_opt_states(flat, params, zero.optimizer.state, ADAM_MOMENTS)
                zero.optimizer.state[flat]["step"] = torch.tensor(full["step"], dtype=torch.float32)
            group.update(full["groups"][i])


def set_full_state_z3(engine: Engine, full: dict[str, Any]) -> None:
    """`set_full_state` under ZeRO-3, as its universal-checkpoint loader does
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``): every parameter partitioned first
    (DeepSpeed's checkpoint prologue), this rank's slice of each weight and moment into its
    sub-group's flat fp32 partition and Adam state (created here: a fresh ZeRO-3 optimizer has
    none before its first step), the fp32 partition copied to the one the forward gathers, the
    groups' settings, then the persistent parameters (small ones ZeRO-3 keeps whole on every rank
    between steps) gathered again, as DeepSpeed's checkpoint epilogue does."""
    zero = engine.optimizer
    names = {id(p): n for n, p in _trainable(engine)}
    keys = ADAM_MOMENTS if full["step"] is not None else ()
    zero.checkpoint_event_prologue()
    with torch.no_grad():
        for sub, params in enumerate(zero.fp16_groups):
            flat = zero.fp32_partitioned_groups_flat[sub]
            if keys:
                zero.optimizer.state[flat] = {"step": torch.tensor(full["step"], dtype=torch.float32),
                                              **{k: torch.zeros_like(flat) for k in keys}}
            for p in params:
                _set_z3_slice(zero, p, full["weights"][names[id(p)]], None)
                for k in keys:
                    _set_z3_slice(zero, p, full["moments"][k][names[id(p)]], k)
            zero._reassign_or_swap_out_partitioned_parameters(sub)
        for i, group in enumerate(zero.optimizer.param_groups):
            group.update(full["groups"][i])
    zero.checkpoint_event_epilogue()


def _set_z3_slice(zero, p: torch.nn.Parameter, whole: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``whole`` (a weight, or its moment ``key``) into its ZeRO-3 partition:
    ``safe_set_full_fp32_param``'s arithmetic, with the zero padding a parameter whose size the
    world size does not divide has in its last rank's partition (DeepSpeed's narrow runs past the
    end there)."""
    part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    flat = whole.flatten().to(part.device, part.dtype)
    flat = torch.nn.functional.pad(flat, (0, part.numel() * zero._get_param_partition_world_size(p) - flat.numel()))
    part.copy_(flat.narrow(0, part.numel() * zero._get_param_partition_rank(p), part.numel()))


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

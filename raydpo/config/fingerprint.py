"""The resume fingerprint: the part of a config a resumed run must share with its checkpoint.

Every checkpoint stores `resume_fingerprint` of the config that wrote it; a resume compares it
with the current config's (`fingerprint_diff`) and refuses a different experiment.

How the global batch is split (`WORKER_SHAPE`: the number of workers, the gradient accumulation)
is not the experiment: a resume on another number of workers keeps the checkpoint's global batch
(`global_batch`) and sets the accumulation that gives it (`keep_global_batch`, `resume_accumulation`).
"""

from __future__ import annotations

from typing import Any

from raydpo.config.keys import flatten
from raydpo.config.root import Config

# Keys a resumed run may change: they steer logging, saving, retries and speed, not the maths of
# the steps already taken (max_steps may grow: "train longer"). Everything else must match the
# checkpoint's config, or the resumed run would silently be a different experiment. (max_steps
# growing also stretches the LR schedule from the resumed step on: the new run's schedule.)
RESUME_FREE = ("tracking.", "run.max_failures", "run.timeout_s", "run.keep_checkpoints", "scaling.torch_threads",
               "scaling.data_cpus", "scaling.resources_timeout_s", "scaling.collective_timeout_s", "data.tokenize_concurrency",
               "data.tokenize_num_cpus", "sft.log_every", "sft.eval_every", "sft.eval_max_batches",
               "sft.save_every", "sft.max_steps", "sft.max_nonfinite_steps", "sft.enabled", "dpo.log_every",
               "dpo.eval_every", "dpo.eval_max_batches", "dpo.save_every", "dpo.max_steps", "dpo.max_nonfinite_steps",
               "dpo.enabled", "dpo.reference_scoring", "dpo.balance_ranks", "tune.", "generations.")


# Where things are kept, not what is computed: a resubmitted job (another cwd, another package
# folder) or a run moved to another mount resumes.
LOCATIONS = ("run.storage_path", "model.cache_dir")

# Settings added after checkpoints were first written whose default is not what those checkpoints
# ran: a checkpoint without the key ran this value. DPO from an SFT adapter trained a fresh adapter
# on the merged SFT model before ``dpo.sft_reference`` existed; resumed as ``adapter`` its adapter
# would load onto the raw base. The key counts only for DPO from an SFT adapter (`resume_fingerprint`).
RAN_BEFORE_THE_KEY = {"dpo.sft_reference": "merged"}


# How a stage's global batch is split over the workers, as the user wrote it: kept in the
# fingerprint (a resume compares the accumulation with the checkpoint's) but not compared as such;
# each stage's ``{stage}.global_batch`` (the one the run trained with) is, when the accumulation
# changed. The per-device batch is not among them: SFT's loss is a token mean per micro-batch, so
# regrouping the rows into other micro-batches changes the maths (and the memory a step needs).
WORKER_SHAPE = ("scaling.num_workers", "sft.gradient_accumulation_steps", "dpo.gradient_accumulation_steps")
STAGES = ("sft", "dpo")


def _batch_key(stage: str) -> str:
    return f"{stage}.global_batch"


def _accum_key(stage: str) -> str:
    return f"{stage}.gradient_accumulation_steps"


def global_batch(flat: dict[str, Any], stage: str) -> int:
    """Rows (DPO pairs, SFT blocks) per optimizer step of ``stage`` in a flattened config or
    fingerprint: its ``{stage}.global_batch`` (the one the run trained with), else
    ``per_device_batch_size x num_workers x gradient_accumulation_steps`` (a config, or a
    fingerprint written before the key existed; a key it lacks counts as its default)."""
    if _batch_key(stage) in flat:
        return int(flat[_batch_key(stage)])
    defaults = flatten(Config().to_dict())

    def get(k: str) -> int:
        return int(flat.get(k, defaults[k]))

    return get(f"{stage}.per_device_batch_size") * get("scaling.num_workers") * get(_accum_key(stage))


def resume_fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened config minus `RESUME_FREE` keys and `LOCATIONS`, plus each stage's
    `global_batch`, as stored in every checkpoint. Take it from the config as the user wrote it
    (relative paths relative), not from `Config.with_absolute_paths`: those paths change with the
    cwd."""
    fp = {k: v for k, v in cfg.flat().items() if not k.startswith(RESUME_FREE) and k not in LOCATIONS}
    if not cfg.dpo.sft_adapter:  # no SFT adapter: the setting changes nothing
        fp.pop("dpo.sft_reference", None)
    fp.update({_batch_key(s): global_batch(fp, s) for s in STAGES})
    return fp


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's fingerprint and the current config's. A key
    the checkpoint lacks (added to the config since it was written) counts as its default (or as
    what runs did before it, `RAN_BEFORE_THE_KEY`), so a run checkpointed before a new setting
    existed resumes while that setting keeps its default.

    `WORKER_SHAPE` keys are not compared. A stage's `global_batch` is, where its gradient
    accumulation changed (the user asked for another batch, or split the same one anew); with the
    same accumulation the resume keeps the checkpoint's global batch on any number of workers
    (`keep_global_batch`)."""
    defaults = flatten(Config().to_dict())

    def was(k: str) -> Any:
        return saved[k] if k in saved else RAN_BEFORE_THE_KEY.get(k, defaults.get(k, "<unset>"))

    skip = set(LOCATIONS) | set(WORKER_SHAPE)  # an older checkpoint's fingerprint has the locations
    skip |= {_batch_key(s) for s in STAGES if was(_accum_key(s)) == current.get(_accum_key(s), defaults[_accum_key(s)])}
    saved = {**saved, **{_batch_key(s): global_batch(saved, s) for s in STAGES}}
    current = {**current, **{_batch_key(s): global_batch(current, s) for s in STAGES}}
    keys = (set(saved) | set(current)) - skip
    return sorted(k for k in keys if was(k) != current.get(k, "<unset>"))


def resume_accumulation(stage: str, batch: int, per_device: int, workers: int) -> int:
    """The gradient accumulation that makes ``batch`` rows per optimizer step (a checkpoint's
    `global_batch`) out of ``workers`` workers' micro-batches of ``per_device`` rows. A
    `ValueError` in one line naming the numbers and the choices when they do not divide it."""
    if batch % (per_device * workers) == 0:
        return batch // (per_device * workers)
    micro = batch // per_device if batch % per_device == 0 else 0  # per-device micro-batches per step
    fits = [w for w in range(1, micro + 1) if micro % w == 0]
    choices = (f"resume on {', '.join(map(str, fits[:-1]))} or {fits[-1]} workers" if len(fits) > 1
               else "resume on 1 worker" if fits else f"no number of workers fits {stage}.per_device_batch_size")
    raise ValueError(
        f"{stage}: cannot resume on {_workers(workers)}: the checkpoint's global batch is {batch} rows per step and "
        f"{batch} is not a multiple of {stage}.per_device_batch_size {per_device} x {_workers(workers)} = "
        f"{per_device * workers}; "
        f"{choices} (the gradient accumulation follows: {batch} = {per_device} x workers x accumulation), or pass "
        "--restart to train with a new global batch")


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def keep_global_batch(cfg: Config, stage: str, saved: dict[str, Any],
                      fingerprint: dict[str, Any]) -> tuple[Config, dict[str, Any], str | None]:
    """(config, fingerprint, line) to resume ``stage`` from a checkpoint whose fingerprint is
    ``saved`` (it passed `fingerprint_diff`). Where the config's gradient accumulation is the
    checkpoint's but its workers x per-device batch is not, the stage trains with the accumulation
    that keeps the checkpoint's global batch (`resume_accumulation`: a `ValueError` when none does)
    and the line says so; the fingerprint, stored in the new checkpoints, carries each such
    stage's global batch on. Else all three as they were (None: nothing to say)."""
    was = saved.get("scaling.num_workers", cfg.scaling.num_workers)
    fp = dict(fingerprint)
    for s in STAGES:
        if saved.get(_accum_key(s), fp.get(_accum_key(s))) == fp.get(_accum_key(s)):
            fp[_batch_key(s)] = global_batch(saved, s)
    st = cfg.stage(stage)
    batch, now = fp[_batch_key(stage)], st.per_device_batch_size * cfg.scaling.num_workers
    if batch == now * st.gradient_accumulation_steps:
        return cfg, fp, None
    accum = resume_accumulation(stage, batch, st.per_device_batch_size, cfg.scaling.num_workers)
    line = (f"[{stage}] resuming on {_workers(cfg.scaling.num_workers)} a checkpoint of {_workers(was)}: the global "
            f"batch stays {batch} = per_device {st.per_device_batch_size} x {_workers(cfg.scaling.num_workers)} x "
            f"gradient_accumulation_steps {accum} (the config says {st.gradient_accumulation_steps})")
    return cfg.with_overrides({_accum_key(stage): accum}), fp, line


def fingerprint_hash(fp: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]

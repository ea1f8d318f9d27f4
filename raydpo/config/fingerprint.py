"""The resume fingerprint: the part of a config a resumed run must share with its checkpoint.

Every checkpoint stores `resume_fingerprint` of the config that wrote it; a resume compares it
with the current config's (`fingerprint_diff`) and refuses a different experiment.
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
               "scaling.data_cpus", "scaling.resources_timeout_s", "data.tokenize_concurrency", "data.tokenize_num_cpus", "sft.log_every", "sft.eval_every", "sft.eval_max_batches",
               "sft.save_every", "sft.max_steps", "sft.max_nonfinite_steps", "sft.enabled", "dpo.log_every",
               "dpo.eval_every", "dpo.eval_max_batches", "dpo.save_every", "dpo.max_steps", "dpo.max_nonfinite_steps",
               "dpo.enabled", "tune.", "generations.")


# Where things are kept, not what is computed: a resubmitted job (another cwd, another package
# folder) or a run moved to another mount resumes.
LOCATIONS = ("run.storage_path", "model.cache_dir")

# Settings added after checkpoints were first written whose default is not what those checkpoints
# ran: a checkpoint without the key ran this value. DPO from an SFT adapter trained a fresh adapter
# on the merged SFT model before ``dpo.sft_reference`` existed; resumed as ``adapter`` its adapter
# would load onto the raw base. The key counts only for DPO from an SFT adapter (`resume_fingerprint`).
RAN_BEFORE_THE_KEY = {"dpo.sft_reference": "merged"}


def resume_fingerprint(cfg: Config) -> dict[str, Any]:
    """The flattened config minus `RESUME_FREE` keys and `LOCATIONS`, as stored in every
    checkpoint. Take it from the config as the user wrote it (relative paths relative), not
    from `Config.with_absolute_paths`: those paths change with the cwd."""
    fp = {k: v for k, v in cfg.flat().items() if not k.startswith(RESUME_FREE) and k not in LOCATIONS}
    if not cfg.dpo.sft_adapter:  # no SFT adapter: the setting changes nothing
        fp.pop("dpo.sft_reference", None)
    return fp


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's fingerprint and the current config's. A key
    the checkpoint lacks (added to the config since it was written) counts as its default (or as
    what runs did before it, `RAN_BEFORE_THE_KEY`), so a run checkpointed before a new setting
    existed resumes while that setting keeps its default."""
    defaults = flatten(Config().to_dict())

    def was(k: str) -> Any:
        return saved[k] if k in saved else RAN_BEFORE_THE_KEY.get(k, defaults.get(k, "<unset>"))

    keys = (set(saved) | set(current)) - set(LOCATIONS)  # an older checkpoint's fingerprint has them
    return sorted(k for k in keys if was(k) != current.get(k, "<unset>"))


def fingerprint_hash(fp: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]

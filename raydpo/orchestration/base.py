"""The model a stage trains from: the configured base, or for DPO from an SFT adapter either
the base itself, on which the policy trains that adapter beside a frozen copy of it, the
reference (``dpo.sft_reference: adapter``), or the base and that adapter merged (``merged``)
(`stage_base`, called by `launch.fit_stage` and `tune.run_tune`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from raydpo import storage, storage_copy
from raydpo.config import Config, Stage


def resolve_base(cfg: Config) -> tuple[str, str]:
    """(base model path, tokenizer path). 'tiny' is built here, once, on the driver, and
    published into run storage: the workers on other nodes read it there, never from the
    driver's disk. A hub id stays an id (every node downloads it); a local folder must be on a
    filesystem every node shares (`raydpo.orchestration.nodes` checks it)."""
    from raydpo.config import BUILTIN_MODEL
    from raydpo.models.factory import resolve_model_path

    p = resolve_model_path(cfg.model)
    if cfg.model.name_or_path == BUILTIN_MODEL:
        p = storage_copy.publish(p, storage.model_dir(cfg.run.storage_path, Path(p).name))
    elif Path(p).exists():
        p = str(Path(p).resolve())
    return p, p


def stage_base(cfg: Config, stage: Stage, progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """(base model path, tokenizer path) of ``stage``. DPO from ``dpo.sft_adapter``: with
    ``dpo.sft_reference: adapter`` the base SFT trained on (the workers load the SFT adapter on
    it, `raydpo.models.factory.load_stage_model`; its LoRA settings checked against ``lora.*``
    here, `sft_adapter_mismatch`) and the SFT adapter's tokenizer; with ``merged`` the merged SFT
    model (`merged_sft_base`), which is then its reference too. ``progress`` (if given) hears
    which; a search says nothing here."""
    base_path, tok_path = resolve_base(cfg)
    if stage == "dpo" and cfg.dpo.trains_sft_adapter:
        from raydpo.config import ConfigError

        if problems := sft_adapter_mismatch(cfg):
            raise ConfigError([("dpo.sft_reference", "adapter trains the SFT adapter itself, whose LoRA settings "
                                f"differ from this config's: {'; '.join(problems)}. Set lora.* to the adapter's, or "
                                "dpo.sft_reference=merged to train a fresh adapter on the merged SFT model")])
        if progress is not None:
            progress(f"[dpo] training the SFT adapter {cfg.dpo.sft_adapter} on the base; the reference is a "
                     "frozen copy of it (dpo.sft_reference=adapter)")
        a = cfg.dpo.sft_adapter
        return base_path, a if storage.exists(storage.join(a, "tokenizer_config.json")) else tok_path
    if stage == "dpo" and cfg.dpo.sft_adapter:
        if progress is not None:
            progress(f"[dpo] merging SFT adapter {cfg.dpo.sft_adapter} into the base (the DPO reference)")
        base_path = tok_path = merged_sft_base(cfg, cfg.dpo.sft_adapter, base_path)
    return base_path, tok_path


def sft_adapter_mismatch(cfg: Config) -> list[str]:
    """How ``dpo.sft_adapter``'s LoRA settings (its ``adapter_config.json``) differ from ``lora.*``,
    one line each; [] when they agree. With ``dpo.sft_reference: adapter`` DPO trains that adapter,
    so its settings are the ones in force: a differing ``lora.*`` would be ignored silently."""
    have = storage.read_json(storage.join(cfg.dpo.sft_adapter, "adapter_config.json")) or {}
    lora = cfg.lora
    want = {"r": (lora.r, have.get("r")), "alpha": (lora.alpha, have.get("lora_alpha")),
            "dropout": (lora.dropout, have.get("lora_dropout")), "bias": (lora.bias, have.get("bias")),
            "target_modules": (sorted(lora.target_modules), sorted(have.get("target_modules") or []))}
    return [f"lora.{k} is {mine} here, {theirs} in the adapter"
            for k, (mine, theirs) in want.items() if mine != theirs]


def merged_sft_base(cfg: Config, sft_adapter: str, base_path: str) -> str:
    """DPO's base = the SFT model (base + SFT adapter merged, unquantized), as in stack_llama_2.
    DPO then loads it (4-bit if configured) with a fresh adapter, so the reference
    (adapter disabled) *is* the SFT model. Runs as a Ray task so a 7B merge does not need the
    driver's memory; the output goes to run storage, which workers share.

    The merge is reused only for the same adapter *content* (its files' digest), never because
    the path is the same: a rerun under the same run name writes a new SFT adapter to the same
    path. The marker also records the base's identity, which keys the reference cache. Another
    run's merge of the same content in the same storage (a second DPO run or a search from one
    SFT adapter) is hard-linked instead of merged again: no second copy on disk, and a later
    re-merge there writes new files, never these."""
    import ray

    from raydpo.models.factory import merge_adapter
    from raydpo.orchestration.resources import merge_needs, merge_task_options, wait_for_resources
    from raydpo.orchestration.reference import files_digest, model_identity

    memo = storage.reference_dir(cfg.run.storage_path)
    out = storage.merged_sft_dir(cfg.run.storage_path, cfg.run.name)
    marker = storage.merged_marker(out)
    want = {"adapter_digest": files_digest(sft_adapter, memo),
            "base_identity": model_identity(base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None,
                                            memo)}
    have = storage.read_json(marker) or {}
    if all(have.get(k) == v for k, v in want.items()):
        return out
    storage.remove(out)
    record = json.dumps({"adapter": sft_adapter, "base": base_path, **want})
    if _link_same_merge(cfg.run.storage_path, want, out):
        storage.write_text(marker, record)
        return out
    dtype = cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype
    wait_for_resources(cfg, merge_needs(cfg), "merge")  # at once after the stage's own wait
    task = ray.remote(**merge_task_options(cfg))(merge_adapter)  # a worker node, never a num-cpus 0 head
    ray.get(task.remote(base_path, sft_adapter, out, dtype))  # reads and writes run storage, not this disk
    storage.write_text(marker, record)  # last: the merge is complete
    return out


def _link_same_merge(storage_path: str, want: dict, out: str) -> bool:
    """Hard-link (copy where links fail, or in an object store) another run's finished merge
    with the same digests into ``out``, its marker excepted; False when there is none or it
    changed under us."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for marker in storage.merged_markers(storage_path):
        src = storage.parent(marker)
        if src == out or any((storage.read_json(marker) or {}).get(k) != v for k, v in want.items()):
            continue
        files = storage.walk_files(src)
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            continue
        try:
            if storage.is_remote(out):
                storage.copy_tree(src, out)
                storage.remove(storage.merged_marker(out))
            else:
                shutil.copytree(src, out, copy_function=link, ignore=shutil.ignore_patterns(storage.MERGED_MARKER))
            return True
        except OSError:  # re-merged while we linked: merge ourselves
            storage.remove(out)
    return False

"""The model a stage trains from: the configured base, or for DPO from an SFT adapter, the
base and that adapter merged (`stage_base`, called by `launch.fit_stage` and `tune.run_tune`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from raydpo import storage
from raydpo.config import Config, Stage


def resolve_base(cfg: Config) -> tuple[str, str]:
    """(base model path, tokenizer path). 'tiny' is materialized here, once, on the driver."""
    from raydpo.models.factory import resolve_model_path

    p = resolve_model_path(cfg.model)
    if Path(p).exists():
        p = str(Path(p).resolve())
    return p, p


def stage_base(cfg: Config, stage: Stage, progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """(base model path, tokenizer path) of ``stage``: DPO from ``dpo.sft_adapter`` trains from
    the merged SFT model (`merged_sft_base`), which is then its reference too. ``progress`` (if
    given) hears that the merge runs; a search says nothing here."""
    base_path, tok_path = resolve_base(cfg)
    if stage == "dpo" and cfg.dpo.sft_adapter:
        if progress is not None:
            progress(f"[dpo] merging SFT adapter {cfg.dpo.sft_adapter} into the base (the DPO reference)")
        base_path = tok_path = merged_sft_base(cfg, cfg.dpo.sft_adapter, base_path)
    return base_path, tok_path


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
    from raydpo.orchestration.reference import files_digest, model_identity

    memo = storage.reference_dir(cfg.run.storage_path)
    out = storage.merged_sft_dir(cfg.run.storage_path, cfg.run.name)
    marker = storage.merged_marker(out)
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
    if _link_same_merge(storage.root(cfg.run.storage_path), want, out):
        marker.write_text(json.dumps({"adapter": str(Path(sft_adapter).resolve()), "base": base_path, **want}))
        return str(out)
    dtype = cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype
    task = ray.remote(num_cpus=min(1.0, ray.cluster_resources().get("CPU", 1.0)))(merge_adapter)
    ray.get(task.remote(base_path, str(sft_adapter), str(out), dtype))
    marker.write_text(json.dumps({"adapter": str(Path(sft_adapter).resolve()), "base": base_path, **want}))
    return str(out)


def _link_same_merge(storage_path: Path, want: dict, out: Path) -> bool:
    """Hard-link (copy where links fail) another run's finished merge with the same digests into
    ``out``, its marker excepted; False when there is none or it changed under us."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for marker in storage.merged_markers(storage_path):
        if marker.parent == out:
            continue
        src = marker.parent
        try:
            if any(json.loads(marker.read_text()).get(k) != v for k, v in want.items()):
                continue
            if not ((src / "config.json").exists() and any(src.glob("*.safetensors"))):
                continue
            shutil.copytree(src, out, copy_function=link, ignore=shutil.ignore_patterns(storage.MERGED_MARKER))
            return True
        except (OSError, ValueError):  # unreadable, or re-merged while we linked: merge ourselves
            shutil.rmtree(out, ignore_errors=True)
    return False

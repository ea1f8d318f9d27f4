"""The Ray Data pipeline: read → validate (count bad rows) → format → split → tokenize."""

from __future__ import annotations

from typing import Literal

from raydpo.config import Config, DataConfig
from raydpo.data.rows import VALID, drop_reason, format_prompt, is_eval, parse_json_line
from raydpo.data.sources import read_raw

Stage = Literal["sft", "dpo"]


def _validate(batch, max_chars: int, template: str, eval_fraction: float):
    import pyarrow as pa

    reasons, prompts, chosen, rejected, evals = [], [], [], [], []
    for raw in batch["raw"].to_pylist():
        row = parse_json_line(raw) if raw is not None else None
        reason = drop_reason(row, max_chars)
        reasons.append(reason)
        ok = reason == VALID
        prompts.append(format_prompt(row["question"], template) if ok else "")
        chosen.append(row["response_j"] if ok else "")
        rejected.append(row["response_k"] if ok else "")
        evals.append(is_eval(row["question"], eval_fraction) if ok else False)
    return pa.table({"reason": reasons, "prompt": prompts, "chosen": chosen, "rejected": rejected, "is_eval": evals})


def validated(cfg: DataConfig, stage: Stage = "dpo"):
    """Every row read, with a ``reason`` column ("" = valid) and formatted text for valid rows."""
    return read_raw(cfg, stage).map_batches(
        _validate, batch_format="pyarrow", num_cpus=cfg.tokenize_num_cpus,
        fn_kwargs={"max_chars": cfg.max_chars, "template": cfg.prompt_template, "eval_fraction": cfg.eval_fraction},
    )


def tokenized(ds, cfg: Config, stage: Stage, tokenizer_name_or_path: str):
    """Formatted valid rows → token ids, in Ray Data workers."""
    from raydpo.data.tokenize import DPOTokenize, SFTPack

    d = cfg.data
    common = {"batch_size": d.tokenize_batch_size, "batch_format": "pyarrow", "num_cpus": d.tokenize_num_cpus,
              "concurrency": d.tokenize_concurrency}
    if stage == "sft":
        return ds.map_batches(SFTPack, fn_constructor_args=(tokenizer_name_or_path, d.sft_block_size, cfg.model.revision),
                              **common)
    return ds.map_batches(DPOTokenize, fn_constructor_args=(tokenizer_name_or_path, d.max_length, d.max_prompt_length,
                                                            cfg.model.revision), **common)


def _keep(batch, want_eval: bool):
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(batch["reason"], ""), pc.equal(batch["is_eval"], want_eval))
    return batch.filter(keep)


def build_datasets(cfg: Config, stage: Stage, tokenizer_name_or_path: str):
    """(train, eval) tokenized Ray datasets of valid rows, split by a stable hash of the question."""
    rows = validated(cfg.data, stage)
    kw = {"batch_format": "pyarrow", "num_cpus": cfg.data.tokenize_num_cpus}
    train = rows.map_batches(_keep, fn_kwargs={"want_eval": False}, **kw)
    evals = rows.map_batches(_keep, fn_kwargs={"want_eval": True}, **kw)
    return (tokenized(train, cfg, stage, tokenizer_name_or_path),
            tokenized(evals, cfg, stage, tokenizer_name_or_path))

"""The Ray Data pipeline: read → validate (count bad rows) → format (template, chat template) →
split → tokenize.

    train, evals = build_datasets(cfg, "dpo", tokenizer_path)

Both are lazy, streaming datasets of valid rows only; the source is read once per dataset
(train and eval each stream it and keep their side of the split), which keeps memory flat for
hub-sized data. Callers that iterate eval many times ``materialize()`` it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raydpo.config import Config, DataConfig, Stage
from raydpo.data.rows import VALID

if TYPE_CHECKING:
    import ray.data



def validated(cfg: DataConfig, stage: Stage = "dpo", tokenizer_name_or_path: str | None = None,
              revision: str | None = None):
    """Every row read (at most ``max_rows``) with its ``reason`` (``""`` = valid) and, for valid
    rows, ``prompt``/``chosen``/``rejected`` (as the model reads them: message rows rendered with
    the tokenizer's chat template), ``is_eval`` and ``templated``. Raises `DataSourceError` now
    when the source cannot be read at all, or its format cannot be told or rendered."""
    from raydpo.data.sources import read_rows

    return read_rows(cfg, stage, tokenizer_name_or_path, revision)


def keep_split(batch, want_eval: bool):
    """Valid rows of one side of the split (pyarrow batch in, pyarrow batch out)."""
    import pyarrow.compute as pc

    return batch.filter(pc.and_(pc.equal(batch["reason"], VALID), pc.equal(batch["is_eval"], want_eval)))


def tokenized(ds, cfg: Config, stage: Stage, tokenizer_name_or_path: str):
    """Formatted valid rows → token ids, in Ray Data tasks (at most ``data.tokenize_concurrency``
    at once) whose worker processes keep the tokenizer loaded (`raydpo.data.tokenize.cached_tokenizer`).

    DPO: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (list<int32>) and
    ``truncated`` (bool). SFT: ``input_ids`` (list<int32> of exactly ``sft_block_size``).
    """
    from ray.data import TaskPoolStrategy

    from raydpo.data.tokenize import dpo_batch, sft_batch

    d = cfg.data
    common = {"batch_size": d.tokenize_batch_size, "batch_format": "pyarrow", "num_cpus": d.tokenize_num_cpus,
              "compute": TaskPoolStrategy(size=d.tokenize_concurrency)}
    if stage == "sft":
        return ds.map_batches(sft_batch, fn_kwargs={"tokenizer": tokenizer_name_or_path,
                                                    "block_size": d.sft_block_size,
                                                    "revision": cfg.model.revision}, **common)
    return ds.map_batches(dpo_batch, fn_kwargs={"tokenizer": tokenizer_name_or_path, "max_length": d.max_length,
                                                "max_prompt_length": d.max_prompt_length,
                                                "revision": cfg.model.revision}, **common)


def build_datasets(cfg: Config, stage: Stage,
                   tokenizer_name_or_path: str) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """``(train, eval)`` tokenized Ray datasets of valid rows, split by a stable hash of the
    prompt (`raydpo.data.rows.is_eval`). SFT reads ``data.sft_source`` when set; hub sources read
    ``sft_data_dir`` / ``dpo_data_dir`` by stage."""
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    rows = validated(cfg.data, stage, tokenizer_name_or_path, cfg.model.revision)
    kw = {"batch_format": "pyarrow", "num_cpus": cfg.data.tokenize_num_cpus}
    train = rows.map_batches(keep_split, fn_kwargs={"want_eval": False}, **kw)
    evals = rows.map_batches(keep_split, fn_kwargs={"want_eval": True}, **kw)
    return (tokenized(train, cfg, stage, tokenizer_name_or_path),
            tokenized(evals, cfg, stage, tokenizer_name_or_path))

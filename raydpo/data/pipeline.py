"""The Ray Data pipeline: read → validate (count bad rows) → format (template, chat template) →
split → tokenize.

    reach = find_reach(cfg, "dpo", tokenizer_path)        # one cheap pass: which rows the run reads
    train, evals = build_datasets(cfg, "dpo", tokenizer_path, reach)

Both are lazy, streaming datasets of the valid rows the run reaches (`raydpo.data.reach`): a
4-step run on a 7M-pair source tokenizes (and scores) its 32 pairs, not 7M. The source is read
once per dataset (train and eval each stream it and keep their side of the split), which keeps
memory flat for hub-sized data. Callers that iterate eval many times ``materialize()`` it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raydpo.config import Config, DataConfig, Stage
from raydpo.data.reach import Reach, Want, keep_reached, merge_summaries, reach_summary

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


def tokenized(ds, cfg: Config, stage: Stage, tokenizer_name_or_path: str):
    """Formatted valid rows → token ids, in Ray Data tasks (at most `DataConfig.tokenize_tasks`
    at once) whose worker processes keep the tokenizer loaded (`raydpo.data.tokenize.cached_tokenizer`).

    DPO: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (list<int32>) and
    ``truncated`` (bool). SFT: ``input_ids`` (list<int32> of exactly ``sft_block_size``).
    """
    from ray.data import TaskPoolStrategy

    from raydpo.data.tokenize import dpo_batch, sft_batch

    d = cfg.data
    common = {"batch_size": d.tokenize_batch_size, "batch_format": "pyarrow", "num_cpus": d.tokenize_num_cpus,
              "compute": TaskPoolStrategy(size=cfg.tokenize_tasks())}
    if stage == "sft":
        return ds.map_batches(sft_batch, fn_kwargs={"tokenizer": tokenizer_name_or_path,
                                                    "block_size": d.sft_block_size,
                                                    "revision": cfg.model.revision}, **common)
    return ds.map_batches(dpo_batch, fn_kwargs={"tokenizer": tokenizer_name_or_path, "max_length": d.max_length,
                                                "max_prompt_length": d.max_prompt_length,
                                                "revision": cfg.model.revision}, **common)


def run_wants(cfg: Config, stage: Stage) -> Want:
    """The rows of each split a stage's run reads (`raydpo.data.reach.Want`)."""
    s = cfg.stage(stage)
    return Want.of(s.max_steps * s.gradient_accumulation_steps, s.per_device_batch_size * cfg.scaling.num_workers,
                   s.eval_max_batches)


SUMMARY_BATCH = 4096  # rows per summary row of the reach pass


def find_reach(cfg: Config, stage: Stage, tokenizer_name_or_path: str, want: Want | None = None) -> Reach:
    """The rows a run reads (default: this run's `run_wants`): one pass over the source that
    reads, checks and hashes each row and keeps only ids. SFT: `Reach.everything` (no pass)."""
    if stage == "sft":
        return Reach.everything()
    want = want or run_wants(cfg, stage)
    rows = validated(cfg.data, stage, tokenizer_name_or_path, cfg.model.revision)
    summaries = rows.map_batches(reach_summary, batch_size=SUMMARY_BATCH, batch_format="pyarrow",
                                 num_cpus=cfg.data.tokenize_num_cpus,
                                 fn_kwargs={"seed": cfg.data.seed, "k_train": want.train, "k_eval": want.eval})
    s = cfg.stage(stage)
    return merge_summaries(summaries.iter_batches(batch_size=None, batch_format="pyarrow"), want,
                           s.per_device_batch_size * cfg.scaling.num_workers)


def build_datasets(cfg: Config, stage: Stage, tokenizer_name_or_path: str, reach: Reach | None = None,
                   skip: dict | None = None) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """``(train, eval)`` tokenized Ray datasets of the valid rows ``reach`` names (default: every
    row) less the ids in ``skip`` (``{"train": ids, "eval": ids}``: rows already scored), split by
    a stable hash of the prompt (`raydpo.data.rows.is_eval`). SFT reads ``data.sft_source`` when
    set; hub sources read ``sft_data_dir`` / ``dpo_data_dir`` by stage."""
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    reach = reach or Reach.everything()
    rows = validated(cfg.data, stage, tokenizer_name_or_path, cfg.model.revision)
    kw = {"batch_format": "pyarrow", "num_cpus": cfg.data.tokenize_num_cpus}
    skip = skip or {}
    train = rows.map_batches(keep_reached, fn_kwargs={"want_eval": False, "ids": reach.train_ids,
                                                      "skip": skip.get("train")}, **kw)
    evals = rows.map_batches(keep_reached, fn_kwargs={"want_eval": True, "ids": reach.eval_ids,
                                                      "skip": skip.get("eval")}, **kw)
    return (tokenized(train, cfg, stage, tokenizer_name_or_path),
            tokenized(evals, cfg, stage, tokenizer_name_or_path))

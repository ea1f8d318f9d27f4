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
from raydpo.data.packing import chars_target
from raydpo.data.reach import Cut, Reach, Want, keep_reached, merge_summaries, reach_summary

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
    ``truncated`` (bool). SFT: ``example_ids`` (list<int32>: one example, packed later in the run's
    order by `raydpo.data.packing`).
    """
    from ray.data import TaskPoolStrategy

    from raydpo.data.packing import examples_batch
    from raydpo.data.tokenize import dpo_batch
    from raydpo.data.tokenizer import task_tokenizer

    d = cfg.data
    common = {"batch_size": d.tokenize_batch_size, "batch_format": "pyarrow", "num_cpus": d.tokenize_num_cpus,
              "compute": TaskPoolStrategy(size=cfg.tokenize_tasks())}
    # the tokenizer's Rust backend when it encodes alone: a task needs no transformers (~3 s of its start)
    tok = task_tokenizer(tokenizer_name_or_path, cfg.model.revision)
    if stage == "sft":  # one tokenized example per row: packed in the run's order (raydpo.data.packing)
        return ds.map_batches(examples_batch, fn_kwargs={"tokenizer": tok,
                                                         "revision": cfg.model.revision}, **common)
    return ds.map_batches(dpo_batch, fn_kwargs={"tokenizer": tok, "max_length": d.max_length,
                                                "max_prompt_length": d.max_prompt_length,
                                                "revision": cfg.model.revision}, **common)


def run_wants(cfg: Config, stage: Stage) -> Want:
    """The rows of each split a stage's run reads (`raydpo.data.reach.Want`)."""
    s = cfg.stage(stage)
    return Want.of(s.max_steps * s.gradient_accumulation_steps, s.per_device_batch_size * cfg.scaling.num_workers,
                   s.eval_max_batches)


def run_cuts(cfg: Config, stage: Stage, want: Want | None = None) -> tuple[Cut, Cut]:
    """Where the reach pass cuts each split's order for a stage's run (`raydpo.data.reach.Cut`):
    DPO after the pairs ``want`` reads (default `run_wants`); SFT after enough example text to
    fill the blocks it reads, in whole packing chunks (`raydpo.data.packing`)."""
    want = want or run_wants(cfg, stage)
    if stage == "dpo":
        return Cut(want.train), Cut(want.eval)
    size, chunk = cfg.data.sft_block_size, cfg.data.tokenize_batch_size
    return (Cut(chars_target(want.train, size), chars=True, chunk=chunk),
            Cut(None if want.eval is None else chars_target(want.eval, size), chars=True, chunk=chunk))


def find_reach(cfg: Config, stage: Stage, tokenizer_name_or_path: str, want: Want | None = None) -> Reach:
    """The rows a run reads (default: this run's `run_wants`), found in one pass over the source
    that reads, checks and hashes each row and hands the driver, per block, only the rows of
    each split that may be reached (`run_cuts`, bounded by the source's size where it is known:
    `raydpo.data.reach.Cut.bounded`), of which it keeps those that are."""
    from raydpo.data.sources import source_rows

    train, evals = run_cuts(cfg, stage, want)
    size, share = source_rows(cfg.data, stage), cfg.data.eval_fraction
    reach = _reach_pass(cfg, stage, tokenizer_name_or_path, train.bounded(size, 1 - share), evals.bounded(size, share))
    if reach is None:  # fewer valid rows than the source's size promised: the bounds cut too deep
        print(f"[data] {stage}: fewer valid rows than the source's {size:,} rows suggest; "
              "reading it once more to find the rows the run reads", flush=True)
        reach = _reach_pass(cfg, stage, tokenizer_name_or_path, train, evals)
    return reach if stage == "dpo" else reach.as_examples()


# The reach pass's tasks take a whole CPU each: it runs before any training worker holds one, and
# reads already need whole CPUs (`raydpo.config.ScalingConfig.data_cpus`). At tokenization's 0.25,
# eight tasks shared 2 cores, each with a 370 MB block of text: the pass over 1M rows took 26-31 s
# instead of 16-18 s.
PASS_CPUS = 1.0


def _reach_pass(cfg: Config, stage: Stage, tokenizer_name_or_path: str, train: Cut, evals: Cut) -> Reach | None:
    data = cfg.data.model_copy(update={"tokenize_num_cpus": PASS_CPUS})  # the read's tasks, fused with the pass
    rows = validated(data, stage, tokenizer_name_or_path, cfg.model.revision)
    # whole blocks (batch_size None): Ray Data then fuses read, check and this pass into one task
    # per block, and only the rows that may be reached enter the object store
    found = rows.map_batches(reach_summary, batch_size=None, batch_format="pyarrow", num_cpus=PASS_CPUS,
                             fn_kwargs={"seed": cfg.data.seed, "train": train, "eval": evals})
    s = cfg.stage(stage)
    return merge_summaries(found.iter_batches(batch_size=None, batch_format="pyarrow"), train, evals,
                           s.per_device_batch_size * cfg.scaling.num_workers)


def _dataset(table, skip, tasks: int, batch_rows: int):
    """Rows the reach pass found (less ``skip``'s ids) as a Ray dataset of about 4 blocks per
    tokenizer task (``tasks`` at once), at least ``batch_rows`` rows each: every task stays busy,
    and none pays a task's start for a single batch (79 tasks of 256 rows tokenized at 0.5x the
    speed of 8 larger ones on 2 cores)."""
    import numpy as np
    import pyarrow as pa
    import ray.data

    from raydpo.data.reach import ID

    if skip is not None and len(skip):
        table = table.filter(pa.array(~np.isin(table[ID].to_numpy(), skip)))
    per = max(batch_rows, -(-table.num_rows // (4 * tasks)))
    return ray.data.from_arrow([table.slice(i, per) for i in range(0, table.num_rows, per)] or [table])


def build_datasets(cfg: Config, stage: Stage, tokenizer_name_or_path: str, reach: Reach | None = None,
                   skip: dict | None = None) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """``(train, eval)`` tokenized Ray datasets of the rows ``reach`` holds (default, or a split
    it holds as None: every valid row of the source) less the ids in ``skip`` (``{"train": ids,
    "eval": ids}``: rows already scored), split by a stable hash of the prompt
    (`raydpo.data.rows.is_eval`). SFT reads ``data.sft_source`` when set; hub sources read
    ``sft_data_dir`` / ``dpo_data_dir`` by stage."""
    if stage not in ("sft", "dpo"):
        raise ValueError(f"stage must be 'sft' or 'dpo', got {stage!r}")
    reach, skip = reach or Reach.everything(), skip or {}
    kw = {"batch_format": "pyarrow", "num_cpus": cfg.data.tokenize_num_cpus}
    out, rows = [], None
    for split, table in (("train", reach.train), ("eval", reach.eval)):
        if table is not None:
            out.append(_dataset(table, skip.get(split), cfg.tokenize_tasks(), cfg.data.tokenize_batch_size))
            continue
        rows = rows or validated(cfg.data, stage, tokenizer_name_or_path, cfg.model.revision)
        out.append(rows.map_batches(keep_reached, fn_kwargs={"want_eval": split == "eval", "skip": skip.get(split)},
                                    **kw))
    train, evals = out
    return (tokenized(train, cfg, stage, tokenizer_name_or_path),
            tokenized(evals, cfg, stage, tokenizer_name_or_path))

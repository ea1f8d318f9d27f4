"""Training data as one ordered stream that every restart can rebuild (Ray Data side).

The driver turns the tokenized train split into the stream of the whole run
(`ordered_stream`): per epoch, rows sorted by `raydpo.data.order.order_key`, cut to whole
global micro-batches, epochs concatenated in order. Every worker reads that stream unsplit, in
order (`data_config`), and keeps its own slice of each global micro-batch (`raydpo.data.order.rank_batches`), so
the rows a step trains on depend on the seed, the step and the worker's rank only — not on
block layout, caching, or which worker asked Ray Data first. A resumed worker skips the
micro-batches before its checkpoint's position.

Evaluation is order-free (metric sums are all-reduced): eval stays a streaming split.
"""

from __future__ import annotations

import contextlib
from typing import Any

from raydpo.data.order import ORDER_KEY, ROW_ID, epochs_needed, order_key, usable_rows


def _with_order_key(batch, seed: int, epoch: int):
    import pyarrow as pa

    keys = order_key(batch[ROW_ID].to_numpy(), seed, epoch)
    return batch.append_column(ORDER_KEY, pa.array(keys, type=pa.int64()))


@contextlib.contextmanager
def ordered_execution():
    """Ray Data runs under this keep block order (tokenizing SFT packs rows batch by batch, so
    the blocks it makes depend on the order rows arrive in)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = saved


# a train split up to this size is sorted in one Ray Data task per epoch (one block, sorted whole);
# a larger one through Ray Data's distributed sort. Both give the same rows in the same order.
LOCAL_SORT_MAX_BYTES = 256 * 2**20


def _sorted_with_order_key(batch, seed: int, epoch: int):
    """One epoch of a whole split (one block) in the order `ordered_stream` defines."""
    return _with_order_key(batch, seed, epoch).sort_by([(ORDER_KEY, "ascending"), (ROW_ID, "ascending")])


def gather_split(ds, local_sort_max_bytes: int = LOCAL_SORT_MAX_BYTES):
    """A tokenized train split materialized once, in one block when it holds at most
    ``local_sort_max_bytes`` (each epoch is then sorted whole in one task: Ray Data's distributed
    sort pays three stages of task start-ups even for a few hundred rows; README, Performance).
    The multi-block copy is dropped as soon as the one block exists: one copy stays."""
    with ordered_execution():  # tokenized once, the same blocks on every rerun; each epoch sorts them
        ds = ds.materialize()
        if ds.num_blocks() > 1 and ds.size_bytes() <= local_sort_max_bytes:
            ds = ds.repartition(1).materialize()
    return ds


def ordered_stream(ds, n_rows: int, *, seed: int, global_batch: int, micro_batches: int, num_cpus: float):
    """The run's training stream, materialized: ``micro_batches`` global micro-batches of
    ``global_batch`` rows, epoch after epoch. ``ds`` (`gather_split`) holds ``n_rows`` rows with a
    ``row_id`` column: the whole split, or (a run inside epoch 0) any of its subsets that holds
    the rows the run reaches (`raydpo.data.reach`) — the same first rows either way.

    Each epoch is sorted by (order key, row id) — in one task when ``ds`` is one block, else by
    Ray Data's distributed sort — and cut with ``preserve_order`` on (a map after a sort otherwise
    hands blocks on as they finish), and the epochs are concatenated block list after block list
    (a ``union`` interleaves its inputs' blocks)."""
    import ray.data

    keep = usable_rows(n_rows, global_batch)
    whole = ds.num_blocks() == 1
    with ordered_execution():
        refs, left = [], micro_batches * global_batch
        for epoch in range(epochs_needed(n_rows, global_batch, micro_batches)):
            kw = {"fn_kwargs": {"seed": seed, "epoch": epoch}, "batch_format": "pyarrow", "num_cpus": num_cpus}
            if whole:
                epoch_ds = ds.map_batches(_sorted_with_order_key, batch_size=None, **kw)
            else:
                epoch_ds = ds.map_batches(_with_order_key, **kw).sort([ORDER_KEY, ROW_ID])
            refs += epoch_ds.limit(min(keep, left)).materialize().to_arrow_refs()
            left -= keep
        return ray.data.from_arrow_refs(refs)


def sft_stream(examples, *, seed: int, global_batch: int, micro_batches: int, block_size: int, chunk: int,
               num_cpus: float, epochs: bool = True):
    """SFT's training stream (`raydpo.data.packing`), materialized: the blocks of epoch 0, 1, ...
    (each cut to whole global micro-batches) until ``micro_batches`` global micro-batches, or
    None when ``epochs`` is False (``examples`` is a prefix of epoch 0's order, not every
    example) and its blocks fall short. ``examples``: every example, in one block
    (`gather_split`); each epoch is packed in one task."""
    import ray.data

    from raydpo.data.order import usable_rows
    from raydpo.data.packing import pack_epoch
    from raydpo.orchestration.errors import DataError

    refs, left, epoch = [], micro_batches * global_batch, 0
    with ordered_execution():
        while left > 0:
            blocks = examples.map_batches(pack_epoch, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
                                          fn_kwargs={"seed": seed, "epoch": epoch, "block_size": block_size,
                                                     "chunk": chunk}).materialize()
            keep = usable_rows(blocks.count(), global_batch)
            if not epochs and keep < left:
                return None
            if keep == 0:
                raise DataError(f"sft: {blocks.count()} packed blocks of {block_size} tokens, fewer than one global "
                                f"batch of {global_batch}; add data, or lower data.sft_block_size or the batch size")
            refs += blocks.limit(min(keep, left)).materialize().to_arrow_refs()
            left, epoch = left - keep, epoch + 1
    return ray.data.from_arrow_refs(refs)


def sft_data(cfg, tok_path: str, progress):
    """(SFT's training stream, its packed eval blocks, materialized, or None when empty): the
    examples the run reaches are found and tokenized (`raydpo.data.reach`); when their blocks
    fall short (more than `raydpo.data.packing.CHARS_PER_TOKEN` characters per token), every
    example is."""
    from raydpo.data.packing import pack_epoch
    from raydpo.data.pipeline import build_datasets, find_reach
    from raydpo.data.reach import EVAL_EPOCH, Reach

    s, d = cfg.sft, cfg.data
    reach = find_reach(cfg, "sft", tok_path)
    progress(f"[sft] the run reads {reach.describe()}: only those are tokenized")
    kw = {"seed": d.seed, "global_batch": s.per_device_batch_size * cfg.scaling.num_workers,
          "micro_batches": s.max_steps * s.gradient_accumulation_steps, "block_size": d.sft_block_size,
          "chunk": d.tokenize_batch_size, "num_cpus": d.tokenize_num_cpus}
    train, evals = build_datasets(cfg, "sft", tok_path, reach)
    whole = reach.train is None or reach.train.num_rows >= reach.n_train
    stream = sft_stream(gather_split(train, float("inf")), epochs=whole, **kw)
    if stream is None:
        progress("[sft] the examples found fill too few blocks (a tokenizer of long tokens): tokenizing every example")
        train, _ = build_datasets(cfg, "sft", tok_path, Reach(reach.n_train, reach.n_eval, None, reach.eval))
        stream = sft_stream(gather_split(train, float("inf")), **kw)
    eval_blocks = gather_split(evals, float("inf")).map_batches(
        pack_epoch, batch_size=None, batch_format="pyarrow", num_cpus=d.tokenize_num_cpus,
        fn_kwargs={"seed": d.seed, "epoch": EVAL_EPOCH, "block_size": d.sft_block_size,
                   "chunk": d.tokenize_batch_size}).materialize()
    return stream, (eval_blocks if eval_blocks.count() else None)


def data_config():
    """Ray Train's DataConfig: every dataset reaches every worker whole and in order; each rank
    takes its share (`raydpo.data.order.rank_batches`, `rank_eval_batches`). Nothing is split by
    Ray Data, so no split coordinator actor starts (its process and its first execution cost a run
    ~2 s of 2 cores before the first step and at each evaluation)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=opts)  # the same order on every rank


def eval_prompts(eval_ds, k: int) -> list[dict[str, list[int]]]:
    """The run's fixed held-out prompts for the eval generations, picked once on the driver: the
    first ``k`` distinct prompts of the tokenized eval split in ``row_id`` order (a content hash:
    the same prompts on every rerun, whatever the block layout). Plain lists, sent to every rank.

    One pass over the materialized split's rows keeping at most ``k + 1`` prompts, each at its
    smallest ``row_id``: no Ray Data sort, whose shuffle tasks need a whole CPU that a Tune
    trial's placement group does not hold. An evicted prompt can never belong to the first ``k``
    again (``k`` others already come before it, and they only move earlier)."""
    from raydpo.train.generate import held_out_prompts

    best: dict[tuple[int, ...], tuple[int, dict[str, Any]]] = {}
    for r in eval_ds.iter_rows():
        p, rid = tuple(int(t) for t in r["prompt_input_ids"]), int(r[ROW_ID])
        if p not in best or rid < best[p][0]:
            best[p] = (rid, r)
            if len(best) > k:
                del best[max(best, key=lambda q: best[q][0])]
    return held_out_prompts([r for _, r in sorted(best.values(), key=lambda v: v[0])], k)

"""The reference log-probs scored by the training workers themselves, at the start of a fit.

A DPO run with a precomputed reference (``dpo.reference: precomputed``) and no cached log-probs
scores its pairs here, before the first step: each rank scores its share of the rows with the
model it already loaded (adapter disabled, or the frozen SFT copy, in the engine's numerics:
`raydpo.models.pairs.reference_logps`, the call the Ray Data pass and the per-step path make),
the ranks exchange their ``(row_id, chosen, rejected)`` sums (`RefTable`: a few bytes a row), and
every batch the rank then trains or evaluates on gets its reference columns by ``row_id``
(`RefTable.attach`). No second model load, no actor pool; the rows scored are exactly those the
run reads (`raydpo.data.reach`), once each.

Each rank also writes the rows it scored, with their log-probs, as one parquet file into the
cache's building folder (`raydpo.storage.reference_part`), and rank 0 marks the folder scored once
every rank wrote (`raydpo.storage.reference_scored`): the driver then commits it as the
content-keyed cache (`raydpo.orchestration.reference`) that later runs and Tune trials read. A
worker restarted after a failure finds the marker and reads the parts instead of scoring again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from raydpo import storage
from raydpo.data.collate import REF_KEYS  # the reference columns a collated batch carries

PAIR_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
SCORE_BATCH_FACTOR = 1  # pairs per scoring call = the training micro-batch: within its memory, and fastest on CPU (25 vs 22 pairs/s at x4)


@dataclass(frozen=True)
class RefTable:
    """Reference log-prob sums by ``row_id`` (sorted, so a batch's lookup is one searchsorted)."""

    ids: np.ndarray  # int64, sorted
    chosen: np.ndarray  # float32
    rejected: np.ndarray  # float32

    @classmethod
    def of(cls, ids, chosen, rejected) -> RefTable:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], np.asarray(chosen, np.float32)[order], np.asarray(rejected, np.float32)[order])

    @classmethod
    def merged(cls, parts: Iterable[RefTable]) -> RefTable:
        parts = list(parts)
        return cls.of(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "chosen", "rejected")))

    def __len__(self) -> int:
        return len(self.ids)

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` (columns of numpy arrays, with ``row_id``) with the two reference columns."""
        want = np.asarray(batch["row_id"], dtype=np.int64)
        at = np.searchsorted(self.ids, want).clip(max=max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or not np.array_equal(self.ids[at], want):
            missing = want[self.ids[at] != want] if len(self.ids) else want
            raise RuntimeError(f"{len(missing)} row(s) of a batch have no reference log-probs (row_id {missing[0]}): "
                               "the rows scored at the fit's start are not the rows it reads")
        return {**batch, REF_KEYS[0]: self.chosen[at], REF_KEYS[1]: self.rejected[at]}


def dataset_name(split: str) -> str:
    """The Ray Train dataset a split to score reaches the workers under (whole, not split)."""
    return f"score_{split}"


def my_rows(n: int, world: int, rank: int) -> slice:
    """This rank's contiguous share of ``n`` rows (sizes differ by at most one; some may be empty)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def score_batches(model, batches: Iterable[dict[str, Any]], pad_token_id: int, dpo, device) -> Iterator[dict]:
    """Each numpy batch of pairs with its reference columns: the training forward as the
    reference (`raydpo.models.pairs.reference_logps`), in ``dpo``'s layout and head."""
    import torch

    from raydpo.data.collate import collate_dpo, ragged
    from raydpo.models.pairs import head_options, reference_logps

    was_training = model.training
    model.eval()
    try:
        for b in batches:
            if len(b["row_id"]) == 0:
                continue
            t = collate_dpo({k: ragged(list(b[k])) for k in PAIR_KEYS}, pad_token_id,
                            share_prefix=dpo.share_prefix, pack=dpo.padding_free)
            with torch.no_grad():
                c, r = reference_logps(model, {k: v.to(device) for k, v in t.items()}, **head_options(dpo))
            yield {**b, REF_KEYS[0]: c.float().cpu().numpy(), REF_KEYS[1]: r.float().cpu().numpy()}
    finally:
        model.train(was_training)


def table_of(scored: list[dict[str, Any]]) -> RefTable:
    if not scored:
        return RefTable.of([], [], [])
    return RefTable.of(*(np.concatenate([np.asarray(b[k]) for b in scored]) for k in ("row_id", *REF_KEYS)))


def gather_tables(local: RefTable) -> RefTable:
    """Every rank's table, merged, on every rank (one all-gather of a few bytes a row)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return RefTable.merged(parts)


def write_part(scored: list[dict[str, Any]], building: str, split: str, rank: int) -> None:
    """This rank's scored rows of ``split``, every column, as one parquet file of the cache being built."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not scored:
        return
    table = pa.concat_tables([pa.table({k: _arrow(v) for k, v in b.items()}) for b in scored])
    fs, path = storage.filesystem(storage.reference_part(building, split, rank))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _arrow(values):
    import pyarrow as pa

    if isinstance(values, np.ndarray) and values.dtype == object:  # ragged token ids
        return pa.array([np.asarray(v).tolist() for v in values], type=pa.list_(pa.int32()))
    return pa.array(values)


def read_parts(building: str) -> RefTable:
    """The table of the parts a finished scoring left (a restarted worker's shortcut)."""
    import pyarrow.parquet as pq

    cols = ["row_id", *REF_KEYS]
    tables = []
    for split in ("train", "eval"):
        folder = storage.reference_part_dir(building, split)
        if storage.is_dir(folder):
            fs, path = storage.filesystem(folder)
            tables.append(pq.read_table(path, columns=cols, filesystem=fs))
    return RefTable.merged(RefTable.of(*(t[c].to_numpy() for c in cols)) for t in tables)


def score_reference(model, splits: dict[str, Callable[[int], Iterable[dict[str, Any]]]], building: str, *,
                    pad_token_id: int, dpo, device, rank: int, world: int, progress) -> RefTable:
    """Score this rank's share of every split (``splits[name](batch_size)`` yields the split's
    rows whole, as numpy batches, the same on every rank), write it into ``building``, and return
    the merged table of all ranks; or, when ``building`` is already marked scored, read it."""
    import time

    import torch.distributed as dist

    done = storage.reference_scored(building)
    if storage.exists(done):
        table = read_parts(building)
        progress(f"[reference] read the {len(table)} reference log-probs the workers scored before ({building})")
        return table
    t0, per_call = time.perf_counter(), dpo.per_device_batch_size * SCORE_BATCH_FACTOR
    mine: list[dict[str, Any]] = []
    for split, rows in splits.items():
        scored = list(score_batches(model, _share(rows(per_call * world), world, rank), pad_token_id, dpo, device))
        write_part(scored, building, split, rank)
        mine += scored
    table = gather_tables(table_of(mine))
    if dist.is_initialized():
        dist.barrier()  # every part is written before the folder is marked
    if rank == 0:
        storage.write_text(done, json.dumps({"rows": len(table), "workers": world}))
    progress(f"[reference] the {world} worker(s) scored {len(table)} pairs' reference log-probs at the fit's start "
             f"({time.perf_counter() - t0:.1f}s): no second model, cached for later runs")
    return table


def add_reference(model, cols: dict[str, list], pad_token_id: int, dpo, device, *, rank: int = 0,
                  world: int = 1) -> None:
    """The torchrun runner's reference pass (`raydpo.train.standalone`): ``cols`` (tokenized pairs
    as lists, with ``row_id``) gains the two reference columns. ``world`` > 1: every rank holds the
    same rows, scores its share and the ranks exchange sums; 1: this rank scores all of its rows."""
    n, per_call = len(cols["row_id"]), dpo.per_device_batch_size * SCORE_BATCH_FACTOR
    mine = my_rows(n, world, rank)
    batches = ({k: cols[k][lo:min(lo + per_call, mine.stop)] for k in (*PAIR_KEYS, "row_id")}
               for lo in range(mine.start, mine.stop, per_call))
    table = table_of(list(score_batches(model, batches, pad_token_id, dpo, device)))
    if world > 1:
        table = gather_tables(table)
    got = table.attach({"row_id": np.asarray(cols["row_id"], dtype=np.int64)}) if n else {k: [] for k in REF_KEYS}
    for k in REF_KEYS:
        cols[k] = np.asarray(got[k]).tolist()


def _share(batches: Iterable[dict[str, Any]], world: int, rank: int) -> Iterator[dict[str, Any]]:
    """This rank's contiguous share of each batch (every row goes to exactly one rank)."""
    for b in batches:
        s = my_rows(len(b["row_id"]), world, rank)
        yield {k: v[s] for k, v in b.items()}

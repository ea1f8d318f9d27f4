"""The order in which training sees its rows: a seeded per-epoch shuffle by stable row id.

Resuming a run exactly needs an order that a restarted worker can rebuild from nothing but the
config and a position. So the order is a pure function of (``seed``, epoch, ``row_id``):

* ``row_id`` is a 64-bit digest of the row's content (`row_id`), the same whatever file layout,
  block size, cache or number of workers produced it;
* epoch ``e`` sorts the rows by ``order_key(row_id, seed, e)`` (a splitmix64 mix), ties (identical
  rows) broken by ``row_id``;
* an epoch keeps ``usable_rows(n, global_batch)`` rows, a whole number of global micro-batches,
  so a global micro-batch never straddles two epochs;
* global micro-batch ``i`` of the stream is rows ``[i*G, (i+1)*G)`` (``G = batch x workers``);
  worker ``w`` trains on rows ``[i*G + w*batch, i*G + (w+1)*batch)`` of it.

A checkpoint at optimizer step ``s`` therefore sits at micro-batch ``s * accumulation`` of the
stream: within an epoch no row is seen twice and none is skipped, before or after a restart.

Pure numpy; Ray Data (`raydpo.orchestration.ingest`) and the torchrun runner both call it;
`rank_batches` is each rank's slice of the stream, on the worker.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

ROW_ID = "row_id"
ORDER_KEY = "order_key"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def row_id(*parts: str | bytes | memoryview | list[int]) -> int:
    """A signed 64-bit id from a row's content (texts, their UTF-8 bytes, or token ids); stable
    across processes."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, str):
            b = p.encode("utf-8", "surrogatepass")
        elif isinstance(p, (bytes, memoryview)):
            b = p
        else:
            b = np.asarray(p, dtype=np.int64).tobytes()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return int.from_bytes(h.digest(), "little", signed=True)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def order_key(row_ids, seed: int, epoch: int) -> np.ndarray:
    """The sort key of each row in ``epoch`` (uint64 >> 1 as int64, so Arrow sorts it natively)."""
    ids = np.asarray(row_ids, dtype=np.int64).view(np.uint64)
    salt = _mix(np.array([(int(seed) & 0xFFFFFFFF) << 32 | (int(epoch) & 0xFFFFFFFF)], dtype=np.uint64))
    with np.errstate(over="ignore"):
        k = _mix(ids + salt * _GOLDEN + _GOLDEN)
    return (k >> np.uint64(1)).astype(np.int64)


def epoch_order(row_ids, seed: int, epoch: int) -> np.ndarray:
    """Indices of ``row_ids`` in the order epoch ``epoch`` visits them (all of them)."""
    ids = np.asarray(row_ids, dtype=np.int64)
    return np.lexsort((ids, order_key(ids, seed, epoch)))


def usable_rows(n_rows: int, global_batch: int) -> int:
    """Rows one epoch trains on: whole global micro-batches only (the tail is dropped, as with
    ``drop_last``)."""
    return (n_rows // global_batch) * global_batch


def epochs_needed(n_rows: int, global_batch: int, micro_batches: int) -> int:
    """Epochs of the stream that ``micro_batches`` global micro-batches run through."""
    per_epoch = n_rows // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows are fewer than one global batch of {global_batch}")
    return -(-micro_batches // per_epoch)


def position(micro_batches_done: int, n_rows: int, global_batch: int) -> tuple[int, int]:
    """(epoch, rows into that epoch) after ``micro_batches_done`` global micro-batches."""
    per_epoch = n_rows // global_batch
    return micro_batches_done // per_epoch, (micro_batches_done % per_epoch) * global_batch


def rank_batches(iter_numpy: Callable[[int], Iterator[dict[str, Any]]], per_device: int, world: int, rank: int,
                 collate: Callable[[dict[str, Any]], Any], skip: int = 0,
                 cost: Callable[[dict[str, Any]], np.ndarray] | None = None) -> Iterator[Any]:
    """This rank's collated micro-batches of the stream from micro-batch ``skip`` on.
    ``iter_numpy(batch_size)`` yields the stream's consecutive rows as dicts of numpy arrays.
    ``cost`` (one number per row, e.g. its tokens): the global micro-batch's rows are dealt to the
    ranks so each gets ``per_device`` rows and about the same cost (`balanced_share`), so no rank
    waits for a slower one at the gradient all-reduce; without it, rank ``w`` takes the ``w``-th
    contiguous slice. Either way the global micro-batch, hence the step, is the same."""
    lo, hi = rank * per_device, (rank + 1) * per_device
    for i, b in enumerate(iter_numpy(per_device * world)):
        if i < skip:
            continue
        if len(b[ROW_ID]) < per_device * world:
            return  # the stream holds whole global micro-batches; a short tail is not trained on
        mine = slice(lo, hi) if cost is None or world == 1 else balanced_share(cost(b), world, rank)
        yield collate({k: v[mine] for k, v in b.items()})


def rank_eval_batches(iter_numpy: Callable[[int], Iterator[dict[str, Any]]], per_device: int, world: int,
                      rank: int, collate: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
    """This rank's collated eval batches of a split every rank reads whole, in the same order:
    rank ``w`` takes the ``w``-th equal slice of each ``per_device * world`` rows. The short last
    batch is cut to a multiple of ``world`` (at most ``world - 1`` rows left out, as Ray Data's
    equal split leaves them), so every rank runs the same number of forwards (ZeRO-3 gathers
    weights in each) and no Ray Data split coordinator is needed."""
    for b in iter_numpy(per_device * world):
        per = len(b[ROW_ID]) // world
        if per == 0:
            return
        yield collate({k: v[rank * per:(rank + 1) * per] for k, v in b.items()})


def balanced_share(costs: np.ndarray, world: int, rank: int) -> np.ndarray:
    """Indices (ascending) of the rows rank ``rank`` takes: the rows, costliest first, each go to
    the rank with the least cost so far among those with room (``len(costs) / world`` rows each;
    ties to the lower rank). Deterministic, so every rank computes the same deal."""
    costs = np.asarray(costs, dtype=np.float64)
    per = len(costs) // world
    load, room, owner = np.zeros(world), np.full(world, per), np.empty(len(costs), dtype=np.int64)
    for i in np.argsort(-costs, kind="stable"):
        open_ = np.flatnonzero(room > 0)
        w = open_[np.argmin(load[open_])]
        owner[i], load[w], room[w] = w, load[w] + costs[i], room[w] - 1
    return np.flatnonzero(owner == rank)

"""What a run reaches, known before anything is tokenized or scored.

A DPO run trains on the first ``max_steps x accumulation x global batch`` rows of its seeded
order (`raydpo.data.order`), epoch after epoch. A row's place in that order is a function of its
``row_id`` alone, and a pair's ``row_id`` is a digest of its text, so which rows a run reaches is
known from one cheap pass over the text (read, check, hash: no tokenizer, no model):

* the pass (`reach_summary`, run on every block of the source) keeps, per block, the rows that
  may be reached — the block's own first ``k`` training rows in epoch 0's order (the run's first
  ``k`` are among them) — with their ids, keys and the block's counts; the driver merges them
  (`Kept`), never holding much more than ``k`` rows, and the kept rows themselves (texts, not
  just ids) are what gets tokenized: the source is read once;
* a run that stays inside epoch 0 (``k <= usable_rows``) tokenizes and scores exactly those
  rows (identical rows share an id and come along together); one that reaches a second epoch
  needs every row (read again, unless the pass already kept them all: a small source);
* evaluation reads at most ``eval_max_batches`` batches per worker: the eval rows it reads are
  the first ``eval_max_batches x global batch`` of a second seeded order (salt `EVAL_EPOCH`),
  all of them when unbounded.

The training stream built from the reached rows is the stream the whole split would give
(`raydpo.orchestration.ingest.ordered_stream` sorts and cuts them the same way):
``tests/integration/test_data_pipeline.py`` compares the two.

SFT cuts its examples' order by characters of text instead of rows, in whole packing chunks
(`Cut`, `raydpo.data.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raydpo.data.order import order_key, row_id, usable_rows
from raydpo.data.rows import VALID

EVAL_EPOCH = 0xFFFFFFFF  # the eval sample's order: a salt no training epoch reaches


@dataclass(frozen=True)
class Want:
    """How many rows of each split a run reads (None: all of them)."""

    train: int | None
    eval: int | None

    @classmethod
    def of(cls, micro_batches: int, global_batch: int, eval_max_batches: int | None) -> Want:
        return cls(micro_batches * global_batch, eval_max_batches * global_batch if eval_max_batches else None)

    def covers(self, other: Want) -> bool:
        """Does a cache holding this reach hold every row ``other`` reads?"""
        return all(mine is None or (theirs is not None and theirs <= mine)
                   for mine, theirs in ((self.train, other.train), (self.eval, other.eval)))

    def widest(self, other: Want) -> Want:
        """The rows either reads."""
        def most(a, b):
            return None if a is None or b is None else max(a, b)
        return Want(most(self.train, other.train), most(self.eval, other.eval))

    def to_json(self) -> dict:
        return {"train": self.train, "eval": self.eval}

    @classmethod
    def from_json(cls, d: dict | None) -> Want:
        """A marker written before reaches were recorded holds every row."""
        return cls(d.get("train"), d.get("eval")) if d else cls(None, None)


@dataclass(frozen=True)
class Reach:
    """The rows a run reads: the counts of valid train/eval rows in the source and, per split,
    the formatted rows themselves (a pyarrow table with an ``_id`` column), or None: every row
    of that split, read from the source again."""

    n_train: int
    n_eval: int
    train: Any = None
    eval: Any = None
    unit: str = "pairs"  # what a row is: DPO pairs, SFT examples

    @classmethod
    def everything(cls) -> Reach:
        return cls(-1, -1)

    @property
    def train_ids(self) -> np.ndarray | None:
        return None if self.train is None else self.train[ID].to_numpy()

    @property
    def eval_ids(self) -> np.ndarray | None:
        return None if self.eval is None else self.eval[ID].to_numpy()

    @property
    def want(self) -> Want:
        """What this reach holds, as a cache records it (None: every row of the split)."""
        def held(t, n):
            return None if t is None or t.num_rows >= n else t.num_rows
        return Want(held(self.train, self.n_train), held(self.eval, self.n_eval))

    def as_examples(self) -> Reach:
        return Reach(self.n_train, self.n_eval, self.train, self.eval, "examples")

    def describe(self) -> str:
        def part(t, n, split):
            what = f"{split} {self.unit}"
            return f"all {n:,} {what}" if t is None or t.num_rows >= n else f"{t.num_rows:,} of {n:,} {what}"
        return f"{part(self.train, self.n_train, 'train')} and {part(self.eval, self.n_eval, 'eval')}"


ID, KEY, COUNT = "_id", "_key", "_count"  # columns of the reach pass's output rows


def pair_ids(prompts: list[str], chosen: list[str], rejected: list[str]) -> np.ndarray:
    """The ``row_id`` of each pair, as tokenization computes it (`raydpo.data.tokenize.tokenize_dpo`)."""
    return np.fromiter((row_id(*t) for t in zip(prompts, chosen, rejected)), dtype=np.int64, count=len(prompts))


def smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows with the smallest (key, id), in that order."""
    return np.lexsort((ids, keys))[:k]


@dataclass(frozen=True)
class Cut:
    """Where a split's order is cut: after ``target`` rows (DPO pairs) or, with ``chars``,
    ``target`` characters of example text (SFT: `raydpo.data.packing.chars_target`), rounded up
    to whole chunks of ``chunk`` rows; a ``target`` of None keeps every row."""

    target: int | None
    chars: bool = False
    chunk: int = 1

    def ids(self, prompts: list[str], chosen: list[str], rejected: list[str]) -> np.ndarray:
        """The rows' ids: a pair's `pair_ids`, an SFT example's `raydpo.data.packing.example_ids`."""
        if self.chars:
            from raydpo.data.packing import example_ids

            return example_ids(prompts, chosen)
        return pair_ids(prompts, chosen, rejected)

    def weights(self, prompts: list[str], chosen: list[str]) -> np.ndarray:
        """What each row counts toward ``target``: 1, or its example's characters."""
        if not self.chars:
            return np.ones(len(prompts), np.int64)
        return np.fromiter((len(p) + len(c) for p, c in zip(prompts, chosen)), np.int64, count=len(prompts))

    def keep(self, weights_in_order: np.ndarray, slack: bool = False) -> int:
        """Rows of an ordered run of rows to keep: through the row where the weight reaches
        ``target``, rounded up to a whole chunk; with ``slack`` (a batch's own rows), ``chunk - 1``
        rows more instead of the rounding (a batch keeps every row the merged order will)."""
        n = len(weights_in_order)
        if self.target is None:
            return n
        m = int(np.searchsorted(np.cumsum(weights_in_order), self.target)) + 1
        return min(n, m + self.chunk - 1 if slack else -(-m // self.chunk) * self.chunk)


def _split_rows(batch, want_eval: bool):
    import pyarrow.compute as pc

    return batch.filter(pc.and_(pc.equal(batch["reason"], VALID), pc.equal(batch["is_eval"], want_eval)))


def _kept(keys: np.ndarray, ids: np.ndarray, weights: np.ndarray, cut: Cut, slack: bool) -> np.ndarray:
    """Indices of the rows ``cut`` keeps, in the split's order."""
    order = smallest(keys, ids, len(ids))
    return order[:cut.keep(weights[order], slack)]


def _first(rows, cut: Cut, slack: bool):
    """``rows`` (one split, with their `ID` and `KEY` columns) in the split's order, cut by ``cut``."""
    import pyarrow as pa

    take = _kept(rows[KEY].to_numpy(), rows[ID].to_numpy(),
                 cut.weights(rows["prompt"].to_pylist(), rows["chosen"].to_pylist()), cut, slack)
    return rows.take(pa.array(take))


def reach_summary(batch, *, seed: int, train: Cut, eval: Cut):  # noqa: A002 - the split's name
    """Ray Data batch function (validated rows → the rows that may be reached): the batch's
    valid train rows in epoch 0's order cut by ``train``, and its valid eval rows in the eval
    order cut by ``eval``, with the columns `ID`, `KEY` and `COUNT` (the split's valid rows in the
    batch, on the split's first output row). Only the kept rows are copied: a block's texts are
    read once, as Python strings for the ids, never filtered or sorted whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = pc.equal(batch["reason"], VALID).to_numpy(zero_copy_only=False)
    is_eval = batch["is_eval"].to_numpy(zero_copy_only=False)
    texts = {c: batch[c].to_pylist() for c in ("prompt", "chosen", "rejected")}
    parts = []
    for want_eval, epoch, cut in ((False, 0, train), (True, EVAL_EPOCH, eval)):
        idx = np.flatnonzero(valid & (is_eval == want_eval))
        p, c, r = ([texts[k][i] for i in idx] for k in ("prompt", "chosen", "rejected"))
        ids = cut.ids(p, c, r)
        keys = order_key(ids, seed, epoch)
        take = _kept(keys, ids, cut.weights(p, c), cut, slack=True)
        counts = np.zeros(len(take), np.int64)
        counts[:1] = len(idx)
        parts.append(batch.take(pa.array(idx[take], pa.int64())).append_column(ID, pa.array(ids[take], pa.int64()))
                     .append_column(KEY, pa.array(keys[take], pa.int64())).append_column(COUNT, pa.array(counts)))
    return pa.concat_tables(parts)


class Kept:
    """The rows a `Cut` keeps of a stream of tables (`reach_summary` output of one split): at
    most about twice that + one table in memory."""

    def __init__(self, cut: Cut):
        self.cut, self.parts, self.rows, self.bound = cut, [], 0, 4096

    def add(self, table) -> None:
        self.parts.append(table)
        self.rows += table.num_rows
        if self.cut.target is not None and self.rows > self.bound:
            self.parts = [_first(self._all(), self.cut, slack=True)]
            self.rows = self.parts[0].num_rows
            self.bound = max(self.bound, 2 * self.rows)

    def _all(self):
        import pyarrow as pa

        return pa.concat_tables(self.parts)

    def result(self):
        return _first(self._all(), self.cut, slack=False)


def merge_summaries(batches, train: Cut, eval: Cut, global_batch: int) -> Reach:  # noqa: A002
    """The `Reach` of a source from its `reach_summary` output (an iterable of pyarrow tables).
    A DPO run past epoch 0 reads every train row: they are all here when no batch held more
    than the cut (a small source), else ``train`` is None (read the source again)."""
    import pyarrow.compute as pc

    n = {False: 0, True: 0}
    kept = {False: Kept(train), True: Kept(eval)}
    for b in batches:
        for is_eval in (False, True):
            part = b.filter(pc.equal(b["is_eval"], is_eval))
            n[is_eval] += int(pc.sum(part[COUNT]).as_py() or 0)
            kept[is_eval].add(part)
    rows, evals = kept[False].result(), kept[True].result()
    past_epoch_0 = not train.chars and train.target is not None and train.target > usable_rows(n[False], global_batch)
    if past_epoch_0 and rows.num_rows < n[False]:
        rows = None
    return Reach(n[False], n[True], rows, evals)


def keep_reached(batch, *, want_eval: bool, skip: np.ndarray | None = None):
    """Valid rows of one side of the split, less those whose id is in ``skip`` (already scored).
    Pyarrow in, pyarrow out."""
    import pyarrow as pa

    rows = _split_rows(batch, want_eval)
    if skip is None or not len(skip):
        return rows
    mine = pair_ids(rows["prompt"].to_pylist(), rows["chosen"].to_pylist(), rows["rejected"].to_pylist())
    return rows.filter(pa.array(~np.isin(mine, skip)))

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

from dataclasses import dataclass, replace
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


def text_ids(table, names: tuple[str, ...], idx: np.ndarray | None = None) -> np.ndarray:
    """`raydpo.data.order.row_id` of the texts in columns ``names`` of rows ``idx`` (default all)
    of a pyarrow table, hashed straight from Arrow's buffers (no Python string per text: a third
    of the reach pass's time on a 1M-row source). The rows must hold no nulls.
    ``tests/test_reach.py`` holds it equal to `row_id`."""
    import hashlib

    import pyarrow as pa

    views = []
    for name in names:
        col = table[name]
        col = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.binary())
        offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + len(col) + 1].tolist()
        data = col.buffers()[2]
        views.append((offsets, memoryview(data) if data is not None else memoryview(b"")))
    rows = range(table.num_rows) if idx is None else idx.tolist()
    out = np.empty(len(rows), np.int64)
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for j, i in enumerate(rows):  # row_id, inlined: this loop is the pass's largest cost after the read
        h = blake2b(digest_size=8)
        for o, data in views:
            a, b = o[i], o[i + 1]
            h.update((b - a).to_bytes(8, "little"))
            h.update(data[a:b])
        out[j] = from_bytes(h.digest(), "little", signed=True)
    return out


def smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows with the smallest (key, id), in that order."""
    return np.lexsort((ids, keys))[:k]


VALID_SHARE = 0.5  # the share of a source's rows `Cut.bounded` counts on being valid
MIN_EXAMPLE_CHARS = 64  # ... and the fewest characters it counts on an SFT example having


@dataclass(frozen=True)
class Cut:
    """Where a split's order is cut: after ``target`` rows (DPO pairs) or, with ``chars``,
    ``target`` characters of example text (SFT: `raydpo.data.packing.chars_target`), rounded up
    to whole chunks of ``chunk`` rows; a ``target`` of None keeps every row. With ``below``, a
    block offers only rows whose order key is below it (`bounded`)."""

    target: int | None
    chars: bool = False
    chunk: int = 1
    below: int | None = None

    def bounded(self, source_rows: int | None, share: float) -> Cut:
        """This cut with a key bound that about ``(k + 4 sqrt(k) + 8) / VALID_SHARE`` rows of a
        source of ``source_rows`` rows (``share`` of them in this split) fall under, ``k`` the
        rows the cut needs: order keys are uniform, so the cut's rows are almost surely among
        them, and what the blocks hand the driver no longer grows with the source. `enough` tells
        when they are not (then the pass runs again without the bound)."""
        if source_rows is None or self.target is None or share <= 0:
            return self
        k = (-(-self.target // MIN_EXAMPLE_CHARS) if self.chars else self.target) + self.chunk
        fraction = (k + 4 * k ** 0.5 + 8) / (source_rows * share * VALID_SHARE)
        return self if fraction >= 1 else replace(self, below=int(fraction * 2.0**63))

    def ids(self, table, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx``'s ids: a pair's `pair_ids`, an SFT example's `raydpo.data.packing.example_ids`."""
        return text_ids(table, ("prompt", "chosen") if self.chars else ("prompt", "chosen", "rejected"), idx)

    def weights(self, table, idx: np.ndarray | None = None) -> np.ndarray:
        """What each row counts toward ``target``: 1, or its example's characters."""
        n = table.num_rows if idx is None else len(idx)
        if not self.chars:
            return np.ones(n, np.int64)
        import pyarrow.compute as pc

        chars = (pc.utf8_length(table["prompt"]).to_numpy() + pc.utf8_length(table["chosen"]).to_numpy())
        return chars.astype(np.int64) if idx is None else chars[idx].astype(np.int64)

    def keep(self, weights_in_order: np.ndarray, slack: bool = False) -> int:
        """Rows of an ordered run of rows to keep: through the row where the weight reaches
        ``target``, rounded up to a whole chunk; with ``slack`` (a batch's own rows), ``chunk - 1``
        rows more instead of the rounding (a batch keeps every row the merged order will)."""
        n = len(weights_in_order)
        if self.target is None:
            return n
        m = int(np.searchsorted(np.cumsum(weights_in_order), self.target)) + 1
        return min(n, m + self.chunk - 1 if slack else -(-m // self.chunk) * self.chunk)

    def enough(self, weights_in_order: np.ndarray, n_valid: int) -> bool:
        """Do these rows (every row under the key bound, in order; ``n_valid`` rows in the split)
        hold the whole cut? Every row above the bound comes after them in the order, so they do
        when they reach ``target`` and its chunk, or are all the split's rows."""
        n = len(weights_in_order)
        if self.below is None or n >= n_valid:
            return True
        if self.target is None or not n or int(np.sum(weights_in_order)) < self.target:
            return False
        m = int(np.searchsorted(np.cumsum(weights_in_order), self.target)) + 1
        return -(-m // self.chunk) * self.chunk <= n


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

    take = _kept(rows[KEY].to_numpy(), rows[ID].to_numpy(), cut.weights(rows), cut, slack)
    return rows.take(pa.array(take))


COUNT_ONLY = "_count_only"  # the `reason` of a row that carries only a block's `COUNT`


def reach_summary(batch, *, seed: int, train: Cut, eval: Cut):  # noqa: A002 - the split's name
    """Ray Data batch function (validated rows → the rows that may be reached): the batch's
    valid train rows in epoch 0's order cut by ``train``, and its valid eval rows in the eval
    order cut by ``eval`` (each only from rows under its key bound, `Cut.bounded`), with the
    columns `ID`, `KEY` and `COUNT` (the split's valid rows in the batch, on the split's first
    output row: a `COUNT_ONLY` row when none is kept). Only the kept rows are copied: a block's
    texts are hashed from Arrow's buffers, never filtered or sorted whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = pc.equal(batch["reason"], VALID).to_numpy(zero_copy_only=False)
    is_eval = batch["is_eval"].to_numpy(zero_copy_only=False)
    parts = []
    for want_eval, epoch, cut in ((False, 0, train), (True, EVAL_EPOCH, eval)):
        idx = np.flatnonzero(valid & (is_eval == want_eval))
        ids = cut.ids(batch, idx)
        keys = order_key(ids, seed, epoch)
        under = np.flatnonzero(keys < cut.below) if cut.below is not None else np.arange(len(idx))
        take = under[_kept(keys[under], ids[under], cut.weights(batch, idx[under]), cut, slack=True)]
        rows = batch.take(pa.array(idx[take], pa.int64()))
        if not len(take) and len(idx):  # nothing under the bound: the count still reaches the driver
            take = np.zeros(1, np.int64)
            rows = batch.take(pa.array(idx[take], pa.int64()))
            rows = rows.set_column(rows.schema.get_field_index("reason"), "reason", pa.array([COUNT_ONLY]))
        counts = np.zeros(len(take), np.int64)
        counts[:1] = len(idx)
        parts.append(rows.append_column(ID, pa.array(ids[take], pa.int64()))
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

    def enough(self, n_valid: int) -> bool:
        """Do the rows offered hold the whole cut (`Cut.enough`)?"""
        rows = self._all()
        order = smallest(rows[KEY].to_numpy(), rows[ID].to_numpy(), rows.num_rows)
        return self.cut.enough(self.cut.weights(rows)[order], n_valid)


def merge_summaries(batches, train: Cut, eval: Cut, global_batch: int) -> Reach | None:  # noqa: A002
    """The `Reach` of a source from its `reach_summary` output (an iterable of pyarrow tables),
    or None when a key bound (`Cut.bounded`) left a split short: the source had fewer valid rows
    than its size promised (run the pass again without the bounds). A DPO run past epoch 0 reads
    every train row: they are all here when no batch held more than the cut (a small source),
    else ``train`` is None (read the source again)."""
    import pyarrow.compute as pc

    n = {False: 0, True: 0}
    kept = {False: Kept(train), True: Kept(eval)}
    for b in batches:
        for is_eval in (False, True):
            part = b.filter(pc.equal(b["is_eval"], is_eval))
            n[is_eval] += int(pc.sum(part[COUNT]).as_py() or 0)
            kept[is_eval].add(part.filter(pc.not_equal(part["reason"], COUNT_ONLY)))
    if not all(kept[e].enough(n[e]) for e in (False, True)):
        return None
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
    mine = text_ids(rows, ("prompt", "chosen", "rejected"))
    return rows.filter(pa.array(~np.isin(mine, skip)))

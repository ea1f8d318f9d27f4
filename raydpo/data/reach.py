"""What a run reaches, known before anything is tokenized or scored.

A DPO run trains on the first ``max_steps x accumulation x global batch`` rows of its seeded
order (`raydpo.data.order`), epoch after epoch. A row's place in that order is a function of its
``row_id`` alone, and a pair's ``row_id`` is a digest of its text, so which rows a run reaches is
known from one cheap pass over the text (read, check, hash: no tokenizer, no model):

* the pass (`reach_summary`, one small row per Ray Data batch) keeps, per batch, the ids of the
  batch's own first ``k`` training rows in epoch 0's order (the run's first ``k`` are among
  them) and the counts; the driver merges them (`Smallest`), never holding more than ``k`` ids;
* a run that stays inside epoch 0 (``k <= usable_rows``) tokenizes and scores exactly those
  rows (identical rows share an id and come along together); one that reaches a second epoch
  needs every row, as before;
* evaluation reads at most ``eval_max_batches`` batches per worker: the eval rows it reads are
  the first ``eval_max_batches x global batch`` of a second seeded order (salt `EVAL_EPOCH`),
  all of them when unbounded.

The training stream built from the reached rows is the stream the whole split would give
(`raydpo.orchestration.ingest.ordered_stream` sorts and cuts them the same way):
``tests/test_reach.py`` compares the two.

SFT's packed blocks are ordered by the blocks' content, which is not known before tokenizing:
an SFT run tokenizes every row of its source (`Reach.everything`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The rows a run reads: the valid train/eval rows of the source, and the ids of those it
    reaches (None: every row of that split)."""

    n_train: int
    n_eval: int
    train_ids: np.ndarray | None
    eval_ids: np.ndarray | None

    @classmethod
    def everything(cls) -> Reach:
        return cls(-1, -1, None, None)

    @property
    def want(self) -> Want:
        return Want(None if self.train_ids is None else len(self.train_ids),
                    None if self.eval_ids is None else len(self.eval_ids))

    def describe(self) -> str:
        def part(ids, n, what):
            return f"all {n:,} {what}" if ids is None else f"{len(ids):,} of {n:,} {what}"
        return f"{part(self.train_ids, self.n_train, 'train pairs')} and {part(self.eval_ids, self.n_eval, 'eval pairs')}"


def pair_ids(prompts: list[str], chosen: list[str], rejected: list[str]) -> np.ndarray:
    """The ``row_id`` of each pair, as tokenization computes it (`raydpo.data.tokenize.tokenize_dpo`)."""
    return np.fromiter((row_id(*t) for t in zip(prompts, chosen, rejected)), dtype=np.int64, count=len(prompts))


def smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows with the smallest (key, id), in that order."""
    order = np.lexsort((ids, keys))[:k]
    return keys[order], ids[order]


class Smallest:
    """A running `smallest` over batches of (key, id): at most ``k`` + one batch in memory."""

    def __init__(self, k: int | None):
        self.k = k
        self.keys = np.empty(0, np.int64)
        self.ids = np.empty(0, np.int64)

    def add(self, keys, ids) -> None:
        self.keys = np.concatenate([self.keys, np.asarray(keys, np.int64)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        if self.k is not None and len(self.ids) > 2 * self.k:
            self.keys, self.ids = smallest(self.keys, self.ids, self.k)

    def result(self) -> np.ndarray:
        return smallest(self.keys, self.ids, len(self.ids) if self.k is None else self.k)[1]


def _valid_ids(batch, want_eval: bool) -> np.ndarray:
    import pyarrow.compute as pc

    rows = batch.filter(pc.and_(pc.equal(batch["reason"], VALID), pc.equal(batch["is_eval"], want_eval)))
    return pair_ids(rows["prompt"].to_pylist(), rows["chosen"].to_pylist(), rows["rejected"].to_pylist())


def reach_summary(batch, *, seed: int, k_train: int | None, k_eval: int | None):
    """Ray Data batch function (validated rows → one row): the batch's valid train and eval row
    counts and the ids and keys of its first ``k`` rows of each split's order (none kept for a
    split read whole: ``k`` None)."""
    import pyarrow as pa

    out = {}
    for split, epoch, k in (("train", 0, k_train), ("eval", EVAL_EPOCH, k_eval)):
        ids = _valid_ids(batch, split == "eval")
        out[f"n_{split}"] = pa.array([len(ids)], pa.int64())
        keys, ids = smallest(order_key(ids, seed, epoch), ids, k) if k is not None else (ids[:0], ids[:0])
        out[f"{split}_keys"] = pa.array([keys], pa.list_(pa.int64()))
        out[f"{split}_ids"] = pa.array([ids], pa.list_(pa.int64()))
    return pa.table(out)


def merge_summaries(batches, want: Want, global_batch: int) -> Reach:
    """The `Reach` of a source from its `reach_summary` rows (an iterable of pyarrow batches).
    A run that reaches past epoch 0 reads every train row."""
    n = {"train": 0, "eval": 0}
    best = {"train": Smallest(want.train), "eval": Smallest(want.eval)}
    for b in batches:
        for split in n:
            n[split] += int(np.asarray(b[f"n_{split}"]).sum())
            for keys, ids in zip(b[f"{split}_keys"].to_pylist(), b[f"{split}_ids"].to_pylist()):
                best[split].add(keys, ids)
    train = None
    if want.train is not None and want.train <= usable_rows(n["train"], global_batch):
        train = best["train"].result()
    evals = best["eval"].result() if want.eval is not None and want.eval < n["eval"] else None
    return Reach(n["train"], n["eval"], train, evals)


def keep_reached(batch, *, want_eval: bool, ids: np.ndarray | None, skip: np.ndarray | None = None):
    """Valid rows of one side of the split that the run reaches (``ids``; None: all), less those
    whose id is in ``skip`` (already scored). Pyarrow in, pyarrow out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = batch.filter(pc.and_(pc.equal(batch["reason"], VALID), pc.equal(batch["is_eval"], want_eval)))
    if ids is None and (skip is None or not len(skip)):
        return rows
    mine = pair_ids(rows["prompt"].to_pylist(), rows["chosen"].to_pylist(), rows["rejected"].to_pylist())
    keep = np.isin(mine, ids) if ids is not None else np.ones(len(mine), bool)
    if skip is not None and len(skip):
        keep &= ~np.isin(mine, skip)
    return rows.filter(pa.array(keep))

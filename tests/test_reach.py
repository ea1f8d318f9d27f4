"""`raydpo.data.reach`: the rows a run reaches, picked from per-batch summaries, equal the first
rows of the whole split's seeded order — identical rows, batch boundaries and epochs included."""

import numpy as np
import pyarrow as pa

from raydpo.data.order import epoch_order, usable_rows
from raydpo.data.reach import (EVAL_EPOCH, Want, keep_reached, merge_summaries, pair_ids, reach_summary)


def _rows(n: int, dup_every: int = 7) -> pa.Table:
    prompts = [f"Question {i % (n - n // dup_every)}?" for i in range(n)]  # some rows repeat exactly
    return pa.table({"reason": ["" if i % 11 else "empty_field" for i in range(n)], "prompt": prompts,
                     "chosen": [f"yes {p}" for p in prompts], "rejected": [f"no {p}" for p in prompts],
                     "is_eval": [i % 5 == 0 for i in range(n)]})


def _first(table: pa.Table, want_eval: bool, seed: int, epoch: int, k: int) -> list[int]:
    kept = keep_reached(table, want_eval=want_eval, ids=None)
    ids = pair_ids(kept["prompt"].to_pylist(), kept["chosen"].to_pylist(), kept["rejected"].to_pylist())
    return sorted(ids[epoch_order(ids, seed, epoch)][:k].tolist())


def test_the_summaries_of_any_batching_pick_the_first_rows_of_the_seeded_order():
    table = _rows(1000)
    want = Want.of(micro_batches=5, global_batch=8, eval_max_batches=3)  # 40 train, 24 eval rows
    for batch_rows in (1000, 97, 10):
        summaries = [reach_summary(table.slice(i, batch_rows), seed=3, k_train=want.train, k_eval=want.eval)
                     for i in range(0, len(table), batch_rows)]
        reach = merge_summaries(summaries, want, global_batch=8)
        assert reach.n_train == sum(1 for r, e in zip(table["reason"].to_pylist(), table["is_eval"].to_pylist())
                                    if r == "" and not e)
        assert sorted(reach.train_ids.tolist()) == _first(table, False, 3, 0, 40)
        assert sorted(reach.eval_ids.tolist()) == _first(table, True, 3, EVAL_EPOCH, 24)
    kept = keep_reached(table, want_eval=False, ids=reach.train_ids)
    assert kept.num_rows >= 40 and set(pair_ids(kept["prompt"].to_pylist(), kept["chosen"].to_pylist(),
                                                kept["rejected"].to_pylist())) == set(reach.train_ids.tolist())


def test_a_run_past_epoch_0_or_an_unbounded_eval_reads_every_row():
    table = _rows(200)
    n_train = sum(1 for r, e in zip(table["reason"].to_pylist(), table["is_eval"].to_pylist()) if r == "" and not e)
    want = Want.of(micro_batches=usable_rows(n_train, 8) // 8 + 1, global_batch=8, eval_max_batches=None)
    reach = merge_summaries([reach_summary(table, seed=0, k_train=want.train, k_eval=None)], want, 8)
    assert reach.train_ids is None and reach.eval_ids is None and reach.want == Want(None, None)
    assert keep_reached(table, want_eval=False, ids=None).num_rows == n_train


def test_a_cache_covers_a_run_that_reads_no_more_than_it_holds():
    assert Want(64, 16).covers(Want(32, 16)) and Want(None, None).covers(Want(32, None))
    assert not Want(32, 16).covers(Want(64, 16)) and not Want(64, 16).covers(Want(32, None))
    assert Want.from_json(None) == Want(None, None) and Want.from_json(Want(8, None).to_json()) == Want(8, None)

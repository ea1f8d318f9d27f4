"""`raydpo.data.reach`: the rows a run reaches, picked batch by batch in one pass, are the first
rows of the whole split's seeded order — identical rows, batch boundaries and epochs included."""

import numpy as np
import pyarrow as pa

from raydpo.data.order import epoch_order, row_id, usable_rows
from raydpo.data.reach import (EVAL_EPOCH, ID, Cut, Want, keep_reached, merge_summaries, pair_ids, reach_summary,
                               text_ids)


def _rows(n: int, dup_every: int = 7) -> pa.Table:
    prompts = [f"Question {i % (n - n // dup_every)}?" for i in range(n)]  # some rows repeat exactly
    return pa.table({"reason": ["" if i % 11 else "empty_field" for i in range(n)], "prompt": prompts,
                     "chosen": [f"yes {p}" for p in prompts], "rejected": [f"no {p}" for p in prompts],
                     "is_eval": [i % 5 == 0 for i in range(n)]})


def _ids(table: pa.Table) -> np.ndarray:
    return pair_ids(table["prompt"].to_pylist(), table["chosen"].to_pylist(), table["rejected"].to_pylist())


def _first(table: pa.Table, want_eval: bool, seed: int, epoch: int, k: int) -> list[int]:
    ids = _ids(keep_reached(table, want_eval=want_eval))
    return ids[epoch_order(ids, seed, epoch)][:k].tolist()


def _pass(table: pa.Table, batch_rows: int, want: Want, seed: int = 3, global_batch: int = 8):
    cuts = Cut(want.train), Cut(want.eval)
    out = [reach_summary(table.slice(i, batch_rows), seed=seed, train=cuts[0], eval=cuts[1])
           for i in range(0, len(table), batch_rows)]
    return merge_summaries(out, *cuts, global_batch)


def test_the_pass_finds_the_first_rows_of_the_seeded_order_whatever_the_batches():
    table = _rows(1000)
    n_train = keep_reached(table, want_eval=False).num_rows
    want = Want.of(micro_batches=5, global_batch=8, eval_max_batches=3)  # 40 train, 24 eval rows
    for batch_rows in (1000, 97, 10):
        reach = _pass(table, batch_rows, want)
        assert (reach.n_train, reach.n_eval) == (n_train, keep_reached(table, want_eval=True).num_rows)
        # the rows themselves, in the order training sees them, duplicates included
        assert reach.train[ID].to_pylist() == _first(table, False, 3, 0, 40)
        assert reach.eval[ID].to_pylist() == _first(table, True, 3, EVAL_EPOCH, 24)
        assert _ids(reach.train).tolist() == reach.train[ID].to_pylist()  # texts and ids travel together
        assert reach.want == Want(40, 24)


def test_a_run_past_epoch_0_reads_every_row_from_the_pass_or_from_the_source_again():
    table = _rows(200)
    n_train = keep_reached(table, want_eval=False).num_rows
    want = Want.of(micro_batches=usable_rows(n_train, 8) // 8 + 1, global_batch=8, eval_max_batches=None)
    whole = _pass(table, 200, want)  # one batch of fewer rows than the run wants: every row kept
    assert sorted(whole.train[ID].to_pylist()) == sorted(_ids(keep_reached(table, want_eval=False)).tolist())
    assert whole.want == Want(None, None)
    # a run one row past epoch 0 whose batches held more rows than it wants: read again
    past = Want.of(micro_batches=1, global_batch=8, eval_max_batches=None)
    assert _pass(table, 200, past, global_batch=8).train is not None  # inside epoch 0
    g = next(g for g in range(7, 20) if n_train % g)  # an epoch drops a tail: the run can pass it first
    assert _pass(table, 200, Want(usable_rows(n_train, g) + 1, None), global_batch=g).train is None


def test_rows_already_scored_are_skipped_and_a_cache_covers_runs_reading_no_more():
    table = _rows(100)
    scored = _ids(keep_reached(table, want_eval=False))[:10]
    left = keep_reached(table, want_eval=False, skip=scored)
    assert not set(_ids(left).tolist()) & set(scored.tolist()) and left.num_rows > 50
    assert Want(64, 16).covers(Want(32, 16)) and Want(None, None).covers(Want(32, None))
    assert not Want(32, 16).covers(Want(64, 16)) and not Want(64, 16).covers(Want(32, None))
    assert Want(64, 8).widest(Want(32, None)) == Want(64, None)
    assert Want.from_json(None) == Want(None, None) and Want.from_json(Want(8, None).to_json()) == Want(8, None)


def test_sft_keeps_whole_chunks_of_the_order_until_their_text_reaches_the_target():
    """SFT cuts by characters of example text, rounded up to whole packing chunks: the same
    examples whatever the batches, and the first ones of the whole split's order."""
    from raydpo.data.packing import example_ids

    table = _rows(1000)
    kept = keep_reached(table, want_eval=False)
    ids = example_ids(kept["prompt"].to_pylist(), kept["chosen"].to_pylist())
    order = epoch_order(ids, 3, 0)
    chars = np.array([len(p) + len(c) for p, c in zip(kept["prompt"].to_pylist(), kept["chosen"].to_pylist())])[order]
    cut = Cut(2000, chars=True, chunk=16)
    m = int(np.argmax(np.cumsum(chars) >= 2000)) + 1
    want = -(-m // 16) * 16
    for batch_rows in (1000, 97, 10):
        out = [reach_summary(table.slice(i, batch_rows), seed=3, train=cut, eval=Cut(None, chars=True, chunk=16))
               for i in range(0, len(table), batch_rows)]
        reach = merge_summaries(out, cut, Cut(None, chars=True, chunk=16), global_batch=8)
        assert reach.train[ID].to_pylist() == ids[order][:want].tolist()
        assert reach.eval.num_rows == keep_reached(table, want_eval=True).num_rows  # unbounded eval: all


def _bounded_pass(table: pa.Table, batch_rows: int, want: Want, source_rows: int, seed: int = 3):
    cuts = Cut(want.train).bounded(source_rows, 0.8), Cut(want.eval).bounded(source_rows, 0.2)
    out = [reach_summary(table.slice(i, batch_rows), seed=seed, train=cuts[0], eval=cuts[1])
           for i in range(0, len(table), batch_rows)]
    return cuts, out, merge_summaries(out, *cuts, 8)


def test_a_key_bound_from_the_source_size_keeps_the_same_rows_and_hands_over_far_fewer():
    table = _rows(5000)
    want = Want.of(micro_batches=2, global_batch=8, eval_max_batches=1)
    plain = _pass(table, 250, want)
    cuts, out, bounded = _bounded_pass(table, 250, want, source_rows=5000)
    assert cuts[0].below is not None and cuts[1].below is not None
    assert bounded.train[ID].to_pylist() == plain.train[ID].to_pylist()
    assert bounded.eval[ID].to_pylist() == plain.eval[ID].to_pylist()
    assert (bounded.n_train, bounded.n_eval) == (plain.n_train, plain.n_eval)  # counts of blocks that offer none
    offered = sum(t.num_rows for t in out)
    unbounded = sum(t.num_rows for t in (reach_summary(table.slice(i, 250), seed=3, train=Cut(16), eval=Cut(8))
                                         for i in range(0, 5000, 250)))
    assert offered * 3 < unbounded


def test_a_bound_that_cut_too_deep_is_told_not_trusted():
    table = _rows(5000)
    want = Want.of(micro_batches=2, global_batch=8, eval_max_batches=1)
    _, _, short = _bounded_pass(table, 250, want, source_rows=500_000)  # the source claims 100x its rows
    assert short is None  # find_reach then runs the pass without bounds
    assert Cut(16).bounded(None, 0.8) == Cut(16) and Cut(None).bounded(10**6, 0.8) == Cut(None)
    assert Cut(16).bounded(40, 0.8).below is None  # a small source: every row is a candidate


def test_ids_hashed_from_arrow_buffers_equal_the_pair_ids():
    table = _rows(300).slice(7)
    assert text_ids(table, ("prompt", "chosen", "rejected")).tolist() == _ids(table).tolist()
    idx = np.array([0, 5, 9])
    assert text_ids(table, ("prompt", "chosen"), idx).tolist() == [
        row_id(p, c) for p, c in zip(table["prompt"].take(idx).to_pylist(), table["chosen"].take(idx).to_pylist())]

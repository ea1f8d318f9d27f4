"""The training order is a pure function of (seed, epoch, row id), so a restart can rebuild it:
the same whatever order the rows arrive in or how many workers share it; each epoch visits every
row once; each worker's slices of a step never overlap. Plus the fault hook's syntax and the
config fingerprint a resumed run is checked against."""

import numpy as np
import pytest

from raydpo.config import Config, fingerprint_diff, resume_fingerprint
from raydpo.data.order import epoch_order, epochs_needed, order_key, position, row_id, usable_rows
from raydpo.train.faults import Fault, parse
from raydpo.data.order import rank_batches


def _ids(n=50):
    return np.array([row_id(f"prompt {i}", f"chosen {i}", f"rejected {i}") for i in range(n)], dtype=np.int64)


def test_row_ids_are_stable_content_digests():
    assert row_id("a", "b", "c") == row_id("a", "b", "c") != row_id("ab", "", "c")  # lengths are part of it
    assert row_id([1, 2, 3]) == row_id([1, 2, 3]) != row_id([1, 2, 4])
    assert row_id("q", "a", "b") == 1684031257819756949  # a fixed value: never Python's salted hash()


def test_an_epoch_is_a_permutation_that_does_not_depend_on_arrival_order():
    ids = _ids()
    order = ids[epoch_order(ids, seed=0, epoch=0)]
    assert sorted(order.tolist()) == sorted(ids.tolist())  # every row once
    shuffled = ids[np.random.default_rng(1).permutation(len(ids))]
    assert order.tolist() == shuffled[epoch_order(shuffled, seed=0, epoch=0)].tolist()  # any block layout
    assert order.tolist() != ids[epoch_order(ids, seed=0, epoch=1)].tolist()  # a new shuffle per epoch
    assert order.tolist() != ids[epoch_order(ids, seed=1, epoch=0)].tolist()  # and per seed
    assert order_key(ids, 0, 0).dtype == np.int64 and (order_key(ids, 0, 0) >= 0).all()  # Arrow-sortable


@pytest.mark.parametrize("world", [1, 2, 4])
def test_workers_split_each_global_batch_without_overlap_and_see_the_same_stream(world):
    ids = _ids(40)
    per_device = 2
    g = per_device * world
    stream = np.concatenate([epoch_order(ids, 0, e)[:usable_rows(len(ids), g)] for e in range(2)])

    def batches(n):
        for lo in range(0, len(stream) - n + 1, n):
            yield {"row_id": ids[stream[lo:lo + n]]}

    seen = [list(rank_batches(batches, per_device, world, r, lambda b: b["row_id"].tolist())) for r in range(world)]
    steps = [sum((seen[r][i] for r in range(world)), []) for i in range(len(seen[0]))]
    per_epoch = len(ids) // g
    epoch0 = sum(steps[:per_epoch], [])
    assert len(epoch0) == len(set(epoch0)) == usable_rows(len(ids), g)  # no row twice in an epoch
    # the same global order whatever the worker count: rank slices concatenate to the stream
    assert sum(steps, []) == ids[stream].tolist()
    # a restart at micro-batch k picks up exactly where the stream was
    resumed = list(rank_batches(batches, per_device, world, 0, lambda b: b["row_id"].tolist(), skip=3))
    assert resumed == seen[0][3:]


def test_stream_geometry():
    assert usable_rows(103, 8) == 96 and epochs_needed(103, 8, 12) == 1 and epochs_needed(103, 8, 13) == 2
    assert position(13, 103, 8) == (1, 8)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epochs_needed(5, 8, 1)


def test_fault_specs():
    assert parse("kill@18:rank=1, nan@5,sigterm@7") == [Fault("kill", 18, 1), Fault("nan", 5, 0), Fault("sigterm", 7, 0)]
    assert parse("") == []
    with pytest.raises(ValueError, match="bad fault"):
        parse("explode@3")


def test_a_resumed_config_may_change_logging_and_length_but_not_the_maths():
    base = Config()
    same = base.with_overrides({"dpo.log_every": 3, "dpo.max_steps": 500, "run.max_failures": 2,
                                "tracking.experiment_name": "other"})
    assert fingerprint_diff(resume_fingerprint(base), resume_fingerprint(same)) == []
    changed = base.with_overrides({"dpo.beta": 0.2, "data.seed": 7})
    assert fingerprint_diff(resume_fingerprint(base), resume_fingerprint(changed)) == ["data.seed", "dpo.beta"]

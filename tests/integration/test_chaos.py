"""CI's cheap subset of the chaos suite (`raydpo.benchmarks.chaos`), as a user meets it through
the CLI: a NaN loss is skipped and counted and the run finishes; a worker SIGKILLed mid-run is
restarted from its latest checkpoint and ends where an uninterrupted run ends; an unreachable
MLflow store stops the command in seconds with one line and exit 2 before Ray starts.

Every run of this suite carries the same injected NaN at step 2 (`Suite(faults=...)`): the
baseline run is the NaN test's run, and the killed run is compared with it like for like."""

from __future__ import annotations

import pytest

from raydpo.benchmarks.chaos import SAVE_EVERY, Suite

NAN_STEP = 2


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    s = Suite(tmp_path_factory.mktemp("chaos"), faults=f"nan@{NAN_STEP}")
    s.baseline_row = s.baseline_run()
    return s


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_nan_loss_is_skipped_counted_and_the_run_finishes(suite):
    row = suite.baseline_row
    assert row.survived and row.exit_code == 0, row  # finished, one MLflow run, no step logged twice
    assert suite.nonfinite_steps("base") == 1  # the NaN step was skipped and counted, once


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_killed_worker_costs_at_most_save_every_steps_and_changes_nothing(suite):
    assert suite.baseline_row.survived, suite.baseline_row
    row = suite.kill(5, 1)
    assert NAN_STEP < SAVE_EVERY < 5  # the kill comes after the NaN step and a checkpoint
    assert row.finished and row.exit_code == 0, row
    assert 0 <= row.steps_lost <= SAVE_EVERY, row
    assert row.mlflow_runs == 1 and row.duplicate_points == 0, row  # one run, no step logged twice
    assert row.max_metric_diff is not None and row.max_metric_diff <= 1e-4, row  # the uninterrupted run's numbers


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_unreachable_tracking_store_is_one_line_and_exit_2_before_ray(suite):
    row = suite.mlflow_down_at_start()
    assert row.survived, row
    assert row.exit_code == 2 and row.seconds <= 10 and "unreachable" in row.error and "http://127.0.0.1:" in row.error

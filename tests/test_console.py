"""The console of a training command (`raydpo.orchestration.console`): raydpo's lines and a progress bar on the
terminal, everyone else's output in the run folder's log, all of it back with ``--verbose``."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from raydpo import cli
from raydpo.orchestration.console import Console
from raydpo.storage import log_file as log_path
from raydpo.tracking.terminal import echo
from raydpo.train.progress import format_progress, parse_progress

REPORT = "Reporting training result 3: TrainingReport(checkpoint=None, metrics={'train/loss': 0.69})"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _batch(*lines: str, pid: int = 101) -> dict:
    return {"pid": pid, "actor_name": "RayTrainWorker", "is_err": False, "lines": list(lines)}


def test_progress_line_round_trips_the_metrics_the_bar_shows():
    m = {"train/loss": 0.6828, "train/rewards/accuracies": 0.8125, "eval/loss": 0.6279, "train/tokens_per_s": 3165.0}
    line = format_progress("dpo", 3, 6, m)
    assert line.startswith("[dpo] step 3/6 ")
    p = parse_progress(line)
    assert (p.stage, p.step, p.total) == ("dpo", 3, 6)
    assert p.metrics == pytest.approx(m, rel=1e-3)
    for other in ("[dpo] step 3: non-finite loss or gradients; batch consumed", "[sft] 2 worker(s), 1 torch thread(s)",
                  REPORT):
        assert parse_progress(other) is None


def test_library_output_goes_to_the_log_and_raydpo_lines_to_the_terminal(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    path = Path(log_path(tmp_path / "runs", "demo"))  # a local run storage: the location is a path
    with Console(path, out=out, err=err) as con:
        os.write(2, b"[2026-12-02 WARNING real_accelerator.py] Setting accelerator to CPU\n")  # C-level / raw fd
        os.write(1, b"DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n")
        echo("[sft] MLflow run abc in sqlite:///x.db")
        con.on_worker_lines(_batch(REPORT, "[sft] 2 worker(s), 1 torch thread(s) each",
                                   "/x/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated",
                                   "warning: the latest checkpoint is unusable (bad digest); looking for an older one"))
        con.on_worker_lines(_batch("[sft] 2 worker(s), 1 torch thread(s) each"))  # Ray's second delivery
    shown = out.getvalue() + err.getvalue()
    assert shown.splitlines() == [
        "[sft] MLflow run abc in sqlite:///x.db", "[sft] 2 worker(s), 1 torch thread(s) each",
        "warning: the latest checkpoint is unusable (bad digest); looking for an older one"]
    log = path.read_text()
    assert path == tmp_path.resolve() / "runs" / "demo" / "raydpo.log"
    for chatter in ("Setting accelerator to CPU", "shm_comm_op built", "(RayTrainWorker pid=101) Reporting training result",
                    "FutureWarning"):
        assert chatter in log
    assert "[sft] MLflow run abc" in log  # the log is the whole story, raydpo's lines included
    os.write(1, b"")  # fds are back: writing to them works and goes where it went before
    assert sys.stdout is not None


def test_progress_lines_become_lines_with_an_eta_when_not_a_terminal(tmp_path, monkeypatch):
    out = io.StringIO()
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr("raydpo.orchestration.console.time.monotonic", lambda: next(clock))
    with Console(tmp_path / "raydpo.log", out=out, err=io.StringIO()) as con:
        for step, loss in ((1, 0.69), (3, 0.68), (6, 0.66)):
            con.on_worker_lines(_batch(format_progress("dpo", step, 6, {"train/loss": loss})))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[dpo] step 1/6 t:loss=0.69"
    assert lines[1] == "[dpo] step 3/6 t:loss=0.68 eta 0:15"  # 10 s for 2 steps, 3 to go
    assert lines[2] == "[dpo] step 6/6 t:loss=0.66 done in 0:30"


def test_on_a_terminal_each_stage_gets_one_bar_with_step_loss_accuracy_and_eta(tmp_path):
    out, err = io.StringIO(), Tty()
    with Console(tmp_path / "raydpo.log", out=out, err=err) as con:
        for step in (1, 3):
            con.on_worker_lines(_batch(format_progress("dpo", step, 6, {"train/loss": 0.68,
                                                                        "train/rewards/accuracies": 0.8125})))
        con.on_worker_lines(_batch("[dpo] step 3: non-finite loss or gradients; batch consumed, no update"))
        con.on_worker_lines(_batch(format_progress("dpo", 6, 6, {"train/loss": 0.66})))
    bar = err.getvalue()
    assert "[dpo] 3/6" in bar and "loss=0.68" in bar and "acc=0.8125" in bar and "<" in bar  # elapsed<remaining
    assert "[dpo] 6/6" in bar
    assert "step 3/6" not in out.getvalue()  # the bar replaces the lines
    assert "[dpo] step 3: non-finite loss" in out.getvalue()


def test_verbose_keeps_everything_on_the_terminal_and_in_the_log(tmp_path, capfd):
    path = tmp_path / "raydpo.log"
    with Console(path, verbose=True, out=io.StringIO(), err=io.StringIO()) as con:
        os.write(2, b"Setting accelerator to CPU\n")
        con.on_worker_lines(_batch(REPORT))
    assert "Setting accelerator to CPU" in capfd.readouterr().err  # not redirected
    assert "Reporting training result 3" in path.read_text()


def test_a_failed_stage_names_the_log_and_shows_its_end(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with Console(tmp_path / "raydpo.log", out=out, err=err) as con:
        con.on_worker_lines(_batch("Traceback (most recent call last):", "RuntimeError: the worker died here"))

        def boom() -> int:
            raise RuntimeError("worker 0: RuntimeError: the worker died here")

        rc = cli.guarded(boom, console=con)
    assert rc == 1
    text = err.getvalue()
    assert "the last " in text and str(tmp_path / "raydpo.log") in text
    assert "RuntimeError: the worker died here" in text.split("error:")[0]  # the log's tail, before the error
    assert text.rstrip().splitlines()[-1].startswith("error: worker 0: RuntimeError: the worker died here")
    assert text.rstrip().endswith(f"(full log: {tmp_path / 'raydpo.log'})")


def test_a_run_folder_that_cannot_be_made_still_gets_a_log_elsewhere(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the storage folder should be")  # mkdir fails, even as root
    with Console(log_path(blocker, "x"), out=io.StringIO(), err=io.StringIO()) as con:
        os.write(2, b"chatter\n")
        con.settle()  # training begins
    assert not con.path.is_relative_to(blocker) and "chatter" in con.path.read_text()
    con.path.unlink()


def test_a_command_refused_before_training_leaves_no_run_folder_and_no_log(tmp_path):
    with Console(log_path(tmp_path / "runs", "x"), out=io.StringIO(), err=io.StringIO()) as con:
        os.write(2, b"INFO mlflow.store.db.utils: Creating initial MLflow database tables...\n")
        early = con.path
    assert not (tmp_path / "runs").exists() and not early.exists()

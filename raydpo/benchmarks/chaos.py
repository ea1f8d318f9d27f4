"""The chaos suite: faults thrown at real `raydpo dpo` runs (local Ray, 2 workers, a real MLflow
store), one table row per fault.

    python -m raydpo.benchmarks.chaos [--only kill_at_3,nan] [--workdir DIR] [--json]

Every run is the CLI a user types, in a subprocess; faults come from the one hook
(``$RAYDPO_FAULTS``, `raydpo.train.faults`) or from outside (signals to the driver, a stopped
MLflow server, a damaged checkpoint, a read-only folder). A row says whether the run finished,
how many steps were lost (fault step minus the step it resumed from), the largest difference of
its final metrics from an uninterrupted run, duplicate MLflow points, the MLflow runs its name
got, and the one error line when it was meant to stop.

"Survived": a recoverable fault ends finished, with at most ``save_every`` steps lost, one MLflow
run and no duplicate point (and, where the fault changes no update, the uninterrupted run's
metrics within 1e-4); a fault that cannot be recovered ends with exit 2, one line naming the
problem, no traceback and nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raydpo import storage
from raydpo.tracking import STAGE_TAG
from raydpo.tracking.trials import TRIAL_TAG

SAVE_EVERY = 3
STEPS = 9
CONFIG = """\
data: {{source: sample, sample_size: 160, eval_fraction: 0.1, max_length: 128, max_prompt_length: 64}}
model: {{name_or_path: tiny, dtype: float32, cache_dir: {cache}}}
lora: {{r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}}
deepspeed: {{stage: 2}}
scaling: {{num_workers: 2, cpus_per_worker: 0.5, data_cpus: 1.0}}
dpo: {{max_steps: {steps}, per_device_batch_size: 4, lr: 5.0e-3, log_every: 1, eval_every: 3, save_every: {save},
      max_nonfinite_steps: 3}}
tracking: {{experiment_name: chaos, tracking_uri: "{uri}"}}
run: {{name: base, storage_path: {runs}, max_failures: 2}}
"""
FINAL_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "train/loss")


@dataclass
class Row:
    fault: str
    finished: bool = False
    exit_code: int | None = None
    steps_lost: int | None = None
    max_metric_diff: float | None = None
    duplicate_points: int | None = None
    mlflow_runs: int | None = None
    seconds: float = 0.0
    error: str = ""
    survived: bool = False
    notes: list[str] = field(default_factory=list)


class Suite:
    def __init__(self, work: Path, faults: str = ""):
        """``faults``: injected into every run of the suite, the baseline included (``$RAYDPO_FAULTS``
        syntax), so a row still compares like with like; a row's own fault is added to them."""
        self.work = work
        self.faults = faults
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        cache = Path(__file__).resolve().parents[2] / ".raydpo_cache"
        self.config = work / "chaos.yaml"
        self.config.write_text(CONFIG.format(cache=cache, steps=STEPS, save=SAVE_EVERY, uri=self.uri, runs=work / "runs"))
        self.baseline: dict[str, float] | None = None

    # -- running the CLI -------------------------------------------------------------------
    def cli(self, name: str, *extra: str, env: dict | None = None, timeout: float = 900, on_line=None,
            command: str = "dpo"):
        cmd = [sys.executable, "-m", "raydpo.cli", command, "--verbose", "--config", str(self.config),
               "--set", f"run.name={name}", *extra]  # --verbose: the rows read Ray's own lines too

        run_env = {**os.environ, **(env or {})}
        run_env["RAYDPO_FAULTS"] = ",".join(f for f in (self.faults, (env or {}).get("RAYDPO_FAULTS", "")) if f)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=self.work, env=run_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out = []
        try:
            for line in p.stdout:
                out.append(line)
                if on_line is not None:
                    on_line(line, p)
            p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever Ray left behind
            except ProcessLookupError:
                pass
        return p.returncode, "".join(out), time.perf_counter() - t0

    # -- reading MLflow --------------------------------------------------------------------
    def runs(self, name: str):
        from mlflow.tracking import MlflowClient

        c = MlflowClient(self.uri)
        exp = c.get_experiment_by_name("chaos")
        if exp is None:
            return c, []
        return c, [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == f"{name}-dpo"]

    def inspect(self, row: Row, name: str, compare: bool = True) -> None:
        c, runs = self.runs(name)
        row.mlflow_runs = len(runs)
        if not runs:
            return
        run = runs[0]
        dup, final = 0, {}
        for key in run.data.metrics:
            hist = c.get_metric_history(run.info.run_id, key)
            steps = [m.step for m in hist]
            dup += len(steps) - len(set(steps))
            if key in FINAL_KEYS:
                final[key] = max(hist, key=lambda m: (m.step, m.timestamp)).value
        row.duplicate_points = dup
        row.finished = row.finished and run.info.status == "FINISHED"
        if len(runs) == 1 and run.info.status == "RUNNING":
            row.notes.append("MLflow run left RUNNING")
        if compare and self.baseline is not None and final:
            row.max_metric_diff = max(abs(final.get(k, float("nan")) - v) for k, v in self.baseline.items())
        return final

    @staticmethod
    def resumed_at(out: str) -> list[int]:
        return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", out)]

    @staticmethod
    def error_line(out: str) -> str:
        errs = [ln.strip() for ln in out.splitlines() if ln.startswith(("error:", "raydpo:"))]
        return errs[-1] if errs else ""

    def recoverable(self, row: Row, rc: int, out: str, name: str, fault_step: int | None, compare: bool = True):
        row.exit_code = rc
        row.finished = rc == 0 and "== raydpo summary ==" in out
        at = self.resumed_at(out)
        if fault_step is not None:
            row.steps_lost = max(0, fault_step - at[-1]) if at else fault_step
        self.inspect(row, name, compare)
        row.survived = (row.finished and row.mlflow_runs == 1 and row.duplicate_points == 0
                        and (row.steps_lost is None or row.steps_lost <= SAVE_EVERY)
                        and (not compare or (row.max_metric_diff is not None and row.max_metric_diff <= 1e-4)))
        if not row.survived:
            row.error = row.error or self.error_line(out) or out.strip().splitlines()[-1][:300]

    def fatal(self, row: Row, rc: int, out: str, seconds_max: float | None = None):
        row.exit_code = rc
        lines = [ln for ln in out.splitlines() if ln.strip()]
        row.error = self.error_line(out)
        row.survived = (rc == 2 and len(lines) >= 1 and "Traceback" not in out and bool(row.error)
                        and (seconds_max is None or row.seconds <= seconds_max))

    # -- the faults ------------------------------------------------------------------------
    def baseline_run(self) -> Row:
        row = Row("none (baseline)")
        rc, out, row.seconds = self.cli("base")
        row.exit_code, row.finished = rc, rc == 0
        self.baseline = self.inspect(row, "base", compare=False)
        row.survived = row.finished and row.duplicate_points == 0 and row.mlflow_runs == 1
        return row

    def kill(self, step: int, rank: int) -> Row:
        row = Row(f"worker SIGKILL at step {step} (rank {rank})")
        name = f"kill{step}"
        rc, out, row.seconds = self.cli(name, env={"RAYDPO_FAULTS": f"kill@{step}:rank={rank}"})
        self.recoverable(row, rc, out, name, step)
        return row

    def sigterm_worker(self) -> Row:
        row = Row("SIGTERM to a worker (preemption), then the same command")
        name = "term"
        rc, out, s1 = self.cli(name, env={"RAYDPO_FAULTS": "sigterm@4:rank=1"})
        ok = rc == 0 and "preempted at step" in out and "to resume" in out
        rc2, out2, s2 = self.cli(name)
        row.seconds = s1 + s2
        self.recoverable(row, rc2, out2, name, 4)
        row.survived = row.survived and ok
        if not ok:
            row.error = f"first run: exit {rc}, {self.error_line(out) or 'no preemption line'}"
        return row

    def sigterm_driver(self) -> Row:
        row = Row("SIGTERM to the driver (preemption), then the same command")
        name = "dterm"
        sent = []

        def on_line(line, p):
            if not sent and "step 4/" in line:
                os.kill(p.pid, signal.SIGTERM)
                sent.append(time.time())

        rc, out, s1 = self.cli(name, on_line=on_line)
        ok = rc == 0 and "preempted at step" in out
        at = re.findall(r"preempted at step (\d+)", out)
        rc2, out2, s2 = self.cli(name)
        row.seconds = s1 + s2
        self.recoverable(row, rc2, out2, name, int(at[0]) if at else None)
        row.survived = row.survived and ok
        if not ok:
            row.error = f"first run: exit {rc}, {self.error_line(out) or 'no preemption line'}"
        return row

    @staticmethod
    def clock(marks: dict[str, str]):
        """An ``on_line`` that records when each of ``marks`` (name -> text) first appears."""
        seen: dict[str, float] = {}

        def on_line(line, p):
            for name, text in marks.items():
                if name not in seen and text in line:
                    seen[name] = time.perf_counter()
        return seen, on_line

    def drain(self) -> Row:
        row = Row("node drain notice from Ray after step 4 (a spot reclaim), then the same command")
        name = "drain"
        # Ray Train's watcher polls the GCS every 5 s by default: 0.5 s here, where a step takes ~1 s
        env = {"RAYDPO_FAULTS": "drain@4:rank=1", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}
        seen, on_line = self.clock({"sent": "step 4/", "noticed": "Ray drains node", "saved": "preempted at step"})
        rc, out, s1 = self.cli(name, env=env, on_line=on_line)
        at = [int(x) for x in re.findall(r"preempted at step (\d+)", out)]
        ok = rc == 0 and bool(at) and "Ray drains node" in out and "to resume" in out
        rc2, out2, s2 = self.cli(name)
        row.seconds = s1 + s2
        self.recoverable(row, rc2, out2, name, at[0] if at else None)
        row.survived = row.survived and ok and row.steps_lost == 0
        if ok and {"sent", "saved"} <= set(seen):
            row.notes.append(f"checkpointed at step {at[0]}, {seen['saved'] - seen['sent']:.1f} s after the notice")
        if not ok:
            row.error = f"first run: exit {rc}, {self.error_line(out) or 'no drain or preemption line'}"
        return row

    def hang(self) -> Row:
        row = Row("a worker hangs (SIGSTOP) after step 4: the collective times out, Ray restarts the workers")
        name = "hang"
        seen, on_line = self.clock({"failed": "a collective waited", "resumed": "resumed from"})
        rc, out, row.seconds = self.cli(name, "--set", "scaling.collective_timeout_s=20",
                                        env={"RAYDPO_FAULTS": "hang@4:rank=1"}, on_line=on_line)
        self.recoverable(row, rc, out, name, 4)
        # rank 1 stops inside step 4 (before the step's last all-reduce): rank 0 waits there
        if not re.search(r"rank 0: a collective waited 20 s at step 4 ", out):
            row.survived = False
            row.error = row.error or "no line naming the rank and the step"
        if {"failed", "resumed"} <= set(seen):
            row.notes.append(f"failed 20 s into the hang (the timeout), resumed {seen['resumed'] - seen['failed']:.0f} s "
                             "later")
        return row

    def job_stop(self) -> Row:
        row = Row("`ray job stop` at step 4 with raydpo submit's stop wait, then the same command")
        name = "jobstop"
        head = RayHead.start(self.work / "head")
        try:
            from raydpo.orchestration.submit import build_runtime_env, client as job_client

            client = job_client(head.dashboard)
            rt = build_runtime_env(str(self.work / "empty"), env={"MLFLOW_TRACKING_URI": self.uri})
            (self.work / "empty").mkdir(exist_ok=True)
            t0 = time.perf_counter()
            job = client.submit_job(entrypoint=f"{sys.executable} -m raydpo.cli dpo --verbose --config {self.config} "
                                               f"--set run.name={name}", runtime_env=rt)
            stopped_at = None
            while client.get_job_status(job).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
                if stopped_at is None and "step 4/" in client.get_job_logs(job):
                    client.stop_job(job)  # SIGTERM to the driver, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
                    stopped_at = time.perf_counter()
                if time.perf_counter() - t0 > 900:
                    break
                time.sleep(0.5)
            logs, status = client.get_job_logs(job), client.get_job_status(job).value
            s1 = time.perf_counter() - t0
            took = time.perf_counter() - stopped_at if stopped_at else None
        finally:
            head.stop()
        at = [int(x) for x in re.findall(r"preempted at step (\d+)", logs)]
        ok = status == "STOPPED" and bool(at)
        rc2, out2, s2 = self.cli(name)
        row.seconds = s1 + s2
        self.recoverable(row, rc2, out2, name, at[0] if at else None)
        row.survived = row.survived and ok and row.steps_lost == 0
        wait = rt["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]
        if ok:
            row.notes.append(f"checkpointed at step {at[0]} and exited {took:.0f} s after the stop (stop wait {wait} s)")
        else:
            row.error = f"stopped job: {status}, {self.error_line(logs) or 'no preemption line'}"
        return row

    def workers_changed(self) -> Row:
        row = Row("2 workers -> 1 -> 2 across two resumes (SIGTERM after steps 3 and 6)")
        name = "reshape"
        rc1, out1, s1 = self.cli(name, env={"RAYDPO_FAULTS": "sigterm@3:rank=1"})
        rc2, out2, s2 = self.cli(name, "--set", "scaling.num_workers=1", env={"RAYDPO_FAULTS": "sigterm@6:rank=0"})
        rc3, out3, s3 = self.cli(name)
        row.seconds = s1 + s2 + s3
        first = [int(x) for x in re.findall(r"preempted at step (\d+)", out1)]
        second = [int(x) for x in re.findall(r"preempted at step (\d+)", out2)]
        # a SIGTERM after step k is agreed on at the next step: the stop checkpoints step k+1
        ok = (rc1 == 0 and rc2 == 0 and len(first) == len(second) == 1 and first[0] >= 3 and second[0] >= 6
              and self.resumed_at(out2)[-1:] == first and self.resumed_at(out3)[-1:] == second
              and "resuming on 1 worker a checkpoint of 2 workers" in out2)
        # the same maths; LoRA dropout's masks are drawn per rank, so they differ on another worker count
        self.recoverable(row, rc3, out3, name, second[0] if second else None, compare=False)
        self.inspect(row, name)  # the metric gap, reported (not a pass condition here)
        row.survived = row.survived and ok and row.steps_lost == 0
        if row.max_metric_diff is not None:
            row.notes.append(f"final metrics within {row.max_metric_diff:.1e} of the uninterrupted 2-worker run")
        if not ok:
            row.error = (f"runs: exit {rc1}/{rc2}, preempted at {first}/{second}: "
                         f"{self.error_line(out2) or self.error_line(out1) or 'no preemption line'}")
        return row

    def corrupt_latest(self) -> Row:
        row = Row("latest checkpoint corrupted, then the same command")
        name = "corrupt"
        rc, out, s1 = self.cli(name, env={"RAYDPO_FAULTS": "sigterm@5:rank=0"})
        folder = self.work / "runs" / f"{name}-dpo"
        ckpts = [Path(c) for c in storage.checkpoints(folder)]
        if ckpts:
            blob = next(ckpts[-1].rglob("*optim_states.pt"))
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
        rc2, out2, s2 = self.cli(name)
        row.seconds = s1 + s2
        self.recoverable(row, rc2, out2, name, 5)
        if "unusable" not in out2:
            row.survived = False
            row.error = "the damaged checkpoint was not noticed"
        return row

    def nonfinite_steps(self, name: str) -> float | None:
        """The run's ``train/nonfinite_steps`` (the steps it skipped), None without a run."""
        c, runs = self.runs(name)
        if not runs:
            return None
        return max((m.value for m in c.get_metric_history(runs[0].info.run_id, "train/nonfinite_steps")), default=0)

    def nan(self) -> Row:
        row = Row("NaN loss injected at step 4")
        name = "nan"
        rc, out, row.seconds = self.cli(name, env={"RAYDPO_FAULTS": "nan@4"})
        self.recoverable(row, rc, out, name, None, compare=False)  # a skipped update changes the end point
        n = self.nonfinite_steps(name)
        if n is not None:
            row.notes.append(f"train/nonfinite_steps={n:g}")
            row.survived = row.survived and n == 1 + self.faults.count("nan@")
        return row

    def oom(self) -> Row:
        row = Row("out of memory on a worker at step 2 (not retried)")
        rc, out, row.seconds = self.cli("oom", env={"RAYDPO_FAULTS": "oom@2"})
        row.exit_code = rc
        row.error = self.error_line(out)
        row.finished = False
        retried = "Error count: 1" in out and "resumed from" in out
        row.survived = rc == 1 and "per_device_batch_size" in row.error and "gradient_checkpointing" in row.error \
            and not retried
        return row

    def mlflow_down_at_start(self) -> Row:
        row = Row("MLflow store down at start")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rc, out, row.seconds = self.cli("down", "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}")
        self.fatal(row, rc, out, seconds_max=10)
        ray_markers = ("Started a local Ray instance", "Connecting to existing Ray cluster", "Connected to Ray cluster")
        if any(m in out for m in ray_markers) or (self.work / "runs" / "down-dpo").exists():
            row.survived = False
            row.notes.append("Ray started or joined, or storage written")
        return row

    def mlflow_down_mid_run(self) -> Row:
        row = Row("MLflow server down mid-run for ~20 s")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        db = self.work / "server.db"
        art = self.work / "server-artifacts"

        def server():
            return subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                     "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(art),
                                     "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)

        srv = [server()]
        uri = f"http://127.0.0.1:{port}"
        for _ in range(60):
            if _http_ok(uri):
                break
            time.sleep(1)
        events = []

        def on_line(line, p):
            if not events and "step 2/" in line:
                os.killpg(srv[0].pid, signal.SIGKILL)
                events.append(("down", time.time()))
            elif len(events) == 1 and "step 5/" in line:
                srv[0] = server()
                events.append(("up", time.time()))

        try:
            rc, out, row.seconds = self.cli("midrun", "--set", f"tracking.tracking_uri={uri}", on_line=on_line)
            for _ in range(60):
                if _http_ok(uri):
                    break
                time.sleep(1)
            spill = Path(storage.spill_file(storage.stage_dir(self.work / "runs", "midrun", "dpo"), "dpo"))
            if spill.exists():
                # the store was not back before the workers closed (a restart can take longer than the
                # rest of the run on a loaded machine): the points wait on disk; replay them as the
                # warning line tells the user to
                n = sum(1 for _ in spill.open())
                r = subprocess.run([sys.executable, "-m", "raydpo.cli", "tracking", "replay", str(spill)],
                                   cwd=self.work, capture_output=True, text=True, timeout=300)
                row.notes.append(f"store back after the run: {n} points spilled, replay exit {r.returncode}")
                if r.returncode != 0:
                    row.error = (r.stdout + r.stderr).strip().splitlines()[-1][:300]
            elif Path(storage.replayed_file(spill)).exists():
                row.notes.append("store back after the workers closed: the driver sent their spilled points")
            elif events:
                row.notes.append("flushed live when the store returned")
            saved, self.uri = self.uri, uri
            try:
                self.recoverable(row, rc, out, "midrun", None, compare=False)
                c, runs = self.runs("midrun")
                if runs:
                    steps = {m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")}
                    row.notes.append(f"train/loss steps in MLflow: {len(steps)}/{STEPS}")
                    row.survived = row.survived and steps == set(range(1, STEPS + 1))
                row.notes.append("buffering warned" if "buffering" in out else "no buffering warning")
            finally:
                self.uri = saved
        finally:
            try:
                os.killpg(srv[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return row

    def read_only_storage(self) -> Row:
        row = Row("run storage folder read-only")
        ro = self.work / "readonly"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o500)
        prefix = []
        if os.geteuid() == 0 and shutil.which("setpriv"):  # root ignores permissions: drop capabilities
            prefix = [shutil.which("setpriv"), "--bounding-set=-all", "--inh-caps=-all", "--"]
        cmd = [*prefix, sys.executable, "-m", "raydpo.cli", "dpo", "--config", str(self.config), "--set", "run.name=ro",
               "--set", f"run.storage_path={ro / 'runs'}"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=self.work, capture_output=True, text=True, timeout=300)
        row.seconds = time.perf_counter() - t0
        self.fatal(row, r.returncode, r.stdout + r.stderr)
        if os.geteuid() == 0 and not prefix:
            row.notes.append("root without setpriv: permissions not enforced")
        return row

    def too_few_pairs(self) -> Row:
        row = Row("too few training pairs for one batch per worker")
        # 6 rows, some maybe in eval: fewer than 2 workers x 4 pairs (8 rows filled exactly one batch)
        rc, out, row.seconds = self.cli("few", "--set", "data.sample_size=6")
        self.fatal(row, rc, out)
        row.survived = row.survived and "fewer than one batch per worker" in row.error
        return row

    def config_changed(self) -> Row:
        row = Row("rerun with a changed config (then --restart)")
        rc, out, row.seconds = self.cli("base", "--set", "dpo.beta=0.3")
        self.fatal(row, rc, out)
        row.survived = row.survived and "dpo.beta" in row.error and "--restart" in row.error
        return row


    def tune_driver_killed(self) -> Row:
        row = Row("driver SIGKILLed mid-Tune, then tune --resume")
        args = ["--set", "tune.num_samples=3", "--set", "tune.scheduler=fifo", "--set", "scaling.num_workers=1",
                "--set", "dpo.max_steps=6", "--set", "dpo.eval_every=3", "--set", "dpo.save_every=3"]
        first_done: list[float] = []

        def on_line(line, p):
            if "step 6/6" in line and not first_done:
                first_done.append(time.time())
            if first_done and time.time() - first_done[0] > 20:  # Tune saves its state every ~10 s
                os.killpg(p.pid, signal.SIGKILL)

        rc, out, s1 = self.cli("tune", *args, command="tune", on_line=on_line, timeout=1200)
        killed_at = time.time()
        trials = self.work / "runs"

        def finished_trial(d: Path) -> bool:
            return any((storage.read_json(storage.state_file(c)) or {}).get("step", 0) >= 6
                       for c in storage.checkpoints(d))

        done_before = [d.name for d in trials.glob("tune-trial-*-dpo") if finished_trial(d)]
        rc2, out2, s2 = self.cli("tune", "--resume", *args, command="tune", timeout=1200)
        row.seconds, row.exit_code = s1 + s2, rc2
        row.finished = rc2 == 0 and "== raydpo tune ==" in out2
        from mlflow.tracking import MlflowClient

        c = MlflowClient(self.uri)
        exp = c.get_experiment_by_name("chaos")
        runs = c.search_runs([exp.experiment_id]) if exp else []
        parents = [r for r in runs if r.data.tags.get(STAGE_TAG) == "tune" and r.info.run_name == "tune-tune"]
        kids = [r for r in runs if parents and r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        per_trial = {}
        for k in kids:
            per_trial.setdefault(k.data.tags.get(TRIAL_TAG), []).append(k)
        rerun = [n for n in done_before if any(Path(c).is_dir() and Path(c).stat().st_mtime > killed_at for c in storage.checkpoints(trials / n))]
        row.mlflow_runs = len(kids)
        row.notes.append(f"killed with {len(done_before)} trial(s) finished; "
                         f"{len(per_trial)} trials, child runs per trial {sorted(len(v) for v in per_trial.values())}")
        running = [k for k in kids if k.info.status == "RUNNING"]
        row.survived = (row.finished and rc != 0 and len(parents) == 1 and len(per_trial) == 3
                        and all(len(v) == 1 for v in per_trial.values()) and not running and not rerun)
        if not row.survived:
            row.error = (self.error_line(out2) or f"first exit {rc}; rerun finished trials {rerun}; "
                         f"{len(running)} child runs RUNNING")
        return row


@dataclass
class RayHead:
    """`ray start --head` with the job API (token auth, as `raydpo submit` expects), its own temp dir."""
    dashboard: str
    pid: int
    temp: str

    @classmethod
    def start(cls, where: Path) -> RayHead:
        import uuid

        where.mkdir(parents=True, exist_ok=True)
        temp = tempfile.mkdtemp(prefix="rdpchaos-", dir="/tmp")  # Ray's sockets: a short path
        port, dash = _free_port(), _free_port()
        token = uuid.uuid4().hex
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        env.pop("RAY_ADDRESS", None)
        bin_dir = Path(sys.executable).parent
        p = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(port),
                              "--temp-dir", temp, "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                              "--dashboard-port", str(dash), "--disable-usage-stats"], cwd=where, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out, _ = p.communicate(timeout=300)
        head = cls(f"http://127.0.0.1:{dash}", p.pid, temp)
        if p.returncode != 0:
            head.stop()
            raise RuntimeError(f"ray start --head failed:\n{out[-3000:]}")
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # the job client authenticates with it
        return head

    def stop(self) -> None:
        """End this head's processes only: those whose command line names its temp dir."""
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if pid.isdigit() and self.temp in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


FAULTS = {
    "kill_at_2": lambda s: s.kill(2, 1),
    "kill_at_5": lambda s: s.kill(5, 0),
    "kill_at_7": lambda s: s.kill(7, 1),
    "sigterm_worker": Suite.sigterm_worker,
    "sigterm_driver": Suite.sigterm_driver,
    "mlflow_down_at_start": Suite.mlflow_down_at_start,
    "mlflow_down_mid_run": Suite.mlflow_down_mid_run,
    "corrupt_latest": Suite.corrupt_latest,
    "nan": Suite.nan,
    "oom": Suite.oom,
    "read_only_storage": Suite.read_only_storage,
    "config_changed": Suite.config_changed,
    "too_few_pairs": Suite.too_few_pairs,
    "tune_driver_killed": Suite.tune_driver_killed,
    "drain": Suite.drain,
    "hang": Suite.hang,
    "job_stop": Suite.job_stop,
    "workers_changed": Suite.workers_changed,
}


def format_table(rows: list[Row]) -> str:
    head = ["fault", "survived", "finished", "exit", "steps lost", "max |metric diff|", "dup points", "MLflow runs",
            "s", "error / notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = "" if r.max_metric_diff is None else f"{r.max_metric_diff:.1e}"
        cells = [r.fault, "yes" if r.survived else "NO", "yes" if r.finished else "no", str(r.exit_code),
                 "" if r.steps_lost is None else str(r.steps_lost), diff,
                 "" if r.duplicate_points is None else str(r.duplicate_points),
                 "" if r.mlflow_runs is None else str(r.mlflow_runs), f"{r.seconds:.0f}",
                 "; ".join(filter(None, [r.error.replace("|", "/")[:160], *r.notes]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(FAULTS)}")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raydpo-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = set(names) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults: {sorted(unknown)}")
    suite = Suite(work)
    rows = [suite.baseline_run()]
    print(format_table(rows), flush=True)
    for n in names:
        rows.append(FAULTS[n](suite))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + format_table(rows))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    return 0 if all(r.survived for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared integration fixtures.

``ray_cluster``: one real Ray cluster for the whole integration tier, a ``ray start --head`` on
this machine (token auth, job API and Prometheus endpoint on 127.0.0.1) started once. Every
integration test runs with ``RAY_ADDRESS`` pointing at it, so the CLI commands the tests run in
subprocesses join it the way a user's command joins their cluster, and ``ray_connected`` joins
the pytest process itself for the tests that call raydpo in-process. One start-up instead of one
per module, and Ray's task workers stay warm between tests.

``demo_run`` runs the README's main command once (``raydpo demo --quick``) per test session in a
temporary working directory with its own SQLite MLflow store; the training, console, report,
MLflow-UI, Tune and ZeRO-3 tests all read that one run instead of training again (the last two start
from its SFT adapter).

Both begin in the background as soon as the run is collected (``pytest_collection_finish``),
with the 7B-layer row (``seven_b_row``, no Ray): the unit tier, which runs first, keeps about one
core of two busy, and they use the rest meanwhile. Nothing reaches the tests' environment until
the first integration test asks for the cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Ray's components push metrics to the node's agent every metrics_report_interval_ms (10 s by
# default) and the agent drops a gauge not heard of for two intervals: 1 s keeps
# test_metrics_export's "still exported between two logged steps" check short.
METRICS_REPORT_MS = "1000"
# Ray Train's controller polls its workers every 2 s by default, so each fit returns up to 2 s
# after its last step and a restart waits as long to notice a dead worker; the suite's fits are
# seconds long: 0.5 s (propagated by Ray Train from the driver to its controller and workers).
HEALTH_CHECK_S = "0.5"
# Ray Train also starts a node-drain watcher actor for every fit, which only logs drains (raydpo's
# preemption path is SIGTERM and its stop file): off, one process start less per fit on 2 cores.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_S, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# torch.distributed's env:// rendezvous
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "CROSS_RANK", "CROSS_SIZE")
DEMO_TIMEOUT_S = 880
SEVEN_B_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def port_picker():
    """`free_port`, for test modules (they cannot import a conftest)."""
    return free_port


@dataclass
class Cluster:
    address: str          # the GCS address clients join (RAY_ADDRESS)
    dashboard: str        # the job-submission address
    metrics_port: int     # the node's Prometheus endpoint
    client_env: dict      # what a process needs in its environment to join
    head_env: dict        # the head's environment (the job drivers' and workers' too)


def _stop(group: int) -> None:
    """Stop this cluster and nothing else (`ray stop` would stop every Ray on the machine, a
    user's own included): its daemons are one process group (`ray start` ran in a session of its
    own); the workers exit when their raylet goes."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _start_cluster() -> tuple[Cluster, int, str]:
    """`ray start --head` on this machine: the cluster, its daemons' process group, its temp dir.
    Nothing in this process's environment changes (`ray_cluster` joins it for the tests)."""
    # its own short temp dir: Ray's unix sockets live there (a path limit of ~107 bytes) and no
    # other Ray on the machine is touched
    temp = tempfile.mkdtemp(prefix="rdpray-", dir="/tmp")
    port, dash, metrics = free_port(), free_port(), free_port()
    # the session's token (tests/conftest.py sets it before any test touches Ray)
    token = os.environ.get("RAY_AUTH_TOKEN") or uuid.uuid4().hex
    client_env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                  **TRAIN_ENV}
    head_env = {**os.environ, "RAY_AUTH_MODE": "token",  # PATH: the venv's bin first (tests/conftest.py)
                "RAY_AUTH_TOKEN": token, "RAY_metrics_report_interval_ms": METRICS_REPORT_MS, **TRAIN_ENV}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", *DIST_ENV):
        head_env.pop(k, None)
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(port), "--temp-dir", temp,
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--metrics-export-port", str(metrics), "--disable-usage-stats"],
        cwd=temp, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = start.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _stop(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if start.returncode != 0:
        _stop(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"ray start --head failed ({start.returncode}):\n{out[-5000:]}")
    return Cluster(client_env["RAY_ADDRESS"], f"http://127.0.0.1:{dash}", metrics, client_env, head_env), start.pid, temp


@dataclass
class _Job:
    """A command running in the background in its own folder; its output goes to files there
    (no pipe to fill), its processes are one group."""
    workdir: Path
    proc: subprocess.Popen
    deadline: float

    @classmethod
    def launch(cls, cmd: list[str], workdir: Path, env: dict, timeout_s: float) -> "_Job":
        env = {k: v for k, v in env.items() if k not in DIST_ENV}
        with open(workdir / "job.stdout", "w") as out, open(workdir / "job.stderr", "w") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
        return cls(workdir, proc, time.monotonic() + timeout_s)

    def wait(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr); killed at its deadline."""
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(self.proc.pid)
            rc = self.proc.wait()
        return rc, (self.workdir / "job.stdout").read_text(), (self.workdir / "job.stderr").read_text()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            _stop(self.proc.pid)


def _launch_demo(cluster: Cluster) -> _Job:
    """The README's main command, `raydpo demo --quick`, on the cluster, in a working dir of its own."""
    work = Path(tempfile.mkdtemp(prefix="raydpo-demo-"))
    env = {**os.environ, **cluster.client_env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    return _Job.launch([sys.executable, "-m", "raydpo.cli", "demo", "--quick", "--set",
                        f"run.storage_path={work / 'runs'}", "--set", f"model.cache_dir={REPO / '.raydpo_cache'}"],
                       work, env, DEMO_TIMEOUT_S)


def _launch_seven_b() -> _Job:
    """test_7b_shape.py's row (`measure_row`, run as a script), with one torch thread: it fills the
    cores the unit tier and the demo leave idle instead of running on its own later."""
    work = Path(tempfile.mkdtemp(prefix="raydpo-7b-job-"))
    return _Job.launch([sys.executable, str(Path(__file__).parent / "test_7b_shape.py")], work,
                       {**os.environ, "RAYDPO_BENCH_THREADS": "1"}, SEVEN_B_TIMEOUT_S)


class _Shared:
    """What the integration tier shares, begun in a background thread as soon as the run is
    collected (`pytest_collection_finish`): the cluster, then the demo run, and the 7B-layer row
    (no Ray). The unit tier runs first and keeps about one core of two busy (about 50 % CPU on 2
    cores, measured); these use the rest meanwhile instead of starting after it. Test tooling
    state, one per pytest process."""

    thread: threading.Thread | None = None
    cluster: tuple[Cluster, int, str] | None = None
    demo: _Job | None = None
    seven_b: _Job | None = None
    error: BaseException | None = None
    saved_env: dict[str, str | None] | None = None  # what `join` replaced in os.environ
    stopped = False

    @classmethod
    def begin(cls, want_demo: bool, want_seven_b: bool) -> None:
        def run():
            try:
                if want_seven_b:
                    cls.seven_b = _launch_seven_b()
                cls.cluster = _start_cluster()
                if want_demo:
                    cls.demo = _launch_demo(cls.cluster[0])
            except BaseException as e:  # reported by the first test that needs the cluster
                cls.error = e

        cls.thread = threading.Thread(target=run, name="raydpo-integration-start", daemon=True)
        cls.thread.start()

    @classmethod
    def busy(cls) -> bool:
        """Still starting the cluster or running a background job."""
        if cls.thread is not None and cls.thread.is_alive():
            return True
        return any(j is not None and j.running() for j in (cls.demo, cls.seven_b))

    @classmethod
    def wait(cls) -> None:
        if cls.thread is None:
            cls.begin(want_demo=False, want_seven_b=False)  # not begun at collection
        cls.thread.join(timeout=330)
        if cls.error is not None:
            pytest.fail(f"the integration tier's Ray cluster did not start: {cls.error}")
        if cls.cluster is None:
            pytest.fail("the integration tier's Ray cluster did not start within 330 s")

    @classmethod
    def join(cls) -> Cluster:
        """The cluster, put in this process's environment (once, undone by `stop`)."""
        if cls.saved_env is None:
            cls.wait()
            env = cls.cluster[0].client_env
            cls.saved_env = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
        return cls.cluster[0]

    @classmethod
    def stop(cls) -> None:
        if cls.stopped:
            return
        cls.stopped = True
        for k, v in (cls.saved_env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cls.thread is not None:
            cls.thread.join(timeout=330)
        for job in (cls.demo, cls.seven_b):
            if job is not None:
                job.stop()
        if cls.cluster is not None:
            _stop(cls.cluster[1])
            shutil.rmtree(cls.cluster[2], ignore_errors=True)
        for job in (cls.demo, cls.seven_b):
            if job is not None:
                shutil.rmtree(job.workdir, ignore_errors=True)


def pytest_collection_finish(session):
    """Begin the cluster, and the background jobs the collected tests read, now, so they run
    beside the unit tier."""
    if session.config.option.collectonly or session.config.option.setupplan:
        return
    integration = [it for it in session.items if it.get_closest_marker("integration") is not None]
    if integration:
        def wants(fixture: str) -> bool:
            return any(fixture in getattr(it, "fixturenames", ()) for it in integration)

        _Shared.begin(want_demo=wants("demo_run"), want_seven_b=wants("seven_b_row"))
        session.config.raydpo_background_busy = _Shared.busy  # tests/conftest.py: torch threads beside it


@pytest.hookimpl(trylast=True)  # after tests/conftest.py's sort (the unit tier first)
def pytest_collection_modifyitems(config, items):
    """The tests that read a background job's result run after the other integration tests, so
    the job has the whole tier to finish beside them rather than a test waiting on it."""
    items.sort(key=lambda it: it.get_closest_marker("integration") is not None
               and "seven_b_row" in getattr(it, "fixturenames", ()))


def pytest_sessionfinish(session):
    _Shared.stop()  # whatever was begun, whether or not a test got to use it


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every integration test runs with the session's cluster in its environment, before any of
    its fixtures, whatever their scope (a module fixture that starts a CLI run joins it too); a
    test here without the marker is a unit test and starts no cluster."""
    if item.get_closest_marker("integration") is not None:
        _Shared.join()


@pytest.fixture(scope="session")
def ray_cluster() -> Cluster:
    return _Shared.join()


@pytest.fixture(autouse=True)
def _no_inherited_rendezvous(monkeypatch):
    """The unit tier runs first, in this process: whatever torch.distributed rendezvous an
    in-process engine there left in the environment (DeepSpeed sets some too) stays out of the
    torchrun, accelerate and Ray processes these tests start."""
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """The pytest process joined to the cluster, as raydpo's own commands join one."""
    import ray

    from raydpo.orchestration.ray_connect import ensure_ray

    ensure_ray()
    yield ray_cluster
    ray.shutdown()


@dataclass
class DemoRun:
    workdir: Path
    tracking_uri: str
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> None:
        assert self.returncode == 0, self.stdout[-3000:] + self.stderr[-5000:]


@pytest.fixture(scope="session")
def demo_run(ray_cluster) -> DemoRun:
    if _Shared.demo is None:  # not begun at collection: now
        _Shared.demo = _launch_demo(ray_cluster)
    demo = _Shared.demo
    rc, out, err = demo.wait()
    return DemoRun(demo.workdir, f"sqlite:///{demo.workdir / 'mlflow.db'}", rc, out, err)


@pytest.fixture(scope="session")
def seven_b_row(ray_cluster) -> dict:
    """test_7b_shape.py's measured row, from the background job begun at collection (no Ray:
    ``ray_cluster`` only waits for the background start that launched it)."""
    if _Shared.seven_b is None:  # not begun at collection: now
        _Shared.seven_b = _launch_seven_b()
    rc, out, err = _Shared.seven_b.wait()
    assert rc == 0, out[-3000:] + err[-5000:]
    return json.loads(out.strip().splitlines()[-1])

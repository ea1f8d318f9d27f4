"""raydpo.tracking under tracking-store outages, against real MLflow (no mocks of mlflow; no Ray).

Two real outages: an in-process MLflow tracking server (MLflow's own Flask app on werkzeug, over a
sqlite store) that is shut down and restarted on the same port (connection refused meanwhile),
and a sqlite store whose database file is swapped for a folder (every new connection fails; the
store uses NullPool so no pooled connection keeps the old file open).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydpo import tracking
from raydpo.metric_names import LR

KEYS = ("train/loss", "train/rewards/margins", LR)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # BufferedLogger sets these process-wide for http stores; set-then-delete makes monkeypatch
    # restore whatever was there before (delenv alone records nothing for an unset variable).
    for name in (tracking.HTTP_MAX_RETRIES_ENV, tracking.HTTP_TIMEOUT_ENV):
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("outage-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, _migrated_db, monkeypatch):
    # NullPool: every store call opens the file anew, so swapping it out really breaks the store
    # (read at engine creation; this db path is new, so its engine is created in this test).
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    d = tmp_path / "store"
    d.mkdir()
    shutil.copy(_migrated_db, d / "mlflow.db")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    exp_id = tracking.setup_experiment(uri, "raydpo-outage")
    return SimpleNamespace(uri=uri, exp_id=exp_id, db=d / "mlflow.db", dir=d)


class _Server:
    """MLflow's tracking server app in this process; `down()` closes the port, `up()` reopens it."""

    def __init__(self, app, port: int):
        from werkzeug.serving import WSGIRequestHandler

        class Quiet(WSGIRequestHandler):
            protocol_version = "HTTP/1.0"  # no keep-alive: a closed server cannot serve old sockets

            def log_request(self, *args, **kwargs):
                pass

        self.app, self.port, self.handler, self.srv = app, port, Quiet, None
        self.uri = f"http://127.0.0.1:{port}"

    def up(self):
        from werkzeug.serving import make_server

        self.srv = make_server("127.0.0.1", self.port, self.app, threaded=True, request_handler=self.handler)
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def down(self):
        self.srv.shutdown()
        self.srv.server_close()
        self.srv = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, _migrated_db):
    d = tmp_path_factory.mktemp("server")
    shutil.copy(_migrated_db, d / "mlflow.db")
    env = {"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{d / 'mlflow.db'}",
           "_MLFLOW_SERVER_ARTIFACT_ROOT": str(d / "artifacts"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from mlflow.server import app

        srv = _Server(app, _free_port())
        srv.up()
        exp_id = tracking.setup_experiment(srv.uri, "raydpo-outage")  # the server builds its store now
    finally:
        for k, v in saved.items():  # the server keeps its store; nothing else should see these
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    srv.exp_id = exp_id
    yield srv
    if srv.srv is not None:
        srv.down()


def _metrics(step: int) -> dict[str, float]:
    return {k: step + i / 10 for i, k in enumerate(KEYS)}


def _history(uri: str, run_id: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    return {k: sorted(c.get_metric_history(run_id, k), key=lambda m: m.step) for k in KEYS}


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _log_timed(logger, steps) -> dict[int, tuple[int, int]]:
    """Log `steps`, asserting each call returns at once; the ms window around each call."""
    windows = {}
    for s in steps:
        t0 = int(time.time() * 1000)
        c0 = time.monotonic()
        logger.log_metrics(_metrics(s), step=s)
        assert time.monotonic() - c0 < 0.5
        windows[s] = (t0, int(time.time() * 1000))
    return windows


# -- check_store ----------------------------------------------------------------------------

def test_check_store_closed_port_is_quick_and_names_the_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    reason = tracking.check_store(uri)
    assert time.monotonic() - t0 < 6
    assert reason is not None and uri in reason and "connection refused" in reason
    assert "\n" not in reason


def test_check_store_is_bounded_by_its_timeout_when_nothing_answers():
    with socket.socket() as s:  # accepts connections (kernel backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        reason = tracking.check_store(uri, timeout_s=1.0)
        assert time.monotonic() - t0 < 2.0
    assert reason is not None and uri in reason and "timed out" in reason


def test_check_store_accepts_a_live_server(server):
    assert tracking.check_store(server.uri) is None
    assert tracking.check_store(server.uri + "/") is None


def test_check_store_sqlite_and_file_stores(tmp_path, store):
    assert tracking.check_store(store.uri) is None  # existing database
    assert tracking.check_store(f"sqlite:///{tmp_path / 'new' / 'sub' / 'mlflow.db'}") is None  # creatable
    assert tracking.check_store(f"file://{tmp_path / 'mlruns'}") is None
    assert tracking.check_store(str(tmp_path / "mlruns")) is None
    assert tracking.check_store("databricks") is None  # not checkable cheaply
    (tmp_path / "junk.db").write_text("not a database" * 100)
    reason = tracking.check_store(f"sqlite:///{tmp_path / 'junk.db'}")
    assert reason is not None and "junk.db" in reason


def _check_as_unprivileged(uris: list[str]) -> list[str | None]:
    """check_store as this user, or -- as root, which ignores file permissions -- in a child
    without capabilities (setpriv), where permissions hold again; skip when neither works."""
    if os.geteuid() != 0:
        return [tracking.check_store(u) for u in uris]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root (ignores file permissions) and no setpriv to drop capabilities")
    code = ("import json, sys; from raydpo import tracking; "
            "print(json.dumps([tracking.check_store(u) for u in sys.argv[1:]]))")
    out = subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all", "--", sys.executable, "-c", code, *uris],
                         capture_output=True, text=True, timeout=60, cwd=Path(tracking.__file__).parents[1])
    if out.returncode != 0:
        pytest.skip(f"running as root and setpriv failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def test_check_store_sqlite_in_a_read_only_folder(tmp_path, store):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(store.db, ro / "mlflow.db")
    shutil.copy(store.db, tmp_path / "readonly.db")
    (tmp_path / "readonly.db").chmod(0o400)
    ro.chmod(0o500)
    try:
        uris = [f"sqlite:///{ro / 'mlflow.db'}", f"sqlite:///{ro / 'other.db'}", f"file://{ro}",
                f"sqlite:///{tmp_path / 'readonly.db'}", store.uri]
        reasons = _check_as_unprivileged(uris)
    finally:
        ro.chmod(0o700)
    for uri, reason in zip(uris[:3], reasons):
        assert reason is not None and uri in reason and "not writable" in reason
    assert reasons[3] is not None and "readonly.db is not readable and writable" in reasons[3]
    assert reasons[4] is None


# -- BufferedLogger ---------------------------------------------------------------------------

def test_buffered_logger_rides_out_a_server_outage(server, capsys):
    run_id = tracking.start_run(server.uri, server.exp_id, "outage")
    logger = tracking.BufferedLogger(server.uri, run_id, retry_s=0.2, max_retry_s=0.5)
    assert os.environ[tracking.HTTP_MAX_RETRIES_ENV] == "0"
    assert os.environ[tracking.HTTP_TIMEOUT_ENV] == "5"
    try:
        windows = _log_timed(logger, range(1, 4))
        assert logger.flush(10)

        server.down()
        t_down = time.monotonic()
        windows |= _log_timed(logger, range(4, 11))
        # fail-fast requests: the outage is noticed in well under a second (mlflow's default
        # 7 retries with backoff would take minutes)
        errs: list[str] = []
        assert _wait(lambda: errs.append(capsys.readouterr().err) or "unreachable; buffering" in "".join(errs), 5)
        assert time.monotonic() - t_down < 5
        windows |= _log_timed(logger, range(11, 13))  # still quick while the sender retries
        time.sleep(1.0)  # a few failed retries
        assert logger.pending == 9 * len(KEYS)
        t_restore_ms = int(time.time() * 1000)
        server.up()
        assert logger.flush(15)
    finally:
        if server.srv is None:
            server.up()
    assert logger.close() == 0
    err = "".join(errs) + capsys.readouterr().err
    hist = _history(server.uri, run_id)
    for k in KEYS:
        assert [m.step for m in hist[k]] == list(range(1, 13))  # all there, once each
        for m in hist[k]:
            lo, hi = windows[m.step]
            assert lo <= m.timestamp <= hi  # stamped when logged, not when sent
            if m.step >= 4:
                assert m.timestamp < t_restore_ms
    assert logger.sent == 12 * len(KEYS)
    assert err.count("unreachable; buffering") == 1  # one line per outage, not per retry
    assert err.count("reachable again; flushed") == 1


def test_buffered_logger_to_a_dead_http_store_never_blocks_and_close_is_bounded(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    logger = tracking.BufferedLogger(uri, "0" * 32, retry_s=0.2, max_retry_s=0.5)
    _log_timed(logger, range(1, 6))
    logger.set_tags({"raydpo.note": "x"})
    t0 = time.monotonic()
    spill = tmp_path / "spill.jsonl"
    assert logger.close(timeout_s=2, spill_path=str(spill)) == 5 * len(KEYS) + 1
    assert time.monotonic() - t0 < 3.5
    lines = [json.loads(x) for x in spill.read_text().splitlines()]
    assert len(lines) == 5 * len(KEYS) + 1 and lines[-1]["tag"] == "raydpo.note"
    err = capsys.readouterr().err
    assert err.count("unreachable; buffering") == 1
    assert f"raydpo tracking replay {spill}" in err
    assert logger.close() == 0  # idempotent


def test_skip_through_step_drops_steps_already_in_the_run(store):
    run_id = tracking.start_run(store.uri, store.exp_id, "resumed")
    assert tracking.max_logged_step(store.uri, run_id) == 0
    first = tracking.RunLogger(store.uri, run_id)
    for s in range(1, 6):
        first.log_metrics(_metrics(s), step=s)
    first.log_metrics({"eval/loss": 1.0}, step=4)
    assert tracking.max_logged_step(store.uri, run_id) == 5

    logger = tracking.BufferedLogger(store.uri, run_id, skip_through_step=tracking.max_logged_step(store.uri, run_id))
    for s in range(3, 9):  # the resumed job repeats steps 3..5 from its checkpoint
        logger.log_metrics(_metrics(s), step=s)
    assert logger.close(timeout_s=10) == 0
    assert logger.skipped == 3 * len(KEYS)
    for k, ms in _history(store.uri, run_id).items():
        assert [m.step for m in ms] == list(range(1, 9)), k
    assert tracking.max_logged_step(store.uri, run_id) == 8


def test_close_spills_while_down_and_replay_is_idempotent(store, tmp_path, capsys):
    run_id = tracking.start_run(store.uri, store.exp_id, "spill")
    logger = tracking.BufferedLogger(store.uri, run_id, retry_s=0.2, max_retry_s=0.5)
    windows = _log_timed(logger, range(1, 3))
    assert logger.flush(10)

    aside = tmp_path / "aside.db"
    store.db.rename(aside)
    store.db.mkdir()  # sqlite cannot open a folder: every call fails
    try:
        windows |= _log_timed(logger, range(3, 7))
        spill = tmp_path / "spill" / "run.jsonl"
        t0 = time.monotonic()
        n = logger.close(timeout_s=1.5, spill_path=str(spill))
        assert time.monotonic() - t0 < 3
    finally:
        store.db.rmdir()
        aside.rename(store.db)
    assert n == 4 * len(KEYS)
    err = capsys.readouterr().err
    assert err.count("unreachable; buffering") == 1
    assert f"raydpo tracking replay {spill}" in err
    records = [json.loads(x) for x in spill.read_text().splitlines()]
    assert len(records) == n
    assert {(r["key"], r["step"]) for r in records} == {(k, s) for k in KEYS for s in range(3, 7)}
    for r in records:
        assert set(r) == {"run_id", "key", "value", "timestamp", "step", "tracking_uri"}
        assert r["run_id"] == run_id and r["tracking_uri"] == store.uri
        assert r["value"] == _metrics(r["step"])[r["key"]]

    from raydpo.cli import main

    capsys.readouterr()
    assert main(["tracking", "replay", str(spill)]) == 0  # the command the warning names
    assert f"replayed {n} buffered metric points" in capsys.readouterr().out
    assert not spill.exists() and Path(f"{spill}.replayed").exists()
    hist = _history(store.uri, run_id)
    for k in KEYS:
        assert [m.step for m in hist[k]] == list(range(1, 7))
        for m in hist[k]:
            lo, hi = windows[m.step]
            assert lo <= m.timestamp <= hi
    by_point = {(r["key"], r["step"]): r["timestamp"] for r in records}
    assert all(m.timestamp == by_point[(k, m.step)] for k in KEYS for m in hist[k] if m.step >= 3)

    # replaying the same file again (e.g. restored by hand) sends nothing and duplicates nothing
    shutil.copy(f"{spill}.replayed", spill)
    assert tracking.replay_buffer(str(spill), uri=store.uri) == 0
    assert {k: [m.step for m in ms] for k, ms in _history(store.uri, run_id).items()} == \
        {k: list(range(1, 7)) for k in KEYS}


def test_replay_refuses_an_unreachable_store_and_keeps_the_file(tmp_path):
    spill = tmp_path / "s.jsonl"
    uri = f"http://127.0.0.1:{_free_port()}"
    spill.write_text(json.dumps({"run_id": "r", "key": "a", "value": 1.0, "timestamp": 1, "step": 1,
                                 "tracking_uri": uri}) + "\n")
    with pytest.raises(RuntimeError, match="unreachable"):
        tracking.replay_buffer(str(spill))
    assert spill.exists()


def test_driver_sends_the_workers_spill_when_the_store_is_back(store, tmp_path, capsys):
    """The store came back after the workers closed: the driver (`tracking.replay_spill`, called by
    fit_stage after the fit) sends their spilled points, so the run is whole without the replay
    command; while the store is still down the file stays for that command."""
    from raydpo.tracking import replay_spill

    run_id = tracking.start_run(store.uri, store.exp_id, "driver-replay")
    folder = tmp_path / "run-dpo"
    folder.mkdir()
    spill = folder / "mlflow_buffer_dpo.jsonl"
    spill.write_text("".join(json.dumps({"run_id": run_id, "key": k, "value": v, "timestamp": 1000 + s, "step": s,
                                         "tracking_uri": store.uri}) + "\n"
                             for s in range(1, 4) for k, v in _metrics(s).items()))
    down = f"http://127.0.0.1:{_free_port()}"
    assert replay_spill(down, folder, "dpo") == 0
    assert spill.exists()
    lines = []
    assert replay_spill(store.uri, folder, "dpo", progress=lines.append) == 3 * len(KEYS)
    assert not spill.exists() and (folder / "mlflow_buffer_dpo.jsonl.replayed").exists()
    assert lines == [f"[dpo] MLflow store reachable again: sent the {3 * len(KEYS)} metric points buffered "
                     "during the outage"]
    assert {k: [m.step for m in ms] for k, ms in _history(store.uri, run_id).items()} == \
        {k: [1, 2, 3] for k in KEYS}

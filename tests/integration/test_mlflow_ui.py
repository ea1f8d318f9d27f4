"""The MLflow UI for real: ``mlflow server`` over the demo's store, the DPO run opened in a headless
Chromium (Debian's ``chromium`` package, installed by the test setup: ``tests/install_browser.sh``).

What is checked, each on the page as the browser rendered it (the SPA's own requests to the server):

* the run page (Overview): the run's name, id and ``raydpo.stage`` tag, and the reward metrics
  (``train/`` and ``eval/`` ``rewards/accuracies`` and ``rewards/margins``) with the values the
  store holds;
* the Model metrics tab: one drawn chart per reward metric (its legend ``<run name> (<key>)`` only
  appears once the chart has plotted the series);
* the Artifacts tab on ``reward_curves.png``: the image served from ``<workdir>/mlartifacts`` and
  decoded by the browser, at the PNG's own size.

Screenshots (and the page text) are kept under ``$RAYDPO_TEST_ARTIFACTS`` or ``<repo>/test-artifacts``,
in ``mlflow-ui/``, with ``timings.json``.

The browser is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on fds 3/4, stdlib only) instead of one-shot ``--dump-dom`` / ``--screenshot``: those take the DOM
and the picture in two separate page loads, and a ``--virtual-time-budget`` that was enough for the
DOM's charts left the screenshot's charts as spinners. Here the page is polled until what is asserted
has rendered (or a real-time deadline passes), and the screenshot is taken of that same page state.
"""

from __future__ import annotations

import base64
import collections
import fcntl
import json
import math
import os
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import raydpo_suite_tally as tally  # tests/_tally, on sys.path by tests/conftest.py

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "raydpo-demo"
REWARD_METRICS = ("train/rewards/accuracies", "train/rewards/margins",
                  "eval/rewards/accuracies", "eval/rewards/margins")
ERROR_MARKERS = ("Page Not Found", "does not exist", "Something went wrong", "Internal Server Error",
                 "can’t be reached", "can't be reached", "ERR_CONNECTION", "ERR_EMPTY_RESPONSE")
SERVER_START_S = 240  # `mlflow server` import + first request: ~50 s on a loaded 2-core box
PAGE_S = 240          # one page's data and charts, same box
# The first test to run pays for the session fixtures: the demo (its subprocess has 880 s) and
# the server start.
FIRST_TEST_TIMEOUT = 880 + SERVER_START_S + PAGE_S + 60

_timings: dict[str, float] = {}


# -- chromium ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:  # the setup installs it (README's test command, .ci/run): never a test
        pytest.fail("chromium is not installed: run tests/install_browser.sh (the README's test setup does)")
    r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Chromium" in r.stdout, r.stdout + r.stderr
    return path


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe: the browser reads commands
    from its fd 3 and writes replies and events to its fd 4, each a JSON object ended by a NUL."""

    def __init__(self, chromium: str, profile: Path, log: Path, width: int = 1600, height: int = 1200):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # the browser-side ends above fd 9 so that they cannot be 3 or 4 themselves (and bash, not
        # dash, can redirect from them)
        to_browser_r, from_browser_w = (self._high(fd) for fd in (to_browser_r, from_browser_w))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--no-first-run", "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                # the usual automation flags: no throttling of timers or rendering for a page that
                # is not in the foreground
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows", "about:blank"]
        self._log = open(log, "ab")
        fds = f"3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-"
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" {fds}', chromium, *args],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        tally.record("browser")  # the suite's cost line counts every launch
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._w, self._r = to_browser_w, from_browser_r
        self._buf = b""
        self._id = 0
        try:
            self.version = self.call("Browser.getVersion", timeout=120)["product"]
            # the page the browser opened (a target made with Target.createTarget starts hidden)
            page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.call("Target.attachToTarget",
                                     {"targetId": page["targetId"], "flatten": True})["sessionId"]
            self.call("Page.enable", session=True)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _high(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return high

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium over the DevTools pipe")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe (exit status {self.proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)  # events (no id) are not used
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=15)
            self.proc.wait(15)
        except Exception:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the browser started above
                self.proc.wait(15)
        finally:
            os.close(self._w)
            os.close(self._r)
            self._log.close()


SNAPSHOT_JS = """JSON.stringify({
  href: location.href, title: document.title,
  text: document.body ? document.body.innerText : "",
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                                 height: i.naturalHeight}))
})"""


def render(browser: Browser, url: str, shot: Path, ready, *, height: int, width: int = 1600,
           timeout: float = PAGE_S) -> dict:
    """Open ``url`` at ``width`` x ``height``, poll the rendered page until ``ready(snapshot)`` is
    true (or ``timeout`` passes), save a screenshot of that state to ``shot`` and the page text
    next to it; returns the last snapshot (``href``, ``title``, ``text``, ``images``) with
    ``ready`` and ``seconds``."""
    for stale in (shot, shot.with_suffix(".txt")):
        stale.unlink(missing_ok=True)  # an earlier run's picture must not pass for this one
    browser.call("Emulation.setDeviceMetricsOverride",
                 {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)
    # from a blank page: the pages differ only in their #fragment, and the SPA must not show the
    # last test's page state as this one's
    browser.call("Page.navigate", {"url": "about:blank"}, session=True)
    t0 = time.monotonic()
    browser.call("Page.navigate", {"url": url}, session=True)
    deadline = t0 + timeout
    while True:
        snap = json.loads(browser.evaluate(SNAPSHOT_JS))
        snap["ready"] = bool(ready(snap))
        if snap["ready"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    snap["seconds"] = round(time.monotonic() - t0, 1)
    png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"}, session=True, timeout=120)["data"])
    shot.write_bytes(png)
    shot.with_suffix(".txt").write_text(f"{url}\n{snap['href']}\n\n{snap['text']}")
    return snap


def lines(snap: dict) -> list[str]:
    return [ln.strip() for ln in snap["text"].splitlines() if ln.strip()]


def errors_on(snap: dict) -> list[str]:
    return [m for m in ERROR_MARKERS if m in snap["text"] or m in snap["title"]]


def assert_png(path: Path, *, min_bytes: int = 20_000) -> tuple[int, int]:
    """A real, non-trivial PNG; returns its (width, height)."""
    assert path.is_file(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- the store, the server -------------------------------------------------------------

@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    root = Path(os.environ.get("RAYDPO_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out = root / "mlflow-ui"
    out.mkdir(parents=True, exist_ok=True)
    yield out
    (out / "timings.json").write_text(json.dumps(_timings, indent=2) + "\n")


@pytest.fixture(scope="module")
def dpo_run(demo_run):
    """The demo's one DPO run, read from its store: ids, name, last metric values, artifact folder."""
    from mlflow.tracking import MlflowClient

    demo_run.check()
    client = MlflowClient(tracking_uri=demo_run.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT!r} in {demo_run.tracking_uri}"
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`raydpo.stage` = 'dpo'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    for key in REWARD_METRICS:
        assert key in run.data.metrics, f"the DPO run has no {key}: {sorted(run.data.metrics)}"
    artifacts = Path(unquote(urlparse(run.info.artifact_uri).path))
    return collections.namedtuple("DpoRun", "experiment_id run_id name metrics artifacts")(
        exp.experiment_id, run.info.run_id, run.info.run_name, dict(run.data.metrics), artifacts)


def server_command(tracking_uri: str, port: int) -> list[str]:
    """``mlflow server`` with the store flags raydpo prints (`tracking.ui_command`), from this venv."""
    from raydpo.tracking import ui_command

    printed = shlex.split(ui_command(tracking_uri))
    assert printed[:2] == ["mlflow", "ui"], printed
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow), "server", *printed[2:], "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


@pytest.fixture(scope="module")
def mlflow_ui(demo_run, tmp_path_factory, port_picker):
    """A real ``mlflow server`` on 127.0.0.1 over the demo's store; yields its base URL."""
    port = port_picker()
    cmd = server_command(demo_run.tracking_uri, port)
    log_path = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    # no huey job runner (7 more processes): the UI's run pages need none of it
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=demo_run.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = t0 + SERVER_START_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited ({proc.returncode}): {shlex.join(cmd)}\n"
                                f"{log_path.read_text(errors='replace')[-4000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                        if r.status == 200 and r.read().strip() == b"OK":
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not healthy after {SERVER_START_S}s: {shlex.join(cmd)}\n"
                                f"{log_path.read_text(errors='replace')[-4000:]}")
                time.sleep(0.5)
            _timings["server_start_s"] = round(time.monotonic() - t0, 1)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn child (own group)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    """One browser for the module's pages (`render` starts each page from about:blank)."""
    tmp = tmp_path_factory.mktemp("chromium")
    t0 = time.monotonic()
    b = Browser(chromium, tmp / "profile", tmp / "chromium.log")
    _timings.setdefault("browser_start_s", round(time.monotonic() - t0, 1))
    yield b
    b.close()


def run_url(base: str, run, tab: str = "") -> str:
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}{tab}"


# -- the tests -------------------------------------------------------------------------

@pytest.mark.timeout(FIRST_TEST_TIMEOUT)
def test_dpo_run_page_shows_run_and_reward_metrics(mlflow_ui, dpo_run, browser, artifacts_dir):
    shot = artifacts_dir / "dpo_run_overview.png"
    wanted = [dpo_run.name, dpo_run.run_id, *REWARD_METRICS]

    def ready(snap):
        return errors_on(snap) or all(w in lines(snap) for w in wanted)

    snap = render(browser, run_url(mlflow_ui, dpo_run), shot, ready, height=2400)
    _timings["render_overview_s"] = snap["seconds"]
    assert_png(shot)
    assert not errors_on(snap), f"error page ({errors_on(snap)}), see {shot}:\n{snap['text'][:2000]}"
    assert snap["ready"], f"run page incomplete after {snap['seconds']}s, see {shot}:\n{snap['text'][:3000]}"
    assert snap["href"].endswith(f"/runs/{dpo_run.run_id}") and "MLflow" in snap["title"], snap
    text = lines(snap)
    assert "raydpo.stage" in snap["text"]
    assert f"Metrics ({len(dpo_run.metrics)})" in text, [t for t in text if t.startswith("Metrics")]
    # the metrics table reads "<key>" then "<value>" (JS number formatting): the store's last values
    for key in REWARD_METRICS:
        shown = [text[i + 1] for i, t in enumerate(text[:-1]) if t == key]
        assert shown, f"{key} not in the metrics table"
        assert any(_close(v, dpo_run.metrics[key]) for v in shown), (key, shown, dpo_run.metrics[key])


def _close(shown: str, value: float) -> bool:
    try:
        return math.isclose(float(shown.replace("\u2212", "-")), value, rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return False


@pytest.mark.timeout(FIRST_TEST_TIMEOUT)
def test_dpo_model_metrics_tab_draws_reward_charts(mlflow_ui, dpo_run, browser, artifacts_dir):
    shot = artifacts_dir / "dpo_model_metrics.png"
    # charts load when scrolled into view: a viewport tall enough for every section (~3 charts a row)
    sections = collections.Counter(k.rsplit("/", 1)[0] if "/" in k else "" for k in dpo_run.metrics)
    height = min(12000, 600 + sum(100 + 450 * math.ceil(n / 3) for n in sections.values()))
    legends = [f"{dpo_run.name} ({key})" for key in REWARD_METRICS]

    def ready(snap):
        return errors_on(snap) or all(lg in lines(snap) for lg in legends)

    snap = render(browser, run_url(mlflow_ui, dpo_run, "/model-metrics"), shot, ready, height=height)
    _timings["render_model_metrics_s"] = snap["seconds"]
    width, shot_height = assert_png(shot, min_bytes=50_000)
    assert (width, shot_height) == (1600, height)
    assert not errors_on(snap), f"error page ({errors_on(snap)}), see {shot}:\n{snap['text'][:2000]}"
    missing = [lg for lg in legends if lg not in lines(snap)]
    assert not missing, f"charts not drawn after {snap['seconds']}s: {missing}, see {shot}:\n{snap['text'][:3000]}"
    assert snap["href"].endswith(f"/runs/{dpo_run.run_id}/model-metrics")
    for section in ("train/rewards", "eval/rewards"):
        assert section in lines(snap), f"no {section} chart section"


@pytest.mark.timeout(FIRST_TEST_TIMEOUT)
def test_dpo_reward_curves_artifact_is_served_and_shown(demo_run, mlflow_ui, dpo_run, browser, artifacts_dir):
    png = dpo_run.artifacts / "reward_curves.png"
    # sqlite store: artifacts next to the database (tracking.artifact_root), where the server reads them
    assert dpo_run.artifacts.is_relative_to(demo_run.workdir.resolve() / "mlartifacts"), dpo_run.artifacts
    size = assert_png(png, min_bytes=5_000)
    shot = artifacts_dir / "dpo_reward_curves_artifact.png"

    def shown(snap):
        return [i for i in snap["images"] if i["alt"] == "reward_curves.png" and i["complete"] and i["width"]]

    def ready(snap):
        return errors_on(snap) or shown(snap)

    snap = render(browser, run_url(mlflow_ui, dpo_run, "/artifacts/reward_curves.png"), shot, ready, height=1200)
    _timings["render_artifact_s"] = snap["seconds"]
    assert_png(shot)
    assert not errors_on(snap), f"error page ({errors_on(snap)}), see {shot}:\n{snap['text'][:2000]}"
    assert shown(snap), f"reward_curves.png not displayed after {snap['seconds']}s, see {shot}: {snap['images']}"
    assert (shown(snap)[0]["width"], shown(snap)[0]["height"]) == size  # the logged picture, decoded
    assert "config.yaml" in lines(snap) and "reward_curves.png" in lines(snap)  # the artifact tree

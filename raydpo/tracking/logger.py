"""Worker-side metric logging into a run by id, and surviving a tracking-store outage.

Rank 0 of the workers logs metrics into the driver's run *by id* (`make_logger` -> `RunLogger`,
plain ``MlflowClient`` calls, no fluent active-run globals); other ranks get a `NullLogger`.

A tracking store that goes away (server restarted, network partition, sqlite folder on a flaky
mount) must neither stop nor kill training. `BufferedLogger` is the rank-0 logger that queues
metric points with their original timestamps and sends them from a daemon thread, buffering
through an outage; what is still unsent at `close` is spilled to JSONL, which `replay_buffer`
sends later without duplicating points already in the run (``raydpo tracking replay``).
"""

from __future__ import annotations

import shlex
import threading
import time
from typing import Any

from raydpo import storage
from raydpo.tracking.runs import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, _log_generations, _log_tags
from raydpo.tracking.store import _client, _fail_fast_http_env, _is_http, _short, check_store
from raydpo.tracking.terminal import echo

REPLAY_COMMAND = "raydpo tracking replay"


class RunLogger:
    """Logs into an existing run by id (plain client calls, no active-run globals); safe inside
    Ray workers."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + MAX_METRICS_PER_BATCH])

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        _log_generations(self.client, self.run_id, rows)


class NullLogger:
    """What ranks other than 0 get: the same methods, no MLflow import, no traffic."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        pass


def make_logger(uri: str | None, run_id: str | None, rank: int, *, buffered: bool = False,
                skip_through_step: int | None = None):
    """For rank 0 when a store and run are given: a `RunLogger`, or with ``buffered`` a
    `BufferedLogger` (training never waits on the store; an outage is buffered and flushed, steps
    ``<= skip_through_step`` are not logged again). Otherwise a `NullLogger`."""
    if rank == 0 and uri and run_id:
        if buffered:
            return BufferedLogger(uri, run_id, skip_through_step)
        return RunLogger(uri, run_id)
    return NullLogger()


def _warn(line: str) -> None:
    from raydpo.tracking.terminal import echo

    echo(line, err=True)


def _cause(e: BaseException) -> str:
    """A short cause for a failed store call: MLflow wraps requests' errors in long messages."""
    text = " ".join(str(e).split())
    low = text.lower()
    for needle, short in (("connection refused", "connection refused"), ("timed out", "timed out"),
                          ("name or service not known", "cannot resolve host"),
                          ("connection reset", "connection reset"), ("remotedisconnected", "connection closed")):
        if needle in low:
            return short
    return _short(e, 160)


def _spill_record(uri: str, run_id: str, point: tuple[str, float, int, int]) -> dict[str, Any]:
    key, value, ts, step = point
    return {"run_id": run_id, "key": key, "value": value, "timestamp": ts, "step": step, "tracking_uri": uri}


class BufferedLogger:
    """A `RunLogger` that never blocks training on, nor dies from, a tracking-store outage.

    ``log_metrics`` stamps the points (ms, as MLflow does) and queues them; a daemon thread sends
    them with ``log_batch``. When that fails the points stay queued (one warning line), the thread
    retries every ``retry_s`` .. ``max_retry_s`` seconds and says once when it has flushed the
    backlog. Resending a point keeps its timestamp, so a batch that reached the store before its
    answer was lost is not stored twice (MLflow's SQL store skips identical points).

    ``skip_through_step``: points with ``step <= skip_through_step`` are dropped -- on resume,
    pass `max_logged_step` of the run so steps it already holds are not logged twice.

    For an http store this sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` in ``os.environ`` (process-wide; meant for the rank-0 worker
    process) so that each attempt fails in seconds instead of minutes.

    Call `close` at the end: it flushes within a timeout and spills what is left to JSONL
    (`replay_buffer`). Tags are queued the same way.
    """

    def __init__(self, uri: str, run_id: str, skip_through_step: int | None = None, *,
                 retry_s: float = 2.0, max_retry_s: float = 5.0, max_buffered: int = 1_000_000,
                 spill_path: str | None = None):
        import atexit
        import collections

        self.uri, self.run_id = uri, run_id
        self.skip_through_step = None if skip_through_step is None else int(skip_through_step)
        self.retry_s, self.max_retry_s = float(retry_s), max(float(retry_s), float(max_retry_s))
        self.max_buffered = int(max_buffered)
        self.spill_path = spill_path
        self.sent = self.skipped = self.dropped = 0
        self.last_error: str | None = None
        self._pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._inflight: list[tuple[str, float, int, int]] = []
        self._tags: dict[str, str] = {}
        self._inflight_tags: dict[str, str] = {}
        self._cond = threading.Condition()
        self._wake = threading.Event()  # new data (ignored while the store is down)
        self._kick = threading.Event()  # flush/close: retry now
        self._stopping = self._abandoned = self._closed = False
        self._down = False
        self._outage_points = 0
        self._warned_overflow = self._warned_closed = False
        self._client = None
        if _is_http(uri):
            _fail_fast_http_env()
        self._thread = threading.Thread(target=self._loop, name="raydpo-mlflow-logger", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # -- caller side (training loop): no I/O, no MLflow import ---------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        step = int(step)
        if self.skip_through_step is not None and step <= self.skip_through_step:
            self.skipped += len(metrics)
            return
        ts = int(time.time() * 1000)
        points = [(str(k), float(v), ts, step) for k, v in metrics.items()]
        with self._cond:
            if self._closed:
                if not self._warned_closed:
                    self._warned_closed = True
                    _warn(f"warning: MLflow logger for run {self.run_id} is closed; "
                          "dropping metrics logged after close")
                return
            self._pending.extend(points)
            over = len(self._pending) - self.max_buffered
            if over > 0:
                for _ in range(over):
                    self._pending.popleft()
                self.dropped += over
                if not self._warned_overflow:
                    self._warned_overflow = True
                    _warn(f"warning: MLflow store {self.uri} unreachable for too long; more than "
                          f"{self.max_buffered} metric points buffered, dropping the oldest")
        self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._cond:
            if self._closed:
                return
            self._tags.update({str(k): str(v) for k, v in tags.items()})
        self._wake.set()

    def log_generations(self, rows: list[dict[str, Any]], step: int) -> None:
        """Best effort, at once: a step already in the run (a resumed job) is not logged again;
        a failed upload only warns -- generations are for reading, not worth a training step."""
        if not rows or (self.skip_through_step is not None and int(step) <= self.skip_through_step):
            return
        try:
            _log_generations(self._get_client(), self.run_id, rows)
        except Exception as e:  # noqa: BLE001 -- an outage must not kill training
            _warn(f"warning: could not log the step-{int(step)} eval generations to MLflow store {self.uri} "
                  f"({_short(e)}); they are lost")

    @property
    def pending(self) -> int:
        """Metric points not yet acknowledged by the store (queued or being sent)."""
        with self._cond:
            return len(self._pending) + len(self._inflight)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` for everything queued so far to reach the store; True if it
        did. Never raises."""
        deadline = time.monotonic() + timeout_s
        self._kick.set()
        self._wake.set()
        with self._cond:
            while self._pending or self._inflight or self._tags or self._inflight_tags:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self, timeout_s: float = 10, spill_path: str | None = None) -> int:
        """Flush within ``timeout_s``, stop the sender, and write whatever was not sent to
        ``spill_path`` (default: the constructor's) as JSONL, one metric point per line
        (``run_id, key, value, timestamp, step, tracking_uri``; unsent tags as ``{"tag": ...}``
        lines). Returns how many records were not sent (0: everything reached the store).
        Idempotent."""
        import atexit

        with self._cond:
            if self._closed:
                return 0
            self._stopping = True
        self._kick.set()
        self._wake.set()
        self._thread.join(max(0.0, timeout_s))
        points, tags = self._abandon()
        try:
            atexit.unregister(self._at_exit)
        except Exception:  # noqa: BLE001
            pass
        if not points and not tags:
            return 0
        return self._spill(points, tags, spill_path or self.spill_path)

    def _abandon(self) -> tuple[list, dict]:
        """Stop the sender for good and take what it has not sent: the batch in flight (maybe
        sent; replay dedupes) before the queue."""
        with self._cond:
            self._closed = self._abandoned = True
            points = list(self._inflight) + list(self._pending)
            tags = {**self._inflight_tags, **self._tags}
            self._pending.clear()
            self._tags.clear()
        return points, tags

    def _spill(self, points: list, tags: dict, path: str | None) -> int:
        """Append the unsent records to ``path`` (JSONL) and say how to replay them, or that they
        are lost; returns how many there were."""
        import json

        left = len(points) + len(tags)
        why = f" ({self.last_error})" if self.last_error else ""
        if not path:
            _warn(f"warning: MLflow store {self.uri} unreachable{why}; {len(points)} metric points and "
                  f"{len(tags)} tags of run {self.run_id} were not sent and are lost (no spill path)")
            return left
        lines = [json.dumps(_spill_record(self.uri, self.run_id, p)) for p in points]
        lines += [json.dumps({"run_id": self.run_id, "tag": k, "value": v, "tracking_uri": self.uri})
                  for k, v in tags.items()]
        try:
            storage.append_text(path, "".join(f"{line}\n" for line in lines))  # local or run storage's bucket
        except OSError as e:
            _warn(f"warning: MLflow store {self.uri} unreachable{why}; {left} unsent records of run "
                  f"{self.run_id} could not be written to {path} either ({_short(e)}); they are lost")
            return left
        _warn(f"warning: MLflow store {self.uri} unreachable{why}; wrote {len(points)} unsent metric points "
              f"(and {len(tags)} tags) of run {self.run_id} to {path}; replay them with: "
              f"{REPLAY_COMMAND} {shlex.quote(str(path))}")
        return left

    def _at_exit(self) -> None:
        self.close(timeout_s=5)

    # -- sender thread ---------------------------------------------------------------------

    def _get_client(self):
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    def _take_batch(self) -> tuple[list, dict] | None:
        """Move the next batch to in-flight (under the lock); None when there is nothing."""
        with self._cond:
            if self._abandoned or (not self._pending and not self._tags):
                return None
            tags = dict(list(self._tags.items())[:MAX_PARAMS_PER_BATCH])
            for k in tags:
                del self._tags[k]
            n = min(len(self._pending), MAX_METRICS_PER_BATCH - len(tags))
            self._inflight = [self._pending.popleft() for _ in range(n)]
            self._inflight_tags = tags
            return self._inflight, tags

    def _send(self, points: list, tags: dict) -> None:
        from mlflow.entities import Metric, RunTag

        self._get_client().log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in points],
                                     tags=[RunTag(k, v) for k, v in tags.items()])

    def _loop(self) -> None:
        delay = self.retry_s
        while True:
            delay = self._wait(delay)
            delay = self._send_queued(delay)
            with self._cond:
                if self._abandoned or (self._stopping and not self._pending and not self._tags):
                    self._cond.notify_all()
                    return

    def _wait(self, delay: float) -> float:
        """Sleep until there is work: new points (or a second) while the store is up, the retry
        delay (cut short by flush/close) while it is down. Returns the delay to keep using."""
        if self._down:
            if self._stopping:
                delay = min(delay, 0.5)  # closing: keep trying until close's deadline
            self._kick.wait(delay)
            self._kick.clear()
        else:
            self._wake.wait(1.0)
        self._wake.clear()
        return delay

    def _send_queued(self, delay: float) -> float:
        """Send batches until the queue is empty or a send fails; returns the next retry delay."""
        while True:
            batch = self._take_batch()
            if batch is None:
                return delay
            points, tags = batch
            try:
                self._send(points, tags)
            except Exception as e:  # noqa: BLE001 -- keep everything, retry later
                return self._send_failed(points, tags, e, delay)
            self._batch_sent(points)

    def _send_failed(self, points: list, tags: dict, e: BaseException, delay: float) -> float:
        """Put the batch back in front of the queue; warn once per outage; returns the next retry
        delay (``retry_s`` at the start of an outage, then doubling up to ``max_retry_s``)."""
        self.last_error = _cause(e)
        with self._cond:
            if not self._abandoned:  # put the batch back in front, newer tags win
                self._pending.extendleft(reversed(points))
                for k, v in tags.items():
                    self._tags.setdefault(k, v)
            self._inflight, self._inflight_tags = [], {}
            n = len(self._pending)
            self._cond.notify_all()
        if not self._down:
            self._down, self._outage_points = True, 0
            _warn(f"warning: MLflow store {self.uri} unreachable; buffering {n} metric points "
                  f"(will retry): {self.last_error}")
            return self.retry_s
        return min(delay * 2, self.max_retry_s)

    def _batch_sent(self, points: list) -> None:
        """Count the batch as sent; say once when an outage's backlog is flushed."""
        with self._cond:
            self._inflight, self._inflight_tags = [], {}
            self.sent += len(points)
            if self._down:
                self._outage_points += len(points)
            drained = not self._pending and not self._tags
            self._cond.notify_all()
        if self._down and drained:
            self._down = False
            self.last_error = None
            _warn(f"MLflow store {self.uri} reachable again; flushed {self._outage_points} "
                  f"buffered metric points of run {self.run_id}")


def _read_spill(path: str) -> list[dict[str, Any]]:
    import json

    lines = storage.read_text(path).splitlines()  # a local file or an object in run storage
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if n == len(lines):  # a torn last line (process killed mid-write): the rest is good
                _warn(f"warning: {path}:{n}: skipping a truncated last line")
                break
            raise ValueError(f"{path}:{n}: not a JSON object") from None
    return records


def replay_buffer(path: str, uri: str | None = None) -> int:
    """Send a `BufferedLogger` spill file (JSONL) into its run(s) -- the store is ``uri``, else
    each record's ``tracking_uri`` -- keeping original timestamps and steps, in batches of
    ``MAX_METRICS_PER_BATCH``. Points whose (key, step) the run already holds are skipped, so
    replaying twice adds nothing. Returns how many points were sent and renames the file to
    ``<path>.replayed``. Raises (file left as is) when a store is unreachable."""
    from mlflow.entities import Metric, RunTag

    records = _read_spill(path)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        target = uri or r.get("tracking_uri")
        if not target or not r.get("run_id"):
            raise ValueError(f"{path}: record without run_id/tracking_uri (pass uri): {r}")
        groups.setdefault((target, r["run_id"]), []).append(r)
    sent = 0
    for (target, run_id), recs in groups.items():
        reason = check_store(target)
        if reason is not None:
            raise RuntimeError(reason)
        client = _client(target)
        tags = [RunTag(r["tag"], str(r["value"])) for r in recs if "tag" in r]
        points = [r for r in recs if "key" in r]
        seen: set[tuple[str, int]] = set()
        for key in {r["key"] for r in points}:
            seen.update((key, int(m.step)) for m in client.get_metric_history(run_id, key))
        todo = []
        for r in points:
            ks = (r["key"], int(r["step"]))
            if ks not in seen:
                seen.add(ks)
                todo.append(Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])))
        for i in range(0, len(todo), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=todo[i:i + MAX_METRICS_PER_BATCH])
            sent += len(todo[i:i + MAX_METRICS_PER_BATCH])
        if tags:
            _log_tags(client, run_id, list({t.key: t for t in tags}.values()))
    storage.move(path, storage.replayed_file(path))
    return sent


def replay_spill(uri: str, folder: str, stage: str, progress=echo) -> int:
    """Metrics the workers could not send (the store was down when they closed) wait in
    ``mlflow_buffer_<stage>.jsonl``; when the store is back by the time the driver gets here, send
    them now, so the user needs no replay command. Never raises: the file stays for
    ``raydpo tracking replay`` when this fails."""
    spill = storage.spill_file(folder, stage)
    try:
        if not storage.exists(spill) or check_store(uri) is not None:
            return 0
        n = replay_buffer(spill, uri)
    except Exception as e:  # noqa: BLE001 - the stage's own outcome matters more
        echo(f"warning: could not replay {spill} ({e.__class__.__name__}); later: {REPLAY_COMMAND} {spill}")
        return 0
    progress(f"[{stage}] MLflow store reachable again: sent the {n} metric points buffered during the outage")
    return n

"""What a training command shows on the terminal, and where everything else goes.

The terminal gets raydpo's own lines (``[stage] ...``, ``warning: ...``, ``error: ...``) and one
progress bar per stage (step, ETA, loss, reward accuracy), drawn on the driver from the
progress lines rank 0 prints (`raydpo.train.progress`). Everything else — the workers' and
libraries' chatter (DeepSpeed's accelerator notice, Ray Train's ``TrainingReport`` dumps,
deprecation warnings, C++ log lines) — goes to a log file in the run folder, which a failure
names and shows the end of. ``--verbose`` prints it all on the terminal as well.

How: the driver's file descriptors 1 and 2 point at the log for the command's duration (so
nothing a library writes, from Python or C, reaches the terminal), the terminal is written
through copies of them taken first, and Ray's stream of worker output (``log_to_driver``) is
routed by one handler in place of Ray's own printer. When stdout is not a terminal (a pipe, a
Ray job's log) the bar is a plain progress line with the ETA appended, one per logging step.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

from raydpo.tracking import terminal

_RAY_HANDLER = "ray_print_logs"  # the name Ray registers its printer under (ray._private.worker)
_OURS = re.compile(r"^(\[[a-z0-9_-]+\] |warning: |error: |raydpo: )")
DEDUP_S = 5.0
_active: Console | None = None


def _terminal(stream: IO[str], fd: int) -> IO[str]:
    """A stream that keeps reaching where ``stream`` reaches once ``fd`` is pointed elsewhere:
    ``stream`` itself when it does not write to ``fd`` (e.g. pytest's capture), else a new file on
    a copy of ``fd``."""
    try:
        same = stream.fileno() == fd
    except (AttributeError, OSError, io.UnsupportedOperation):
        same = False
    if not same:
        return stream
    stream.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1)


def _flush(*streams: IO[str]) -> None:
    for stream in streams:
        try:
            stream.flush()
        except (AttributeError, ValueError):  # closed, or not a stream
            pass


class _Bar:
    """One stage's progress: a tqdm bar on a terminal, else a line per update with the ETA."""

    def __init__(self, stage: str, total: int, out: IO[str], err: IO[str], tty: bool):
        self.stage, self.total, self.out, self.tty = stage, total, out, tty
        self.t0: float | None = None
        self.step0 = self.n = 0
        self.bar = None
        self.err = err

    def update(self, step: int, metrics: dict[str, float], line: str, now: float) -> None:
        if self.t0 is None:  # the rate counts from the first line this driver saw (a resume starts later)
            self.t0, self.step0 = now, step
        self.n = step
        if self.tty:
            if self.bar is None:  # its ETA counts from here, as above
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, initial=step, desc=f"[{self.stage}]", unit="step", file=self.err,
                                dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| "
                                                               "{elapsed}<{remaining}{postfix}")
            shown = {"loss": metrics.get("train/loss"), "acc": metrics.get("train/rewards/accuracies"),
                     "eval_loss": metrics.get("eval/loss"), "eval_acc": metrics.get("eval/rewards/accuracies")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)
            self.bar.update(step - self.bar.n)
            self.bar.refresh()
            return
        eta = ""
        if step > self.step0 and step < self.total:
            left = (now - self.t0) / (step - self.step0) * (self.total - step)
            eta = f" eta {_clock(left)}"
        elif step >= self.total:
            eta = f" done in {_clock(now - self.t0)}" if step > self.step0 else ""
        print(f"{line.rstrip()}{eta}", file=self.out, flush=True)

    @property
    def done(self) -> bool:
        return self.n >= self.total

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Console:
    """A training command's terminal (see the module doc). Use as a context manager; ``echo``
    (`raydpo.tracking.terminal`) reaches the active one. ``out``/``err`` stand in for the terminal (tests); ``bars=False``
    prints progress lines as they come (a Tune search: several trials report at once)."""

    def __init__(self, path: str | Path, verbose: bool = False, bars: bool = True,
                 out: IO[str] | None = None, err: IO[str] | None = None):
        self.target = str(path)  # a local path, or a URI in run storage (`raydpo.storage`)
        self.path = Path(self.target)  # where the log is now: a temporary file until training begins (settle)
        self.upload_at_exit = False  # an object store takes no appends: the local log goes up at the end
        self.settled = self.keep = False
        self.verbose, self.bars = verbose, bars
        self._given = (out, err)
        self._lock = threading.RLock()
        self._bars: dict[str, _Bar] = {}
        self._owned: list[IO[str]] = []  # the terminal copies this console opened (and closes)
        self._saved: dict[int, int] = {}
        self._ray_printer: Any = None
        self._seen: dict[tuple[Any, str], float] = {}
        self.log: IO[str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Console:
        global _active
        import tempfile

        # nothing goes into the run folder before training begins: a command refused at setup
        # (bad store, bad storage) leaves no half-written run behind
        fd, tmp = tempfile.mkstemp(prefix="raydpo-", suffix=".log")
        os.close(fd)
        self.path = Path(tmp)
        self.log = open(self.path, "a", buffering=1)  # O_APPEND: fds 1/2 and this file interleave by line
        out, err = self._given
        self.out = out if out is not None else _terminal(sys.stdout, 1)
        self.err = err if err is not None else _terminal(sys.stderr, 2)
        self._owned = [s for s in (self.out, self.err) if s not in (out, err, sys.stdout, sys.stderr)]
        if not self.verbose:
            _flush(sys.stdout, sys.stderr)
            for fd in (1, 2):
                self._saved[fd] = os.dup(fd)
                os.dup2(self.log.fileno(), fd)
        _active = self
        self._sink = terminal.set_sink(self.say)  # raydpo.tracking.terminal.echo reaches this console
        self.attach_ray()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        self.detach_ray()
        _flush(sys.stdout, sys.stderr)
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        _flush(self.out, self.err)
        for stream in self._owned:
            stream.close()
        self._owned.clear()
        if _active is self:
            _active = None
            terminal.set_sink(self._sink)
        if self.log is not None:
            self.log.close()
        if self.upload_at_exit:
            self._upload()
        elif not self.settled and not self.keep:
            self.path.unlink(missing_ok=True)

    def _upload(self) -> None:
        """The log, added to the one in run storage (a rerun's log follows the earlier one's)."""
        from raydpo import storage

        try:
            storage.append_text(self.target, self.path.read_text(errors="replace"))
        except OSError as e:  # the run's outcome matters more; the log stays here
            print(f"warning: could not copy the log to {self.target} ({e}); it is in {self.path}", file=sys.stderr)
            return
        self.path.unlink(missing_ok=True)

    def settle(self) -> None:
        """Move the log into the run folder (training has begun). If the folder cannot be made, the
        log stays where it is, and is kept."""
        from raydpo import storage

        if self.settled or self.log is None:
            return
        self.settled = True
        if storage.is_remote(self.target):
            self.upload_at_exit = True
            return
        try:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            log = open(self.target, "a", buffering=1)
        except OSError:
            self.keep = True
            return
        self.log.flush()
        with open(self.path, errors="replace") as early:
            log.write(early.read())
        for fd in self._saved:
            os.dup2(log.fileno(), fd)
        self.log.close()
        self.path.unlink(missing_ok=True)
        self.log, self.path = log, Path(self.target)

    # -- Ray's worker output -----------------------------------------------------------------
    def attach_ray(self) -> None:
        """Route Ray's stream of worker output through `on_worker_lines` (Ray's own printer, when
        registered, stays only with ``--verbose``). Called again once ``ray.init`` has run."""
        try:
            import ray
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        if not ray.is_initialized():
            return
        with dispatcher._lock:
            handlers = list(dispatcher.handlers)
        if any(name == "raydpo_console" for name, _ in handlers):
            return
        if not self.verbose:
            self._ray_printer = next((h for name, h in handlers if name == _RAY_HANDLER), None)
            if self._ray_printer is not None:
                dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler("raydpo_console", self.on_worker_lines)
        self.settle()
        if not self.verbose:
            self.say(f"log: {self.path} (the workers' and libraries' output; --verbose prints it here too)")

    def detach_ray(self) -> None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        dispatcher.remove_handler("raydpo_console")
        if self._ray_printer is not None:
            dispatcher.add_handler(_RAY_HANDLER, self._ray_printer)
            self._ray_printer = None

    def on_worker_lines(self, batch: dict[str, Any]) -> None:
        """One batch of a Ray process's output: all of it to the log (with the process named);
        raydpo's own lines to the terminal, progress lines as the stage's bar."""
        from raydpo.train.progress import parse_progress

        who = batch.get("actor_name") or batch.get("task_name") or "worker"
        prefix = f"({who} pid={batch.get('pid')}) "
        now = time.monotonic()
        with self._lock:
            self.settle()
            for line in batch.get("lines", []):
                # Ray can deliver a Train worker's line twice (its printer dedups them, as here)
                key = (batch.get("pid"), line)
                if now - self._seen.get(key, -1e9) < DEDUP_S:
                    continue
                self._seen[key] = now
                if len(self._seen) > 4096:
                    self._seen = {k: t for k, t in self._seen.items() if now - t < DEDUP_S}
                self._to_log(prefix + line)
                if self.verbose:
                    continue  # Ray's printer shows it
                if (p := parse_progress(line)) is not None:
                    self._progress(p, line, now)
                elif _OURS.match(line):
                    self._to_terminal(line, err=False)

    # -- writing -----------------------------------------------------------------------------
    def say(self, line: str, err: bool = False) -> None:
        with self._lock:
            self._to_log(line)
            self._to_terminal(line, err)

    def _progress(self, p, line: str, now: float) -> None:
        bar = self._bars.get(p.stage)
        if bar is None or bar.total != p.total or p.step < bar.n:
            if bar is not None:
                bar.close()
            tty = self.bars and _isatty(self.err)
            bar = self._bars[p.stage] = _Bar(p.stage, p.total, self.out, self.err, tty)
        bar.update(p.step, p.metrics, line, now)
        if bar.done:
            bar.close()
            del self._bars[p.stage]

    def _to_terminal(self, line: str, err: bool) -> None:
        stream = self.err if err else self.out
        live = [b.bar for b in self._bars.values() if b.bar is not None]
        if live:
            from tqdm import tqdm

            tqdm.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    def _to_log(self, line: str) -> None:
        if self.log is not None and not self.log.closed:
            self.log.write(line.rstrip("\n") + "\n")

    def tail(self, n: int = 20) -> list[str]:
        """The log's last ``n`` lines (what a failure shows; the log is then kept, wherever it is)."""
        self.keep = True
        if self.log is not None and not self.log.closed:
            self.log.flush()
        try:
            with open(self.path, errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=n)]
        except OSError:
            return []


def _isatty(stream: IO[str]) -> bool:
    """A terminal a bar can be drawn on (a pty of 0 columns, e.g. under `script`, gets lines)."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True


def attach_ray() -> None:
    """After ``ray.init``: let the active console take over Ray's worker output."""
    if _active is not None:
        _active.attach_ray()

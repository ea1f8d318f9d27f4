"""Preemption on the driver: SIGTERM writes the stage's stop file, which every worker reads after
each step (`raydpo.train.preempt.StopWatch`), so the stage checkpoints and stops instead of dying.
"""

from __future__ import annotations

import signal
import threading

from raydpo import storage


def install_driver_handler(stop_file: str):
    """SIGTERM on the driver → the stop file (workers checkpoint and stop). Returns a function
    restoring the previous handler, and an event set when it fired. Only from the main thread
    (elsewhere Python forbids handlers: a no-op)."""
    fired = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return (lambda: None), fired

    def on_term(signum, frame):
        fired.set()
        storage.write_text(stop_file, "SIGTERM\n")  # a local file or an object in the bucket

    prev = signal.signal(signal.SIGTERM, on_term)
    return (lambda: signal.signal(signal.SIGTERM, prev)), fired

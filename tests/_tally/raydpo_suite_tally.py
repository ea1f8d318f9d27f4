"""What the suite pays for, counted for real: TorchTrainer fits, Ray instances started, browser
launches -- in the pytest process and in every Python process it starts (CLI subprocesses, a
``ray start --head``, the Ray workers and Tune trial actors of an instance a test started).

Test tooling only; raydpo itself knows nothing of it. ``tests/conftest.py`` names a tally folder
in ``$RAYDPO_SUITE_TALLY_DIR`` and puts this folder first on ``$PYTHONPATH``, so every Python
child imports ``sitecustomize`` from here, which calls `install`. Each event appends one line
(``<kind> <pid>``) to ``<tally dir>/events``: appends of a short line are atomic, so processes
never interleave. Ray and its trainer are not imported here: a post-import hook wraps them when
(and only if) the process imports them, so a process that never touches Ray pays nothing.

* ``fit``: ``DataParallelTrainer.fit`` (Ray Train V2, what ``ray.train.torch.TorchTrainer`` is in
  Ray 2.60) called on a TorchTrainer, counted at the call (a fit that fails paid its start-up too);
* ``ray``: a head ``ray._private.node.Node`` started (``ray.init`` without a cluster to join, or
  ``ray start --head``); a process that connects to a running instance starts no head node;
* ``browser``: recorded by the test code that launches one (`record`).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys
from collections import Counter
from pathlib import Path

ENV = "RAYDPO_SUITE_TALLY_DIR"
EVENTS = "events"
KINDS = ("fit", "ray", "browser")
TRAINER_MODULE = "ray.train.v2.api.data_parallel_trainer"
NODE_MODULE = "ray._private.node"


def record(kind: str, folder: str | None = None) -> None:
    """Append one ``kind`` event to the tally folder (``$RAYDPO_SUITE_TALLY_DIR`` read now, not at
    import: a nested pytest names its own); no folder, no record."""
    if kind not in KINDS:
        raise ValueError(f"unknown tally event {kind!r}; one of {KINDS}")
    folder = folder or os.environ.get(ENV)
    if not folder:
        return
    fd = os.open(os.path.join(folder, EVENTS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def counts(folder: str) -> Counter:
    """Events per kind recorded in ``folder`` (every kind present, 0 when none)."""
    path = Path(folder) / EVENTS
    lines = path.read_text().split() if path.exists() else []
    c = Counter({k: 0 for k in KINDS})
    c.update(lines[0::2])
    return c


def summary_line(c: Counter) -> str:
    return f"raydpo suite: {c['fit']} TorchTrainer fits, {c['ray']} Ray instances, {c['browser']} browser launches"


# -- the wrappers --------------------------------------------------------------------------------

def _patch_trainer(module) -> None:
    cls = module.DataParallelTrainer
    if getattr(cls.fit, "_raydpo_tally", False):
        return
    fit = cls.fit

    @functools.wraps(fit)
    def counted_fit(self, *a, **kw):
        if any(c.__name__ == "TorchTrainer" for c in type(self).__mro__):
            record("fit")
        return fit(self, *a, **kw)

    counted_fit._raydpo_tally = True
    cls.fit = counted_fit


def _patch_node(module) -> None:
    cls = module.Node
    if getattr(cls.__init__, "_raydpo_tally", False):
        return
    init = cls.__init__

    sig = inspect.signature(init)

    @functools.wraps(init)
    def counted_init(self, *a, **kw):
        args = sig.bind(self, *a, **kw)
        args.apply_defaults()
        if args.arguments["head"] and not args.arguments["connect_only"]:
            record("ray")
        return init(self, *a, **kw)

    counted_init._raydpo_tally = True
    cls.__init__ = counted_init


HOOKS = {TRAINER_MODULE: _patch_trainer, NODE_MODULE: _patch_node}


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the patch."""

    def __init__(self, inner, patch):
        self._inner, self._patch = inner, patch

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_data, is_package, resource readers, ...
        return getattr(self._inner, name)


class _PostImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = HOOKS.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, patch)
                return spec
        return None


def install() -> None:
    """Wrap the counted functions now where their modules are loaded, else when they are
    imported. Idempotent."""
    for name, patch in HOOKS.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PostImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImport())

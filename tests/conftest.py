"""Fixtures shared by the unit tier."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

TALLY = Path(__file__).resolve().parent / "_tally"
sys.path.insert(0, str(TALLY))
import raydpo_suite_tally as tally  # noqa: E402

_saved_env: dict[str, str | None] = {}
GLOO_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def pytest_configure(config):
    """Count what the run pays for (`raydpo_suite_tally`): a fresh tally folder for this run, and
    the tally's sitecustomize first on $PYTHONPATH so every Python process a test starts counts
    into it too (CLI subprocesses, `ray start`, the workers of a Ray instance a test starts)."""
    for name in (tally.ENV, "PYTHONPATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "PATH"):
        _saved_env[name] = os.environ.get(name)
    os.environ[tally.ENV] = tempfile.mkdtemp(prefix="raydpo-suite-tally-")
    # Ray token auth on for the whole run, before any test imports Ray: the integration tier's
    # cluster needs it (job submission), and a process reads RAY_AUTH_MODE once, at its first Ray
    # use, so a unit test touching Ray first would leave this process unable to join it
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TALLY), os.environ.get("PYTHONPATH")) if p)
    # the environment an activated venv gives, whether pytest was started as .venv/bin/pytest or
    # not: this process, the Ray cluster and every command a test starts find the same tools (the
    # venv's `ray`, `raydpo`, `torchrun`, and its ninja rather than the system's for any torch
    # extension build)
    os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    tally.install()


def pytest_collection_modifyitems(config, items):
    """The unit tier first, then the integration tier (each in collection order): fast failures
    come first, and the integration tier's session cluster (tests/integration/conftest.py) starts
    with its first test and stops at the end of the session, right after its last."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)


@pytest.hookimpl(trylast=True)  # after the durations table: the run's last lines
def pytest_terminal_summary(terminalreporter):
    folder = os.environ.get(tally.ENV)
    if folder:
        terminalreporter.write_line(tally.summary_line(tally.counts(folder)))


def pytest_unconfigure(config):
    folder = os.environ.get(tally.ENV)
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _one_torch_thread_beside_the_background_start(request):
    """A unit test that runs while the integration tier's cluster and demo run start beside the
    unit tier (tests/integration/conftest.py; `config.raydpo_background_busy` says whether they
    still are) gets one torch thread: with two, every op's OpenMP barrier waits for a core the demo
    holds (measured: a 2 s DeepSpeed test took 41 s). Once they are done, the tests get torch's default."""
    busy = getattr(request.config, "raydpo_background_busy", None)
    if busy is None or request.node.get_closest_marker("integration") is not None or not busy():
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    """One ``model.cache_dir`` for the unit tests that only read the tiny model: it is built once
    per tiny config (seeded, the same bytes every time), not once per module (~10 s each)."""
    return str(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def gloo():
    """A one-rank gloo process group for in-process DeepSpeed engines (no Ray), torn down through
    DeepSpeed so the next module that needs one starts clean."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    saved = {k: os.environ.get(k) for k in GLOO_ENV}
    if not dist.is_initialized():
        # a module before this one may have torn its group down with torch alone: DeepSpeed would
        # still hold that dead group and fail the next engine
        groups._release_process_group_references()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # releases DeepSpeed's references too, for the next module
    elif dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():  # no rendezvous left behind for the processes later tests start
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

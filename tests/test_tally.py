"""The suite's cost tally (tests/_tally, printed by tests/conftest.py at the end of every run):
what a process does is counted, in this process and in the Python processes a test starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import raydpo_suite_tally as tally

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _child_env(folder: Path) -> dict[str, str]:
    # what a test's subprocess inherits from this session (conftest set both)
    env = {**os.environ, tally.ENV: str(folder)}
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(TESTS / "_tally")
    return env


def test_a_subprocess_counts_its_torchtrainer_fits_and_the_ray_instances_it_starts(tmp_path):
    # the real classes, driven without Ray: the count is taken at the call, before the body runs
    code = """
import ray.train.torch, ray._private.node as node
trainer = object.__new__(ray.train.torch.TorchTrainer)  # the class raydpo.orchestration.launch fits
try:
    trainer.fit()
except Exception:
    pass
for kw in ({"head": True}, {"head": False, "connect_only": True}, {"head": False}):
    try:
        node.Node(None, **kw)  # a head node is a new instance; connecting or joining is not
    except Exception:
        pass
"""
    subprocess.run([sys.executable, "-c", code], env=_child_env(tmp_path), check=True, timeout=300)
    assert tally.counts(str(tmp_path)) == {"fit": 1, "ray": 1, "browser": 0}


def test_a_process_that_never_imports_ray_does_not_load_it(tmp_path):
    code = "import sys; print('ray' in sys.modules, 'raydpo_suite_tally' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(tmp_path), capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "True"]  # counting costs nothing until the process imports Ray


def test_events_from_several_processes_add_up_and_print_as_one_line(tmp_path):
    tally.record("browser", str(tmp_path))
    code = "import raydpo_suite_tally as t; t.record('browser'); t.record('ray')"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=_child_env(tmp_path), check=True)
    assert tally.summary_line(tally.counts(str(tmp_path))) == \
        "raydpo suite: 0 TorchTrainer fits, 2 Ray instances, 3 browser launches"


def test_every_run_ends_with_the_tally_line_of_its_own_folder():
    # a nested run names its own tally folder: it starts nothing, so it counts nothing
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                        str(TESTS / "test_tally.py")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "raydpo suite: 0 TorchTrainer fits, 0 Ray instances, 0 browser launches" in r.stdout.splitlines()


def test_the_pytest_process_itself_counts_what_in_process_tests_start():
    # the integration tier's ray.init fixtures and fit_stage calls run in this process
    import ray._private.node as node
    import ray.train.v2.api.data_parallel_trainer as dpt

    assert getattr(node.Node.__init__, "_raydpo_tally", False)
    assert getattr(dpt.DataParallelTrainer.fit, "_raydpo_tally", False)

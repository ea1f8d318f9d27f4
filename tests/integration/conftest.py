"""Shared integration fixtures.

``demo_run`` runs the README's main command once (``raydpo demo --quick``) per test session in a
temporary working directory with its own SQLite MLflow store; the training, report and MLflow-UI
tests all read that one store instead of training again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
def demo_run(tmp_path_factory) -> DemoRun:
    work = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run(
        [sys.executable, "-m", "raydpo.cli", "demo", "--quick", "--set", f"run.storage_path={work / 'runs'}",
         "--set", f"model.cache_dir={REPO / '.raydpo_cache'}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=880,
    )
    return DemoRun(work, uri, r.returncode, r.stdout, r.stderr)

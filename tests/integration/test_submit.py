"""Ray job submission against a real `ray start --head` on this machine.

`ray job submit ... -- raydpo pipeline --config jobs/demo_cpu.yaml` must end SUCCEEDED with its
runs in MLflow; `raydpo submit` must do the same through JobSubmissionClient, pass secrets without
printing them, and `raydpo jobs status|logs` must show the job.
"""

from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from raydpo.config.presets import QUICK

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head node with the job API on 127.0.0.1, token auth on, the venv on PATH."""
    tmp = tmp_path_factory.mktemp("head")
    dash = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "tmp": tmp}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _quick_sets(tmp: Path, name: str) -> list[str]:
    short = ["data.sample_size=300", "sft.max_steps=3", "sft.eval_every=3", "sft.save_every=3",
             "dpo.max_steps=3", "dpo.eval_every=3", "dpo.save_every=3"]
    return [*QUICK, *short, f"run.name={name}", f"run.storage_path={tmp / 'runs'}",
            f"model.cache_dir={REPO / '.raydpo_cache'}", "tracking.experiment_name=raydpo-jobs"]


def _runs(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["raydpo-jobs"])


@pytest.mark.timeout(900)
def test_ray_job_submit_pipeline_succeeds_and_tracks_runs(ray_head):
    env, tmp = ray_head["env"], ray_head["tmp"]
    sets = [a for s in _quick_sets(tmp, "jobsubmit") for a in ("--set", s)]
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "tests/schemas", ".raydpo_cache"]}),
         "--", "raydpo", "pipeline", "--config", "jobs/demo_cpu.yaml", *sets],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=880,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and re.search(r"Job '[^']+' succeeded", out), out[-5000:]
    runs = _runs(env["MLFLOW_TRACKING_URI"])
    mine = runs[runs["tags.mlflow.runName"].str.startswith("jobsubmit")]
    assert sorted(mine["tags.raydpo.stage"]) == ["dpo", "sft"]
    dpo = mine[mine["tags.raydpo.stage"] == "dpo"].iloc[0]
    assert dpo["status"] == "FINISHED" and "metrics.eval/rewards/accuracies" in runs.columns


@pytest.mark.timeout(900)
def test_raydpo_submit_then_jobs_status_and_logs(ray_head):
    env, tmp = dict(ray_head["env"]), ray_head["tmp"]
    secret = f"hf_{uuid.uuid4().hex}"
    env["HF_TOKEN"] = secret
    sets = [a for s in _quick_sets(tmp, "raydposubmit") for a in ("--set", s)]
    job_id = f"raydpo-test-{uuid.uuid4().hex[:8]}"
    raydpo = str(BIN / "raydpo")
    r = subprocess.run([raydpo, "submit", "--address", ray_head["address"], "--config", "jobs/demo_cpu.yaml",
                        "--stage", "sft", "--job-id", job_id, *sets],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"job {job_id}: SUCCEEDED" in out
    assert secret not in out and "'HF_TOKEN': '***'" in out  # passed through, never printed

    st = subprocess.run([raydpo, "jobs", "status", job_id, "--address", ray_head["address"]],
                        env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stdout + st.stderr
    logs = subprocess.run([raydpo, "jobs", "logs", job_id, "--address", ray_head["address"]],
                          env=env, capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0 and "[sft] step 3/3" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    assert secret not in logs.stdout

    runs = _runs(env["MLFLOW_TRACKING_URI"])
    mine = runs[runs["tags.mlflow.runName"].str.startswith("raydposubmit")]
    assert list(mine["tags.raydpo.stage"]) == ["sft"] and mine.iloc[0]["status"] == "FINISHED"

    # a bad config is refused locally, before anything reaches the cluster
    bad = subprocess.run([raydpo, "submit", "--address", ray_head["address"], "--config", "jobs/demo_cpu.yaml",
                          "--set", "dpo.beta=-1", "--no-wait"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "dpo.beta" in bad.stderr

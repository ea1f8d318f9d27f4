"""Ray job submission against a real `ray start --head` on this machine.

`ray job submit --working-dir . -- raydpo ...` must end SUCCEEDED; `raydpo submit` must run a short
real DPO stage through JobSubmissionClient with its run in MLflow, pass secrets without printing
them, and `raydpo jobs status|logs` must show the job. That stage's data has an empty eval split:
DPO trains without evaluation, saying so once.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from raydpo.config.presets import QUICK

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(ray_cluster, tmp_path_factory):
    """The session's `ray start --head` (tests/integration/conftest.py): the job API on 127.0.0.1,
    token auth on, the venv on the head's PATH; a client environment without the GCS address, as
    a user's laptop has."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_cluster.client_env["RAY_AUTH_TOKEN"])
    return {"address": ray_cluster.dashboard, "env": env, "tmp": tmp_path_factory.mktemp("jobs")}


def _empty_eval_dpo_sets(tmp: Path, name: str) -> list[str]:
    """A short DPO stage from the tiny base whose eval split is empty: a tiny eval fraction of a
    small sample, so no question hashes into it."""
    short = ["data.sample_size=40", "data.eval_fraction=0.0001", "dpo.max_steps=2", "dpo.log_every=1",
             "dpo.eval_every=1", "dpo.save_every=2"]
    return [*QUICK, *short, f"run.name={name}", f"run.storage_path={tmp / 'runs'}",
            f"model.cache_dir={REPO / '.raydpo_cache'}", "tracking.experiment_name=raydpo-jobs"]


def _runs(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["raydpo-jobs"])


@pytest.mark.timeout(300)
def test_ray_job_submit_runs_a_raydpo_command_from_the_working_dir_on_the_cluster(ray_head):
    """`ray job submit --working-dir . -- raydpo ...`: the repo is uploaded, the job's `raydpo` runs
    from it (a relative `jobs/*.yaml`), joins the cluster and runs Ray Data there. A cheap
    command: the short real stage through a job is `raydpo submit`'s test below."""
    env = ray_head["env"]
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "tests/schemas", ".raydpo_cache"]}),
         "--", "raydpo", "data", "stats", "--json", "--config", "jobs/demo_cpu.yaml", "--set", "data.sample_size=40",
         "--set", f"model.cache_dir={REPO / '.raydpo_cache'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and re.search(r"Job '[^']+' succeeded", out), out[-5000:]
    stats = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"')]
    assert len(stats) == 1 and stats[0]["rows"] == 40 and stats[0]["dpo_pairs"] > 0, out[-3000:]


@pytest.mark.timeout(900)
def test_raydpo_submit_then_jobs_status_and_logs(ray_head):
    """`raydpo submit` runs a short real DPO stage as a job; its eval split is empty, so it trains
    without evaluation and warns once (the reference pass scores an empty eval split too)."""
    env, tmp = dict(ray_head["env"]), ray_head["tmp"]
    secret = f"hf_{uuid.uuid4().hex}"
    env["HF_TOKEN"] = secret
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"  # passed to the job (raydpo submit --env's defaults)
    sets = [a for s in _empty_eval_dpo_sets(tmp, "raydposubmit") for a in ("--set", s)]
    job_id = f"raydpo-test-{uuid.uuid4().hex[:8]}"
    raydpo = str(BIN / "raydpo")
    r = subprocess.run([raydpo, "submit", "--address", ray_head["address"], "--config", "jobs/demo_cpu.yaml",
                        "--stage", "dpo", "--job-id", job_id, *sets],
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
    assert logs.returncode == 0 and "[dpo] step 2/2" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    assert secret not in logs.stdout
    warned = [ln for ln in logs.stdout.splitlines() if "warning: the eval split is empty" in ln]
    assert len(warned) == 1, logs.stdout[-3000:]  # one warning, not one per pass or per worker

    runs = _runs(env["MLFLOW_TRACKING_URI"])
    mine = runs[runs["tags.mlflow.runName"].str.startswith("raydposubmit")]
    assert list(mine["tags.raydpo.stage"]) == ["dpo"] and mine.iloc[0]["status"] == "FINISHED"
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(env["MLFLOW_TRACKING_URI"]), mine.iloc[0]["run_id"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2]  # trained both steps
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("eval/")]  # and never evaluated
    assert (Path(mine.iloc[0]["tags.raydpo.adapter_path"]) / "adapter_config.json").exists()

    # a bad config is refused locally, before anything reaches the cluster
    bad = subprocess.run([raydpo, "submit", "--address", ray_head["address"], "--config", "jobs/demo_cpu.yaml",
                          "--set", "dpo.beta=-1", "--no-wait"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "dpo.beta" in bad.stderr

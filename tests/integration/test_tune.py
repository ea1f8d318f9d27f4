"""`raydpo tune`: a real Tune search with ASHA, shared reference log-probs, MLflow lineage."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, env):
    return subprocess.run([sys.executable, "-m", "raydpo.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=850)


TRIALS = 2
SEARCH = ["scaling.num_workers=1", "dpo.max_steps=4", "dpo.eval_every=2", "dpo.save_every=4", "data.sample_size=240",
          f"tune.num_samples={TRIALS}", "run.name=tq", f"model.cache_dir={REPO / '.raydpo_cache'}"]


@pytest.mark.timeout(900)
def test_tune_from_the_demos_sft_parent_children_best_and_registered_model(tmp_path, demo_run):
    """`raydpo tune` on the SFT adapter `raydpo demo --quick` trained (the session's demo_run), in a
    working dir holding a copy of the demo's MLflow store: a search with ASHA, the reference
    log-probs computed once for every trial, one parent run with a child per trial, the best trial
    marked and registered, lineage back to the SFT run; then --resume restores it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    demo_run.check()
    # a user's defaults: relative run storage and the MLflow store in the working dir (trials run
    # in their own trial folders and must still share both): the demo's store, copied
    shutil.copy(demo_run.workdir / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    sft = mlflow.search_runs(experiment_names=["raydpo-demo"], filter_string="tags.`raydpo.stage` = 'sft'")
    assert len(sft) == 1
    sft_adapter = sft.iloc[0]["tags.raydpo.adapter_path"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cfg = tmp_path / "tune.yaml"
    cfg.write_text((REPO / "jobs" / "demo_cpu.yaml").read_text())
    sets = [a for s in [*SEARCH, f"dpo.sft_adapter={sft_adapter}"] for a in ("--set", s)]
    r = _run(["tune", "--config", str(cfg), *sets], tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "== raydpo tune ==" in r.stdout and "<- best" in r.stdout
    table = r.stdout.split("== raydpo tune ==")[1]
    assert sum(1 for line in table.splitlines() if line.strip().endswith(("DONE", "STOPPED", "<- best"))) == TRIALS
    out = r.stdout + r.stderr
    assert out.count("computing reference log-probs once") == 1, out[-5000:]  # not again in any trial
    # the tokenized pairs + reference columns are materialized once by the driver, not read per trial
    assert out.count("materialized once for every trial") == 1, out[-5000:]
    assert "reusing reference log-probs" not in out, out[-5000:]  # no trial touched the parquet store
    assert (tmp_path / "raydpo_runs" / "reference").is_dir()

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["raydpo-demo"])
    parent = runs[runs["tags.raydpo.stage"] == "tune"]
    assert len(parent) == 1
    pid = parent.iloc[0]["run_id"]
    children = runs[runs["tags.mlflow.parentRunId"] == pid]
    assert len(children) == TRIALS
    assert children["params.beta"].notna().all() and children["params.lr"].notna().all()
    assert children["params.trial_id"].nunique() == TRIALS
    # finished trials FINISHED, ASHA-stopped ones KILLED: none left RUNNING or shown as FAILED
    assert set(children["status"]) <= {"FINISHED", "KILLED"}, children[["status", "params.trial_id"]]
    assert children["params.dpo.reference"].eq("precomputed").all()  # no reference forward in the trials
    assert "metrics.eval/rewards/accuracies" in children
    best = children[children.get("tags.raydpo.best_trial") == "true"]
    assert len(best) == 1
    assert parent.iloc[0]["tags.raydpo.sft_run_id"] == sft.iloc[0]["run_id"]  # lineage back to the demo's SFT run

    client = MlflowClient(uri)
    versions = client.search_model_versions("name='raydpo-demo-dpo'")
    assert len(versions) == 1 and versions[0].run_id == best.iloc[0]["run_id"]
    assert versions[0].tags["raydpo.sft_run_id"] == sft.iloc[0]["run_id"]
    assert {a.path for a in client.list_artifacts(pid)} >= {"trials.png", "trials.txt"}

    # --resume: the finished search is restored, no trial is run again
    again = _run(["tune", "--config", str(cfg), "--resume", *sets], tmp_path, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "resuming" in again.stdout
    runs2 = mlflow.search_runs(experiment_names=["raydpo-demo"])
    assert len(runs2[runs2["tags.mlflow.parentRunId"] == pid]) == TRIALS  # no new trial runs

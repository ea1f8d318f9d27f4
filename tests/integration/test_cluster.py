"""Past one machine, on this one (issue 24): a ``num-cpus 0`` head that has no worker node when
the command starts, a worker node that joins later in a mount namespace of its own (it sees
neither the driver's ``/tmp`` nor its working dir: every worker, Ray Data task, merge and
reference replica runs there), storage on a folder both see (the NFS case) or in an S3 bucket
(moto's server), and the one-line refusals when a node does not see the driver's folder.

One cluster for the module (`cluster_harness`): head + S3 server start once, the node joins
during the first test, while its command waits for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster_harness import list_keys, start_head, start_s3_server, start_worker_node, stop_group, stop_head

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
DEMO_YAML = REPO / "raydpo" / "configs" / "demo_cpu.yaml"
NODE_CPUS = 3  # 2 workers x 0.5 CPU + 1 for Ray Data, and a spare for the merge task / reference replica
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


@pytest.fixture(scope="module")
def two_nodes():
    """The head (num-cpus 0, with the bucket's credentials: Ray Train's controller runs there),
    the S3 server, a driver folder under /tmp (private to the node) and a shared folder (bound
    into the node's namespace at the same path). ``node`` is started by the first test."""
    base = Path(tempfile.mkdtemp(prefix="rdp2n-", dir="/tmp"))
    shared, driver = base / "shared", base / "driver"
    shared.mkdir()
    driver.mkdir()
    cache = REPO / ".raydpo_cache"
    if cache.is_dir():  # the tiny model, already built: a copy on the driver's disk only
        shutil.copytree(cache, driver / "cache")
    s3 = start_s3_server(base)
    head = None
    try:
        head = start_head(os.environ["RAY_AUTH_TOKEN"], base, env=s3.env)
        state = SimpleNamespace(base=base, shared=shared, driver=driver, s3=s3, head=head, node=None)
        yield state
    finally:
        if head is not None and getattr(state, "node", None) is not None:
            state.node.stop()
        if head is not None:
            stop_head(head)
        stop_group(s3.group, s3.proc)
        shutil.rmtree(base, ignore_errors=True)


def _env(c, **extra) -> dict[str, str]:
    env = {**os.environ, **c.head.client_env, **c.s3.env,
           "MLFLOW_TRACKING_URI": f"sqlite:///{c.shared / 'mlflow.db'}", **extra}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _common(c) -> list[str]:
    return ["--set", f"model.cache_dir={c.driver / 'cache'}", "--set", "run.max_failures=2",
            "--set", "scaling.resources_timeout_s=300"]


def _run(c, args: list[str], timeout_s: float, **env) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "raydpo.cli", *args], cwd=c.driver, env=_env(c, **env),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    return p.returncode, p.stdout, time.monotonic() - t0


def _run_local_files(root: Path) -> list[str]:
    """Run files (records, checkpoints) a command left under a folder."""
    return sorted(str(p) for p in root.rglob("*") if p.name in ("raydpo_run.json", "trainer_state.json"))


@pytest.mark.timeout(900)
def test_a_cold_head_waits_for_a_late_node_that_trains_the_demo_from_shared_storage_through_worker_kills(two_nodes):
    """``raydpo demo --quick`` starts on a head with 0 CPUs and no worker node: it asks, waits
    (one line), and once a node joins trains SFT then DPO there, a worker killed in each stage
    resuming from its step-3 checkpoint; every file a worker reads comes from the shared storage."""
    c = two_nodes
    out_file = c.base / "demo.out"
    args = ["demo", "--quick", "--verbose", "--set", f"run.storage_path={c.shared / 'runs'}",
            "--set", "sft.save_every=3", "--set", "dpo.save_every=3",
            "--set", "dpo.sft_reference=merged", *_common(c)]  # the merge task on the worker node, covered
    t0 = time.monotonic()
    with open(out_file, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "raydpo.cli", *args], cwd=c.driver,
                             env=_env(c, RAYDPO_FAULTS="kill@4:rank=1"), stdout=out, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        while "waiting up to" not in out_file.read_text():  # it waits for resources before any node exists
            assert p.poll() is None, out_file.read_text()[-3000:]
            assert time.monotonic() - t0 < 240, "no waiting line within 240 s"
            time.sleep(0.5)
        waited_at = time.monotonic() - t0
        c.node = start_worker_node(c.head.address, {**c.head.client_env, **c.s3.env}, NODE_CPUS,
                                   private=[c.driver], shared=[c.shared])
        joined = c.node.wait_joined()
        rc = p.wait(timeout=800)
    finally:
        if p.poll() is None:
            stop_group(p.pid, p)
    out = out_file.read_text()
    print(f"cold head: waiting line after {waited_at:.0f} s, node joined {joined:.0f} s later, "
          f"whole command {time.monotonic() - t0:.0f} s")
    assert rc == 0, out[-4000:]
    wait_line = next(ln for ln in out.splitlines() if "waiting up to" in ln)
    assert "training workers" in wait_line and "autoscaler" in wait_line
    for stage in ("sft", "dpo"):  # a worker killed at step 4 of each stage, resumed from its step-3 checkpoint
        assert {int(s) for s in re.findall(rf"\[{stage}\] resumed from \S+ at step (\d+)", out)} == {3}, stage
    runs = c.shared / "runs"
    assert any(runs.glob("*/sft-merged/raydpo_merged.json")), "the merged SFT base is in run storage"
    assert any(runs.glob("models/tiny-llama-*/config.json")), "the tiny model is published into run storage"
    assert any(runs.glob("*/raydpo.log"))
    assert _run_local_files(c.driver) == []
    m = re.search(r"dpo: run (\w+) in", out)
    assert m, out[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{c.shared / 'mlflow.db'}")
    dpo = client.get_run(m.group(1))
    assert dpo.info.status == "FINISHED"
    steps = sorted(x.step for x in client.get_metric_history(dpo.info.run_id, "train/loss"))
    assert steps == [1, 3, 6], "rank 0 on the other node logged every logged step once, across the kill"


@pytest.mark.timeout(300)
def test_a_folder_the_worker_node_does_not_see_is_refused_in_one_line_before_training(two_nodes):
    c = two_nodes
    assert c.node is not None and c.node.running(), "the first test's node"
    dpo = ["dpo", "--config", str(DEMO_YAML), "--set", "run.name=refused", *_common(c)]
    rc, out, s = _run(c, [*dpo, "--set", f"run.storage_path={c.driver / 'runs'}"], 240)
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, out[-3000:]
    assert f"run.storage_path {c.driver / 'runs'}" in lines[0] and "does not see" in lines[0]
    assert "NFS" in lines[0] and "s3://" in lines[0], lines[0]
    assert "Traceback" not in out and not list((c.driver / "runs").rglob("checkpoint_*"))

    rc, out, s2 = _run(c, [*dpo, "--set", f"run.storage_path={c.shared / 'runs'}"], 240,
                       MLFLOW_TRACKING_URI=f"sqlite:///{c.driver / 'mlflow.db'}")
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "MLflow store" in lines[0] and "does not see" in lines[0], out[-3000:]
    print(f"refusals: storage {s:.0f} s, tracking store {s2:.0f} s")


@pytest.mark.timeout(900)
def test_s3_storage_keeps_every_run_file_resumes_a_killed_worker_and_shares_the_reference_cache(two_nodes):
    c = two_nodes
    assert c.node is not None and c.node.running(), "the first test's node"
    runs = f"{c.s3.uri}/runs"
    dpo = ["dpo", "--verbose", "--config", str(DEMO_YAML), "--set", f"run.storage_path={runs}",
           "--set", "data.sample_size=300", "--set", "dpo.log_every=1", "--set", "dpo.eval_every=6", *_common(c)]
    rc, out, s1 = _run(c, [*dpo, "--set", "run.name=s3a", "--set", "dpo.max_steps=6", "--set", "dpo.save_every=3"],
                       800, RAYDPO_FAULTS="kill@4:rank=1")
    assert rc == 0, out[-4000:]
    assert {int(s) for s in RESUMED.findall(out)} == {3}, out[-3000:]
    assert "computing reference log-probs once into s3://" in out
    rc, out2, s2 = _run(c, [*dpo, "--set", "run.name=s3b", "--set", "dpo.max_steps=2", "--set", "dpo.save_every=2"], 600)
    assert rc == 0, out2[-4000:]
    assert "reusing reference log-probs in s3://" in out2, "the second run reads the first one's cache"
    keys = list_keys(c.s3.env, runs)
    for want in (r"runs/s3a-dpo/raydpo_run\.json", r"runs/s3a-dpo/checkpoint_[^/]+/trainer_state\.json",
                 r"runs/s3a-dpo/checkpoint_[^/]+/adapter/adapter_config\.json", r"runs/s3a/raydpo\.log",
                 r"runs/reference/\w+/_SUCCESS", r"runs/models/tiny-llama-\w+/config\.json", r"runs/s3b-dpo/raydpo_run\.json"):
        assert any(re.fullmatch(want, k) for k in keys), (want, keys[:40])
    states = [k for k in keys if re.fullmatch(r"runs/s3a-dpo/checkpoint_[^/]+/trainer_state\.json", k)]
    assert len(states) >= 1
    assert _run_local_files(c.driver) == [] and not (c.driver / "s3:").exists(), "no run files on local disk"
    print(f"s3: kill + resume {s1:.0f} s, second run on the cached reference {s2:.0f} s")

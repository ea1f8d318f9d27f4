"""What is checked before Ray starts, as the CLI reports it: one line on stderr, exit 2, no
traceback, nothing written — an unreachable tracking store (within seconds), run storage that is
not a writable folder, a gated hub model without a token, a bad fault spec; and a changed config
on a rerun names the keys that differ."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raydpo.cli import main

REPO = Path(__file__).resolve().parents[1]


def _argv(tmp_path, *sets):
    out = ["dpo", "--set", f"run.storage_path={tmp_path / 'runs'}",
           "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for s in sets:
        out += ["--set", s]
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dpo(tmp_path, *sets) -> list[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: tiny}\n")
    return [*_argv(tmp_path, *sets)[:1], "--config", str(cfg), *_argv(tmp_path, *sets)[1:]]


def test_an_unreachable_tracking_server_is_one_line_and_exit_2_within_seconds(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    assert main(_dpo(tmp_path, f"tracking.tracking_uri=http://127.0.0.1:{port}")) == 2
    assert time.perf_counter() - t0 < 10
    line = _one_error_line(capsys)
    assert f"http://127.0.0.1:{port}" in line and "unreachable" in line
    assert not (tmp_path / "runs").exists()  # nothing half-written; Ray never started
    import ray

    assert not ray.is_initialized()


def test_storage_that_is_not_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(_dpo(tmp_path, f"run.storage_path={tmp_path / 'afile' / 'runs'}")) == 2
    assert "run.storage_path" in _one_error_line(capsys)


def test_read_only_storage_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    prefix = []
    if os.geteuid() == 0:  # root ignores permissions: drop its capabilities for the check
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: file permissions are not enforced")
        prefix = [shutil.which("setpriv"), "--bounding-set=-all", "--inh-caps=-all", "--"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name_or_path: tiny}\n")
    r = subprocess.run([*prefix, sys.executable, "-m", "raydpo.cli", "dpo", "--config", str(cfg),
                        "--set", f"run.storage_path={ro / 'runs'}",
                        "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not writable" in lines[0] and str(ro) in lines[0], r.stderr
    assert not (ro / "runs").exists()


def test_a_gated_model_without_a_token_is_refused_before_any_download(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, no stored token
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(_dpo(tmp_path, "model.name_or_path=meta-llama/Llama-2-7b-hf")) == 2
    line = _one_error_line(capsys)
    assert "meta-llama/Llama-2-7b-hf" in line and "gated" in line and "HF_TOKEN" in line


def test_a_rerun_with_another_config_names_the_keys(tmp_path, capsys):
    from raydpo.config import resume_fingerprint
    from raydpo.orchestration.launch import stage_storage
    from raydpo.storage import RUN_RECORD as RUN_FILE
    from raydpo.config.presets import demo_config

    cfg = demo_config(overrides=[f"run.storage_path={tmp_path / 'runs'}", "run.name=same"]).with_absolute_paths()
    folder = Path(stage_storage(cfg, "dpo"))  # a local storage path: the location is a path
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps({"fingerprint": resume_fingerprint(cfg)}))
    yaml = tmp_path / "c.yaml"
    yaml.write_text(cfg.to_yaml())
    argv = ["dpo", "--config", str(yaml), "--set", "dpo.beta=0.5", "--set",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "dpo.beta (0.1 -> 0.5)" in line and "--restart" in line


def _stage_run(tmp_path):
    from raydpo.config import Config, resume_fingerprint
    from raydpo.orchestration.launch import prepare_stage

    cfg = Config.from_dict({"run": {"storage_path": str(tmp_path / "runs"), "name": "overlap"},
                            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    return prepare_stage(cfg, "dpo", False, print, time.perf_counter(), resume_fingerprint(cfg))


def test_the_mlflow_run_opens_while_the_data_is_staged_and_a_data_error_ends_it_failed(tmp_path, monkeypatch):
    """`launch.open_run_and_stage_data`: the MLflow run is created in a thread beside
    `stage_data`; a data error is the error the user sees, and the run it opened ends FAILED
    (not left RUNNING); on success the run record names the run and its line is printed."""
    import threading

    from mlflow.tracking import MlflowClient

    from raydpo.orchestration import launch
    from raydpo.orchestration.errors import DataError

    seen = {}

    def bad_data(run, datasets):
        seen["threads"] = {t.name for t in threading.enumerate()}
        time.sleep(0.5)  # the MLflow thread is running meanwhile
        raise DataError("dpo: 3 training pairs cannot fill one batch")

    run = _stage_run(tmp_path)
    monkeypatch.setattr(launch, "stage_data", bad_data)
    with pytest.raises(DataError, match="cannot fill one batch"):
        launch.open_run_and_stage_data(run, None, None, None, None)
    assert any(n.startswith("raydpo-mlflow") for n in seen["threads"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.run_id and client.get_run(run.run_id).info.status == "FAILED"

    lines: list[str] = []
    run = _stage_run(tmp_path)
    run.progress = lines.append
    monkeypatch.setattr(launch, "stage_data", lambda run, datasets: ("stream", None))
    stream, eval_ds, restore, _ = launch.open_run_and_stage_data(run, None, None, None, None)
    restore()
    assert (stream, eval_ds) == ("stream", None)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    assert lines == [f"[dpo] MLflow run {run.run_id} in sqlite:///{tmp_path / 'mlflow.db'}"]
    record = json.loads((Path(run.folder) / "raydpo_run.json").read_text())
    assert record["run_id"] == run.run_id

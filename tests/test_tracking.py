"""raydpo.tracking against a real MLflow sqlite store (one per test, under tmp_path; no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from raydpo import tracking
from raydpo.config import Config, flatten
from raydpo.metric_names import EVAL_ACCURACY, LR, METRIC_KEYS, TOKENS_PER_S
from raydpo.tracking.plots import plot_reward_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow drops in the cwd would show up here


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory) -> Path:
    # Creating a sqlite store runs MLflow's schema migrations (seconds); do it once and give
    # each test its own copy of the empty, migrated database.
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, _migrated_db):
    (tmp_path / "store").mkdir()
    shutil.copy(_migrated_db, tmp_path / "store" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    exp_id = tracking.setup_experiment(uri, "raydpo-test")
    return SimpleNamespace(uri=uri, exp_id=exp_id, dir=tmp_path / "store", cwd=tmp_path)


def _run(store, name="run", **kw):
    return tracking.start_run(store.uri, store.exp_id, name, **kw)


def _dpo_metrics(step: int) -> dict[str, float]:
    # as the DPO loop logs them: train/ + every METRIC_KEYS name, plus the train-only keys
    return {**{f"train/{k}": step / 10 + i for i, k in enumerate(METRIC_KEYS)}, LR: 1e-4, TOKENS_PER_S: 1234.5}


# -- where the store is ------------------------------------------------------------------

def test_resolve_tracking_uri_config_beats_env_beats_default(monkeypatch, tmp_path):
    cfg = Config().tracking
    assert tracking.resolve_tracking_uri(cfg, cwd=str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.resolve_tracking_uri(cfg, cwd=str(tmp_path)) == "http://mlflow.internal:5000"
    explicit = Config().with_overrides({"tracking.tracking_uri": "sqlite:////data/runs.db"}).tracking
    assert tracking.resolve_tracking_uri(explicit) == "sqlite:////data/runs.db"


def test_resolve_tracking_uri_makes_relative_sqlite_absolute_for_workers(tmp_path):
    cfg = Config().with_overrides({"tracking.tracking_uri": "sqlite:///sub/mlflow.db"}).tracking
    # the autouse fixture chdir'ed to tmp_path: a Ray worker elsewhere must reach the same file
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/sub/mlflow.db"


def test_ui_command_points_at_the_store_and_its_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = tracking.ui_command(uri)
    assert cmd.startswith(f"mlflow ui --backend-store-uri {uri}")
    assert f"--default-artifact-root {tmp_path}/mlartifacts" in cmd
    assert tracking.ui_command("http://mlflow.internal:5000") == "http://mlflow.internal:5000"


def test_setup_experiment_creates_the_store_once_and_honours_an_artifact_location(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # neither the folder nor the db exists yet
    exp_id = tracking.setup_experiment(uri, "elsewhere", artifact_location="artifacts")
    assert (tmp_path / "new" / "mlflow.db").is_file()
    assert tracking.setup_experiment(uri, "elsewhere", artifact_location="/ignored") == exp_id
    # a relative location is pinned to the driver's cwd, so workers elsewhere agree on it
    assert MlflowClient(uri).get_experiment(exp_id).artifact_location == (tmp_path / "artifacts").as_uri()


def test_setup_experiment_is_idempotent_and_keeps_artifacts_next_to_the_db(store):
    from mlflow.tracking import MlflowClient

    assert tracking.setup_experiment(store.uri, "raydpo-test") == store.exp_id
    exp = MlflowClient(store.uri).get_experiment(store.exp_id)
    assert exp.artifact_location == (store.dir / "mlartifacts" / "raydpo-test").as_uri()


# -- metrics -----------------------------------------------------------------------------

def test_metric_names_round_trip_through_find_runs(store, monkeypatch):
    run_id = _run(store)
    log = tracking.make_logger(store.uri, run_id, rank=0)
    assert isinstance(log, tracking.RunLogger)
    for step in (1, 2, 3):
        log.log_metrics(_dpo_metrics(step), step=step)
    log.log_metrics({"eval/loss": 0.5, EVAL_ACCURACY: 0.75}, step=3)
    # another store in the environment (a shell's server) does not redirect the search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.cwd / 'elsewhere.db'}")

    (run,) = tracking.find_runs(store.uri, "raydpo-test")
    assert run.info.run_id == run_id
    m = run.data.metrics
    assert m[EVAL_ACCURACY] == 0.75
    assert m["train/rewards/margins"] == pytest.approx(0.3 + METRIC_KEYS.index("rewards/margins"))
    assert m[TOKENS_PER_S] == 1234.5 and m[LR] == 1e-4
    assert not (store.cwd / "elsewhere.db").exists()


def test_fetch_history_merges_train_and_eval_per_step(store):
    run_id = _run(store)
    log = tracking.RunLogger(store.uri, run_id)
    for step in (20, 10, 30):  # out of order on purpose
        log.log_metrics(_dpo_metrics(step), step=step)
    log.log_metrics({"eval/loss": 0.4, "eval/rewards/margins": 0.9}, step=20)

    hist = tracking.fetch_history(store.uri, run_id, None)
    assert [h["step"] for h in hist] == [10, 20, 30]
    assert hist[1]["eval/loss"] == 0.4 and hist[1]["eval/rewards/margins"] == 0.9
    assert "eval/loss" not in hist[0]
    assert hist[2]["train/loss"] == pytest.approx(3.0)
    assert set(hist[0]) == {"step", *_dpo_metrics(10)}

    only = tracking.fetch_history(store.uri, run_id, ["eval/loss"])
    assert only == [{"step": 20, "eval/loss": 0.4}]


def test_null_logger_for_other_ranks_touches_no_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'never.db'}"
    for log in (tracking.make_logger(uri, "abc", rank=1), tracking.make_logger(None, "abc", rank=0),
                tracking.make_logger(uri, None, rank=0)):
        assert isinstance(log, tracking.NullLogger)
        log.log_metrics({"train/loss": 1.0}, step=1)  # what the worker calls on every rank
        log.log_generations([{"step": 1, "prompt": "p"}], step=1)
    assert not (tmp_path / "never.db").exists()


# -- eval generations ---------------------------------------------------------------------

def _gen_rows(step: int, k: int = 2) -> list[dict]:
    return [{"step": step, "prompt_index": i, "prompt": f"Question: q{i} <b>?\n\nAnswer: ",
             "policy": f"policy {step}/{i} é", "reference": f"ref {i}", "chosen": f"chosen {i}"} for i in range(k)]


def test_generations_table_appends_per_step_and_reads_back_the_latest(store):
    run_id = _run(store)
    assert tracking.load_generations(store.uri, run_id) == []
    assert tracking.latest_generations([]) == (None, [])
    tracking.log_generations(store.uri, run_id, _gen_rows(5))
    tracking.RunLogger(store.uri, run_id).log_generations(_gen_rows(10), step=10)
    tracking.RunLogger(store.uri, run_id).log_generations([], step=11)  # nothing to log: no table rewrite

    rows = tracking.load_generations(store.uri, run_id)  # one artifact, rows appended in logging order
    assert [(r["step"], r["prompt_index"]) for r in rows] == [(5, 0), (5, 1), (10, 0), (10, 1)]
    assert set(rows[0]) == set(tracking.GENERATION_COLUMNS)
    assert rows[2]["policy"] == "policy 10/0 é" and rows[0]["prompt"] == "Question: q0 <b>?\n\nAnswer: "
    step, latest = tracking.latest_generations(rows)
    assert step == 10 and [r["policy"] for r in latest] == ["policy 10/0 é", "policy 10/1 é"]
    # what MLflow's own table reader sees (the UI's artifact view, mlflow.load_table)
    from mlflow.tracking import MlflowClient

    names = [f.path for f in MlflowClient(store.uri).list_artifacts(run_id)]
    assert names == [tracking.GENERATIONS_TABLE]


def test_a_step_logged_twice_shows_once_with_its_last_copy():
    again = [{**r, "policy": "second"} for r in _gen_rows(10)]
    step, latest = tracking.latest_generations(_gen_rows(5) + _gen_rows(10) + again)
    assert step == 10 and [r["policy"] for r in latest] == ["second", "second"]


def test_buffered_logger_generations_skip_logged_steps_and_only_warn_on_failure(store, capsys):
    run_id = _run(store)
    logger = tracking.BufferedLogger(store.uri, run_id, skip_through_step=5)
    logger.log_generations(_gen_rows(5), step=5)  # the resumed job repeats step 5: already in the run
    logger.log_generations(_gen_rows(10), step=10)
    assert [r["step"] for r in tracking.load_generations(store.uri, run_id)] == [10, 10]
    broken = tracking.BufferedLogger(store.uri, "no-such-run")
    broken.log_generations(_gen_rows(10), step=10)  # must not raise
    assert "could not log the step-10 eval generations" in capsys.readouterr().err
    for lg in (logger, broken):
        lg.close(timeout_s=5)
    tracking.NullLogger().log_generations(_gen_rows(1), step=1)


# -- params, tags, runs ------------------------------------------------------------------

def test_log_params_flattens_config_truncates_and_passes_100(store):
    from mlflow.tracking import MlflowClient

    run_id = _run(store)
    flat = Config().flat()
    flat.update(flatten({"extra": {f"k{i}": {"deep": i} for i in range(150)}}))
    flat["data.prompt_template"] = "x" * 10_000
    assert len(flat) > 200
    tracking.log_params(store.uri, run_id, flat)

    params = MlflowClient(store.uri).get_run(run_id).data.params
    assert len(params) == len(flat)
    assert params["dpo.beta"] == "0.1"
    assert params["lora.target_modules"] == "['q_proj', 'v_proj']"
    assert params["dpo.sft_adapter"] == "None"
    assert params["extra.k149.deep"] == "149"
    assert params["data.prompt_template"] == "x" * tracking.MAX_PARAM_LEN


def test_child_run_links_to_parent_and_statuses_are_recorded(store):
    parent = _run(store, "sweep", tags={tracking.STAGE_TAG: "tune"})
    child = _run(store, "trial-1", parent_run_id=parent, tags={"raydpo.trial_id": "t1"})
    tracking.set_tags(store.uri, child, {tracking.ADAPTER_TAG: "/ckpt/adapter"})
    tracking.end_run(store.uri, child, "KILLED")

    def runs():
        return {r.info.run_id: r for r in tracking.find_runs(store.uri, "raydpo-test")}

    assert set(runs()) == {parent, child}
    assert runs()[child].data.tags[tracking.PARENT_TAG] == parent
    assert runs()[child].info.run_name == "trial-1"
    assert runs()[child].info.status == "KILLED"
    assert runs()[parent].info.status == "RUNNING"  # stays open until the driver ends it
    assert tracking.run_for_adapter(store.uri, "raydpo-test", "/ckpt/adapter") == child
    dpo = _run(store, "dpo", sft_run_id=child)
    assert runs()[dpo].data.tags[tracking.SFT_RUN_TAG] == child  # lineage, without nesting under it
    assert tracking.PARENT_TAG not in runs()[dpo].data.tags
    tracking.end_run(store.uri, parent)
    assert runs()[parent].info.status == "FINISHED"
    with pytest.raises(ValueError, match="status"):
        tracking.end_run(store.uri, parent, "DONE")


def test_find_runs_tells_a_missing_experiment_from_one_without_runs(store):
    assert tracking.find_runs(store.uri, "no-such-experiment") is None
    assert tracking.find_runs(store.uri, "raydpo-test") == []


# -- plots and artifacts -----------------------------------------------------------------

def _history(dpo: bool = True) -> list[dict[str, float]]:
    hist = []
    for step in range(1, 21):
        rec: dict[str, float] = {"step": step, "train/loss": 0.69 - 0.01 * step}
        if dpo:
            rec.update({"train/rewards/chosen": 0.02 * step, "train/rewards/rejected": -0.01 * step,
                        "train/rewards/margins": 0.03 * step, "train/rewards/accuracies": min(1.0, 0.5 + 0.03 * step)})
            if step % 5 == 0:
                rec.update({"eval/loss": 0.7 - 0.008 * step, "eval/rewards/accuracies": 0.5 + 0.02 * step,
                            "eval/rewards/margins": 0.02 * step})
        hist.append(rec)
    return hist


@pytest.mark.parametrize(("dpo", "panels"), [(True, 5), (False, 1)], ids=["dpo", "sft-loss-only"])
def test_reward_curves_png_is_a_real_png_with_one_panel_per_logged_quantity(tmp_path, dpo, panels):
    path = plot_reward_curves(_history(dpo), str(tmp_path / "curves.png"))
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    width = int.from_bytes(data[16:20], "big")  # IHDR: 4 inches per panel at 80 dpi
    assert width == panels * 4 * 80
    empty = Path(plot_reward_curves([], str(tmp_path / "empty.png"))).stat().st_size
    assert len(data) > empty + 3_000  # curves were drawn, not just axes


def test_final_artifacts_land_under_adapter_next_to_the_db(store):
    from mlflow.tracking import MlflowClient

    adapter = store.cwd / "ckpt" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00\x01weights" * 100)
    run_id = _run(store)
    tracking.log_final_artifacts(store.uri, run_id, adapter_dir=str(adapter), config_yaml=Config().to_yaml(),
                                 history=_history())

    client = MlflowClient(store.uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {"adapter", "config.yaml", "reward_curves.png"}
    assert {a.path for a in client.list_artifacts(run_id, "adapter")} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    on_disk = store.dir / "mlartifacts" / "raydpo-test" / run_id / "artifacts"
    assert (on_disk / "adapter" / "adapter_model.safetensors").read_bytes() == b"\x00\x01weights" * 100
    assert (on_disk / "reward_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert Config.from_dict(__import__("yaml").safe_load((on_disk / "config.yaml").read_text())) == Config()
    assert not (store.cwd / "mlruns").exists()  # MLflow's cwd-relative default was not used


def test_final_artifacts_with_a_missing_adapter_fail_loudly(store):
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        tracking.log_final_artifacts(store.uri, _run(store), adapter_dir=str(store.cwd / "nope"))


def test_register_model_gives_successive_versions(store):
    from mlflow.tracking import MlflowClient

    adapter = store.cwd / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    runs = [_run(store, f"r{i}") for i in range(2)]
    for r in runs:
        tracking.log_final_artifacts(store.uri, r, adapter_dir=str(adapter))
    assert tracking.register_model(store.uri, runs[0], "adapter", "raydpo-dpo", tags={"beta": 0.1}) == "1"
    assert tracking.register_model(store.uri, runs[1], "adapter", "raydpo-dpo") == "2"

    mv = MlflowClient(store.uri, registry_uri=store.uri).get_model_version("raydpo-dpo", "1")
    assert mv.run_id == runs[0] and mv.tags == {"beta": "0.1"}
    assert mv.source == f"{(store.dir / 'mlartifacts' / 'raydpo-test').as_uri()}/{runs[0]}/artifacts/adapter"
